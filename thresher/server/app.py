"""The FastAPI app: the engine on `app.state`, the routers, the body bound, the error handlers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from thresher import __version__
from thresher.server.errors import install_error_handlers
from thresher.server.limits import BodyLimit
from thresher.server.metrics import ServerMetrics
from thresher.server.routes import authorized, public, v1
from thresher.server.serving import ServeSettings, ServingEngine


@asynccontextmanager
async def _lifespan(app: FastAPI):
    await app.state.serving.start()
    yield
    app.state.serving.shutdown()


def create_app(settings: ServeSettings, serving: ServingEngine | None = None) -> FastAPI:
    app = FastAPI(title="thresher", version=__version__, lifespan=_lifespan,
                  description="OpenAI-compatible server for sparsity-accelerated, SAE-steerable LLMs. Requests "
                              "take two extra fields: `sparsity` and `steering`.")
    app.state.serving = serving or ServingEngine(settings)
    app.state.metrics = ServerMetrics()
    install_error_handlers(app, on_error=app.state.metrics.count_error)
    app.add_middleware(BodyLimit)
    app.include_router(public)
    app.include_router(authorized)
    app.include_router(v1)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, less the 422 it lists for every route: invalid requests are 400s here."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in document["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = document
    return app.openapi_schema
