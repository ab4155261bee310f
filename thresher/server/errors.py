"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, raised as exceptions, one handler."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client sees: HTTP status, OpenAI error type, the field at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def vllm_rejected(error: Exception, param: str | None) -> APIError:
    """A 400 for a request vLLM's own checks refuse, naming the field vLLM names, else `param`."""
    param = getattr(error, "parameter", None) or param
    return bad_request(f"{param}: {error}" if param else str(error), param=param)


def engine_unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="engine_unavailable")


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return bad_request(f"body: not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"{param}: thresher does not support this field", param=param,
                           code="unsupported_field")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"{param or 'body'}: {message}", param=param)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Every error becomes an OpenAI-style JSON error; `on_error(error)` counts them."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        if on_error:
            on_error(error)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown path, wrong method) in the same shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        response = await api_error(request, APIError(error.status_code, str(error.detail), code=code))
        response.headers.update(error.headers or {})  # 405's Allow
        return response

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, _error: RecursionError) -> JSONResponse:
        return await api_error(request, bad_request("body: nested too deeply", code="body_too_deep"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return await api_error(request, APIError(500, f"internal error: {type(error).__name__}",
                                                 type="internal_server_error", code="internal_error"))
