"""`polymodal serve`: an OpenAI-compatible HTTP server for polymodal models (docs/serving.md).

    from polymodal.serve import create_app, load_served, serve
    served = load_served(["tiny=./checkpoint", "clip=./clip-dir"])   # --model specs
    serve(served, host="127.0.0.1", port=8000, api_key="secret")

Modules: app (routes, errors, auth, limits), registry (served models), schemas (request bodies), errors
(OpenAI's error shape), engine (continuous batching for local decoders), media (safe media loading)."""

from __future__ import annotations

from polymodal.serve.app import create_app, serve
from polymodal.serve.errors import APIError
from polymodal.serve.registry import ServedModel, ServedModels, load_served, parse_spec

__all__ = ["APIError", "ServedModel", "ServedModels", "create_app", "load_served", "parse_spec", "serve"]
