"""Errors with the right status in each API's shape.

OpenAI clients (the openai SDK, LiteLLM, Open WebUI) read `{"error": {"message", "type", "param",
"code"}}`; Ollama clients read `{"error": "message"}`, so routes under /api/ answer that shape.
SDKs retry 429/5xx automatically, so "overloaded" is 503 with Retry-After and everything the
client must fix is 4xx.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered to the client; raised anywhere in request handling."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def ollama_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def render_error(path: str, e: APIError) -> JSONResponse:
    """The error in the shape the API under `path` uses."""
    return e.ollama_response() if is_ollama_path(path) else e.response()


def bad_request(message: str, param: str | None = None, code: str | None = None, **extra) -> APIError:
    return APIError(400, message, param=param, code=code, extra=extra or None)


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    type="authentication_error", code="invalid_api_key")


def overloaded(retry_after: int = 1) -> APIError:
    return APIError(503, "The server is overloaded: the request queue is full. Retry later.",
                    type="server_error", code="overloaded", headers={"Retry-After": str(retry_after)})


def loading() -> APIError:
    return APIError(503, "Loading model", type="unavailable_error", code="model_loading",
                    headers={"Retry-After": "5"})
