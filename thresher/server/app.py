"""The FastAPI app: the engine on `app.state`, the routers, the error handlers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from thresher import __version__
from thresher.server.errors import install_error_handlers
from thresher.server.metrics import ServerMetrics
from thresher.server.routes import public, v1
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
    app.include_router(public)
    app.include_router(v1)
    return app
