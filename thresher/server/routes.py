"""The HTTP endpoints: module-level routers; the engine, settings and metrics come from `request.app.state`."""

from __future__ import annotations

import asyncio
import hmac
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from thresher.kernels.page_selection import MIN_BUDGET_TOKENS
from thresher.server.engine_request import EngineRequest, prepare_chat, prepare_completion
from thresher.server.errors import APIError, bad_request
from thresher.server.generation import Generation
from thresher.server.metrics import ServerMetrics
from thresher.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                      ErrorResponse, TokenizeRequest, TokenizeResponse, now)
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


def _errors(*statuses: int) -> dict:
    """OpenAPI entries of the error responses a route really gives: all in OpenAI's shape."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


ERROR_DESCRIPTIONS = {400: "Invalid request: `param` names the field", 401: "Missing or wrong API key",
                      404: "Unknown model or resource", 413: "Body larger than the server's bound",
                      503: "The engine is starting or has died"}
# an event stream's schema describes each event (OpenAPI before 3.2)
EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "A chunk or an error object as JSON, or [DONE] at the end"}}}
JSON_OR_EVENTS = {200: {"content": {"application/json": {"schema": {"type": "object"}},
                                    "text/event-stream": {"schema": EVENT}},
                        "description": "One response, or server-sent events with `stream: true`"}}

public = APIRouter()
authorized = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors(401))
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_errors(401))


@public.get("/health", summary="200 when the engine can serve, 503 otherwise", responses=_errors(503))
async def health(serving: Serving) -> Response:
    serving.check_ready()
    return JSONResponse({"status": "ok"})


@public.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus(metrics: Metrics, serving: Serving) -> Response:
    metrics.count_pages(*await serving.attention_pages())
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


# a static page: it holds no data, and every call it makes sends the API key its user types in
PLAYGROUND = files("thresher.server") / "playground.html"


@public.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))


@v1.get("/models")
async def list_models(serving: Serving) -> dict:
    settings = serving.settings
    return {"object": "list", "data": [{
        "id": settings.served_model_name, "object": "model", "created": now(), "owned_by": "thresher",
        "max_model_len": serving.max_model_len, "sparsity_levels": serving.artifact.levels,
        "default_sparsity": settings.default_sparsity, "steering_layer": serving.assets.layer,
        "attention": {"selects_pages": serving.selects_pages, "page_size": serving.page_size,
                      "min_budget": MIN_BUDGET_TOKENS,
                      "default_budget": settings.default_attention_budget},
    }]}


@v1.get("/steering/features", summary="Search the SAE feature catalog", responses=_errors(400))
async def search_features(serving: Serving,
                          q: Annotated[str, Query(description="Substring of a label, token or context")] = "",
                          limit: Annotated[int, Query(ge=1, le=200)] = 20,
                          offset: Annotated[int, Query(ge=0)] = 0) -> dict:
    hits = serving.assets.search_features(q, limit=limit, offset=offset)
    return {"object": "list", "layer": serving.assets.layer, "data": hits}


@v1.get("/steering/features/{feature_id}", responses=_errors(400, 404))
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


GENERATION_ERRORS = _errors(400, 404, 413, 503)


@v1.post("/chat/completions", responses={**JSON_OR_EVENTS, **GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: Serving,
                           metrics: Metrics) -> Response:
    return await _respond(await prepare_chat(body, serving), request, serving, metrics)


@v1.post("/completions", responses={**JSON_OR_EVENTS, **GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request, serving: Serving, metrics: Metrics) -> Response:
    return await _respond(await prepare_completion(body, serving), request, serving, metrics)


async def _respond(prepared: EngineRequest, request: Request, serving: ServingEngine,
                   metrics: ServerMetrics) -> Response:
    metrics.count_request_kind(prepared.applied)
    generation = Generation(serving, metrics, request, prepared)
    if not prepared.stream:
        return JSONResponse(await generation.collect())
    events = generation.sse(prepared.include_usage)
    # the first event is awaited here, so an error the engine finds in the request is a plain 400 or 503
    first = await anext(events)

    async def stream():
        yield first
        async for event in events:
            yield event

    return StreamingResponse(stream(), media_type="text/event-stream")


def _check_model(model: str | None, serving: ServingEngine) -> None:
    if model is not None and model != serving.settings.served_model_name:
        raise APIError(404, f"model '{model}' is not served here; this server serves "
                            f"'{serving.settings.served_model_name}'", param="model", code="model_not_found")


@authorized.post("/tokenize", responses=_errors(400, 404, 413), summary="Tokens of a prompt or chat, as vLLM's")
async def tokenize(body: TokenizeRequest, serving: Serving) -> TokenizeResponse:
    _check_model(body.model, serving)
    if body.messages is None:
        tokens = await serving.tokenize(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        try:
            tokens = await serving.tokenize_chat(
                [m.template_message() for m in body.messages],
                [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message, add_special_tokens=bool(body.add_special_tokens))
        except Exception as error:  # the template rejects some role orders
            raise bad_request(f"messages: the chat template rejects them: {error}", param="messages") from None
    strings = serving.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=serving.max_model_len, tokens=tokens,
                            token_strs=strings)


@authorized.post("/detokenize", responses=_errors(400, 404, 413), summary="Text of tokens, as vLLM's")
async def detokenize(body: DetokenizeRequest, serving: Serving) -> DetokenizeResponse:
    _check_model(body.model, serving)
    vocab = len(serving.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens: token ids must be within 0..{vocab - 1}", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(serving.tokenizer.decode, body.tokens))
