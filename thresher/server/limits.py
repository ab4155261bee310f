"""The bound on request bodies: a body larger than `ServingEngine.max_body_bytes` is a 413 before it is read whole,
so no client can make the server buffer, parse or tokenize more than a full context's worth."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from thresher.server.errors import APIError


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the bound is answered at once; a body without one is read
    up to the bound (answered once it passes it) and then handed on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        app = scope["app"]
        limit = app.state.serving.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) <= limit:
                return await self.app(scope, receive, send)
            return await self._too_large(app, limit, scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(app, limit, scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(app, limit: int, scope, receive, send):
        error = APIError(413, f"body: larger than this server's bound of {limit} bytes (the longest prompt its "
                              "context holds, and 1 MiB)", code="body_too_large")
        app.state.metrics.count_error(error)
        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
