"""The HTTP endpoints: module-level routers; the engine, settings and metrics come from `request.app.state`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from thresher.server.engine_request import EngineRequest, prepare_chat, prepare_completion
from thresher.server.errors import APIError
from thresher.server.generation import Generation
from thresher.server.metrics import ServerMetrics
from thresher.server.protocol import ChatCompletionRequest, CompletionRequest, now
from thresher.server.serving import ServingEngine


def serving_engine(request: Request) -> ServingEngine:
    return request.app.state.serving


def server_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


Serving = Annotated[ServingEngine, Depends(serving_engine)]
Metrics = Annotated[ServerMetrics, Depends(server_metrics)]


async def require_api_key(serving: Serving, request: Request) -> None:
    api_key = serving.settings.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


public = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@public.get("/health", summary="200 when the engine can serve, 503 otherwise")
async def health(serving: Serving) -> Response:
    serving.check_ready()
    return JSONResponse({"status": "ok"})


@public.get("/metrics", summary="Prometheus metrics")
async def prometheus(metrics: Metrics) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@v1.get("/models")
async def list_models(serving: Serving) -> dict:
    settings = serving.settings
    return {"object": "list", "data": [{
        "id": settings.served_model_name, "object": "model", "created": now(), "owned_by": "thresher",
        "max_model_len": serving.max_model_len, "sparsity_levels": serving.artifact.levels,
        "default_sparsity": settings.default_sparsity, "steering_layer": serving.assets.layer,
    }]}


@v1.get("/steering/features", summary="Search the SAE feature catalog")
async def search_features(serving: Serving,
                          q: Annotated[str, Query(description="Substring of a label, token or context")] = "",
                          limit: Annotated[int, Query(ge=1, le=200)] = 20,
                          offset: Annotated[int, Query(ge=0)] = 0) -> dict:
    hits = serving.assets.search_features(q, limit=limit, offset=offset)
    return {"object": "list", "layer": serving.assets.layer, "data": hits}


@v1.get("/steering/features/{feature_id}")
async def feature_detail(feature_id: int, serving: Serving) -> dict:
    entry = serving.assets.feature(feature_id)
    if entry is None:
        raise APIError(404, f"feature {feature_id} is not in the catalog (dead or out of range)",
                       param="feature_id", code="feature_not_found")
    return {"layer": serving.assets.layer, **entry}


@v1.get("/steering/vectors")
async def list_vectors(serving: Serving) -> dict:
    return {"object": "list", "data": [{"name": name, **info}
                                       for name, info in sorted(serving.assets.vector_info.items())]}


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: Serving,
                           metrics: Metrics) -> Response:
    return await _respond(prepare_chat(body, serving), request, serving, metrics)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request, serving: Serving, metrics: Metrics) -> Response:
    return await _respond(prepare_completion(body, serving), request, serving, metrics)


async def _respond(prepared: EngineRequest, request: Request, serving: ServingEngine,
                   metrics: ServerMetrics) -> Response:
    metrics.count_request_kind(prepared.sparsity, prepared.steering)
    generation = Generation(serving, metrics, request, prepared)
    if prepared.stream:
        return StreamingResponse(generation.sse(prepared.include_usage), media_type="text/event-stream")
    return JSONResponse(await generation.collect())
