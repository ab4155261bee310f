"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, raised as exceptions, one handler."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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


def engine_unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="engine_unavailable")


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return bad_request(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Every APIError and request-validation failure becomes an OpenAI-style JSON error; `on_error(error)` counts."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        if on_error:
            on_error(error)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(error))
