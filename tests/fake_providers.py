"""Local fakes of the OpenAI, Anthropic and Gemini HTTP APIs, for tests/test_providers.py.

Each fake is an http.server on 127.0.0.1 (a free port) in a background thread. It records every request it
receives (method, path, query, headers, JSON body) and answers in that provider's documented wire format, JSON or
server-sent events, with the reply set on it: `pieces` (the answer's text, streamed piece by piece), `finish`
(the provider's own finish reason), `usage` (prompt, completion tokens), or `error` (status, message).

    with FakeOpenAI() as fake:
        fake.pieces = ["Hel", "lo"]
        ... OpenAI(base_url=fake.url + "/v1") ...
        fake.requests[-1].body["messages"]
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: dict


@dataclass
class Reply:
    status: int = 200
    body: dict | None = None  # JSON
    events: list[str] | None = None  # SSE: each already formatted ("event: ...\ndata: ...\n\n")
    headers: dict[str, str] = field(default_factory=dict)


class FakeServer:
    """The shared machinery; subclasses implement `answer(request) -> Reply`."""

    default_finish = "stop"

    def __init__(self):
        self.requests: list[Recorded] = []
        self.pieces: list[str] = ["Hello", ", ", "world", "!"]
        self.finish = self.default_finish
        self.usage = (12, 4)
        self.error: tuple[int, str] | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                split = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Recorded("POST", split.path, parse_qs(split.query),
                               {k.lower(): v for k, v in self.headers.items()}, json.loads(raw or b"{}"))
                fake.requests.append(req)
                reply = fake.answer(req)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.events is not None:
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("connection", "close")
                    self.end_headers()
                    for event in reply.events:  # one write per event, flushed: the client sees them arrive in turn
                        self.wfile.write(event.encode())
                        self.wfile.flush()
                    self.close_connection = True
                    return
                data = json.dumps(reply.body).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def answer(self, req: Recorded) -> Reply:
        raise NotImplementedError


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class FakeOpenAI(FakeServer):
    """POST /v1/chat/completions: a chat.completion object, or chat.completion.chunk events ending in [DONE]."""

    def answer(self, req):
        if req.path != "/v1/chat/completions":
            return Reply(404, {"error": {"message": f"unknown path {req.path}", "type": "invalid_request_error"}})
        if self.error:
            status, message = self.error
            kind = {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "invalid_request_error")
            return Reply(status, {"error": {"message": message, "type": kind, "param": None, "code": None}},
                         headers={"retry-after": "7"} if status == 429 else {})
        prompt, completion = self.usage
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        head = {"id": "chatcmpl-fake", "created": 1700000000, "model": req.body.get("model")}
        if not req.body.get("stream"):
            return Reply(body={**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": self.finish}]})
        chunk = {**head, "object": "chat.completion.chunk"}
        events = [sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})]
        events += [sse({**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
                   for p in self.pieces]
        events.append(sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish}]}))
        if (req.body.get("stream_options") or {}).get("include_usage"):
            events.append(sse({**chunk, "choices": [], "usage": usage}))
        events.append(sse("[DONE]"))
        return Reply(events=events)


class FakeAnthropic(FakeServer):
    """POST /v1/messages: a message object, or the documented event sequence message_start ... message_stop."""

    default_finish = "end_turn"

    def answer(self, req):
        if req.path != "/v1/messages":
            return Reply(404, {"type": "error", "error": {"type": "not_found_error", "message": req.path}})
        if self.error:
            status, message = self.error
            kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
            return Reply(status, {"type": "error", "error": {"type": kind, "message": message}},
                         headers={"retry-after": "7"} if status == 429 else {})
        prompt, completion = self.usage
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": req.body.get("model"),
                   "stop_sequence": None}
        if not req.body.get("stream"):
            return Reply(body={**message, "content": [{"type": "text", "text": self.text}],
                               "stop_reason": self.finish, "usage": {"input_tokens": prompt,
                                                                     "output_tokens": completion}})
        events = [sse({"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                            "usage": {"input_tokens": prompt, "output_tokens": 1}}},
                      "message_start"),
                  sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                      "content_block_start"),
                  sse({"type": "ping"}, "ping")]
        events += [sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                       "content_block_delta") for p in self.pieces]
        events += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                   sse({"type": "message_delta", "delta": {"stop_reason": self.finish, "stop_sequence": None},
                        "usage": {"output_tokens": completion}}, "message_delta"),
                   sse({"type": "message_stop"}, "message_stop")]
        return Reply(events=events)


class FakeGemini(FakeServer):
    """POST /v1beta/models/{model}:generateContent (JSON) and :streamGenerateContent?alt=sse (one
    GenerateContentResponse per event; the last carries finishReason and usageMetadata)."""

    default_finish = "STOP"

    def answer(self, req):
        model, _, method = req.path.removeprefix("/v1beta/models/").partition(":")
        if not req.path.startswith("/v1beta/models/") or method not in ("generateContent", "streamGenerateContent"):
            return Reply(404, {"error": {"code": 404, "message": f"unknown path {req.path}", "status": "NOT_FOUND"}})
        if self.error:
            status, message = self.error
            kind = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}.get(status, "INVALID_ARGUMENT")
            return Reply(status, {"error": {"code": status, "message": message, "status": kind}})
        prompt, completion = self.usage
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion}

        def response(text: str, finish: str | None = None, with_usage: bool = False) -> dict:
            candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
            if finish:
                candidate["finishReason"] = finish
            out = {"candidates": [candidate], "modelVersion": model}
            return {**out, "usageMetadata": usage} if with_usage else out

        if method == "generateContent":
            return Reply(body=response(self.text, self.finish, True))
        last = len(self.pieces) - 1
        return Reply(events=[sse(response(p, self.finish if i == last else None, i == last))
                             for i, p in enumerate(self.pieces)])
