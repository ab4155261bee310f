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
from thresher.steering import MAX_CLAMP, MAX_FEATURES, MAX_STRENGTH, MAX_VECTORS


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
    """FastAPI's document, less the 422 it lists for every route (invalid requests are 400s here), with the limits
    of what this server serves: its model, its artifact's levels and steering, its vocabulary."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in document["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        schemas = document["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        _served_limits(schemas, app.state.serving)
        app.openapi_schema = document
    return app.openapi_schema


def _served_limits(schemas: dict, serving: ServingEngine) -> None:
    token_id = {"type": "integer", "minimum": 0, "maximum": len(serving.tokenizer) - 1}
    model = {"type": "string", "enum": [serving.settings.served_model_name]}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[name]["properties"]
        properties["model"] = model
        properties["sparsity"]["anyOf"] = [{"type": "number", "enum": serving.artifact.levels}, {"type": "null"}]
    for name in ("TokenizeRequest", "DetokenizeRequest"):
        schemas[name]["properties"]["model"]["anyOf"] = [model, {"type": "null"}]
    schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"] = [
        {"type": "string"}, {"type": "array", "items": token_id, "minItems": 1}]
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] = token_id
    assets = serving.assets
    strength = {"type": "number", "minimum": -MAX_STRENGTH, "maximum": MAX_STRENGTH}
    spec = schemas["SteeringSpec"]["properties"]
    spec["layer"]["anyOf"] = [{"type": "integer", "enum": [assets.layer]}, {"type": "null"}]
    spec["features"]["maxItems"] = MAX_FEATURES if assets.sae is not None else 0
    spec["vectors"]["maxItems"] = MAX_VECTORS
    feature = schemas["FeatureTerm"]["properties"]
    feature["id"].update(minimum=0, maximum=assets.sae.d_sae - 1 if assets.sae is not None else 0)
    feature["strength"] = {**strength, "description": feature["strength"]["description"]}
    feature["clamp"] = {"type": "number", "minimum": 0, "maximum": MAX_CLAMP,
                        "description": feature["clamp"]["description"]}
    schemas["FeatureTerm"]["oneOf"] = [{"required": ["strength"]}, {"required": ["clamp"]}]
    vector = schemas["VectorTerm"]["properties"]
    vector["name"]["enum"] = sorted(assets.vector_info)
    vector["strength"].update(strength)
