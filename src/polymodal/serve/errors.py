"""Errors the server answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every refusal is an `APIError` raised anywhere below a route; `polymodal.serve.app` turns it (and FastAPI's own
errors) into a JSON response with this body, so clients written for OpenAI's API read our errors unchanged."""

from __future__ import annotations

from typing import Any

# OpenAI's error types by status (what its API answers; clients switch on the status, people read the message)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 502: "server_error",
          503: "server_error"}


class APIError(Exception):
    """A request the server refuses (4xx) or could not answer (5xx), with a message for the person sending it."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def error_body(message: str, type: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
