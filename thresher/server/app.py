"""The FastAPI app: OpenAI-compatible chat and text completions with thresher's sparsity and steering, the
steering catalog, health and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from thresher import __version__
from thresher.artifact import ArtifactError
from thresher.server.errors import APIError, bad_request, install_error_handlers
from thresher.server.metrics import ServerMetrics
from thresher.server.protocol import (Applied, ChatCompletionRequest, CompletionRequest, SamplingRequest, Usage,
                                      completion_id, now)
from thresher.server.serving import ServeSettings, ServingEngine
from thresher.steering import SteeringError, SteeringSpec

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings, serving: ServingEngine | None = None) -> FastAPI:
    serving = serving or ServingEngine(settings)
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await serving.start()
        yield
        serving.shutdown()

    app = FastAPI(title="thresher", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for sparsity-accelerated, SAE-steerable LLMs. Requests "
                              "take two extra fields: `sparsity` and `steering`.")
    app.state.serving, app.state.metrics = serving, metrics
    install_error_handlers(app, on_error=metrics.count_error)
    authorized = [Depends(_require_api_key(settings.api_key))]

    @app.get("/health", summary="200 when the engine can serve, 503 otherwise")
    async def health() -> Response:
        serving.check_ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict:
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": now(), "owned_by": "thresher",
            "max_model_len": serving.max_model_len, "sparsity_levels": serving.artifact.levels,
            "default_sparsity": settings.default_sparsity, "steering_layer": serving.assets.layer,
        }]}

    @app.get("/v1/steering/features", dependencies=authorized, summary="Search the SAE feature catalog")
    async def search_features(q: Annotated[str, Query(description="Substring of a label, token or context")] = "",
                              limit: Annotated[int, Query(ge=1, le=200)] = 20,
                              offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        hits = serving.assets.search_features(q, limit=limit, offset=offset)
        return {"object": "list", "layer": serving.assets.layer, "data": hits}

    @app.get("/v1/steering/features/{feature_id}", dependencies=authorized)
    async def feature_detail(feature_id: int) -> dict:
        entry = serving.assets.feature(feature_id)
        if entry is None:
            raise APIError(404, f"feature {feature_id} is not in the catalog (dead or out of range)",
                           param="feature_id", code="feature_not_found")
        return {"layer": serving.assets.layer, **entry}

    @app.get("/v1/steering/vectors", dependencies=authorized)
    async def list_vectors() -> dict:
        return {"object": "list", "data": [{"name": name, **info}
                                           for name, info in sorted(serving.assets.vector_info.items())]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = serving.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template rejects some role orders
            raise bad_request(f"messages: the chat template rejects them: {error}", param="messages") from None
        prompt_ids = serving.tokenizer(text, add_special_tokens=False)["input_ids"]
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _complete(request, body, prompt_ids, max_tokens, top, "chat.completion", "messages")

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if isinstance(body.prompt, str):
            prompt_ids = serving.tokenizer(body.prompt)["input_ids"]
        else:
            vocab = len(serving.tokenizer)
            if not body.prompt or any(not 0 <= t < vocab for t in body.prompt):
                raise bad_request(f"prompt: token ids must be a non-empty list within 0..{vocab - 1}",
                                  param="prompt")
            prompt_ids = list(body.prompt)
        return await _complete(request, body, prompt_ids, body.max_tokens, body.logprobs, "text_completion", "prompt")

    def _request_options(body: SamplingRequest) -> tuple[float, SteeringSpec | None]:
        if body.model != settings.served_model_name:
            raise APIError(404, f"model '{body.model}' is not served here; this server serves "
                                f"'{settings.served_model_name}'", param="model", code="model_not_found")
        sparsity = settings.default_sparsity if body.sparsity is None else body.sparsity
        try:
            serving.artifact.level_index(sparsity)
        except ArtifactError as error:
            raise bad_request(f"sparsity: {error}", param="sparsity") from None
        steering = body.steering
        if steering is not None:
            try:
                serving.assets.validate(steering)
            except SteeringError as error:
                raise bad_request(str(error), param=error.param) from None
            steering = None if steering.is_empty() else steering.model_copy(update={"layer": serving.assets.layer})
        return sparsity, steering

    async def _complete(request: Request, body: SamplingRequest, prompt_ids: list[int], max_tokens: int | None,
                        logprobs: int | None, kind: str, prompt_field: str) -> Response:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sparsity, steering = _request_options(body)
        serving.check_ready()
        limit = serving.max_model_len
        room = limit - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise bad_request(f"{prompt_field}: the prompt has {len(prompt_ids)} tokens and max_tokens is "
                              f"{max_tokens}; together they exceed the context of {limit} tokens",
                              param=prompt_field, code="context_length_exceeded")
        params = SamplingParams(
            n=body.n, max_tokens=max_tokens or room, temperature=body.temperature, top_p=body.top_p,
            stop=body.stop_list(), seed=body.seed, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos,
            output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
        )
        metrics.count_request_kind(sparsity, steering)
        request_id = completion_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        stream = _Generation(serving, metrics, request, kind, request_id, prompt_ids, params, sparsity, steering)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream.sse(include_usage), media_type="text/event-stream")
        return JSONResponse(await stream.collect())

    return app


async def _until_disconnected(request: Request, interval: float = 0.5) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(interval)


def _require_api_key(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    return check


def _logprobs_entry(kind: str, token_ids: list[int], logprobs: list[dict] | None, top_n: int, tokenizer) -> dict | None:
    """OpenAI logprobs of the new tokens: chat's `content` list, or the completions' parallel lists."""
    if logprobs is None:
        return None

    def text(token_id: int, logprob) -> str:
        return logprob.decoded_token if logprob.decoded_token is not None else tokenizer.decode([token_id])

    rows = []
    for token_id, candidates in zip(token_ids, logprobs):
        ranked = sorted(candidates.items(), key=lambda item: -item[1].logprob)[:top_n]
        rows.append((text(token_id, candidates[token_id]), candidates[token_id].logprob,
                     [(text(t, c), c.logprob) for t, c in ranked]))
    if kind == "chat.completion":
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                              for a, alp in alts]} for t, lp, alts in rows]}
    return {"tokens": [t for t, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [dict(alts) for _, _, alts in rows]}


class _Generation:
    """One request in the engine: collected into one response, or streamed as server-sent events."""

    def __init__(self, serving: ServingEngine, metrics: ServerMetrics, request: Request, kind: str,
                 request_id: str, prompt_ids: list[int], params, sparsity: float, steering: SteeringSpec | None):
        self.serving, self.metrics, self.request, self.kind = serving, metrics, request, kind
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.sparsity, self.steering = sparsity, steering
        self.applied = Applied(sparsity=sparsity, steering=steering).model_dump()
        self.endpoint = "/v1/chat/completions" if kind == "chat.completion" else "/v1/completions"
        self.completion_tokens = 0
        self.created = now()

    def _usage(self) -> dict:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.completion_tokens,
                     total_tokens=len(self.prompt_ids) + self.completion_tokens).model_dump()

    def _envelope(self, choices: list[dict], obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.serving.settings.served_model_name, "choices": choices, **self.applied}

    def _choice_delta(self, out, first: bool) -> dict:
        logprobs = _logprobs_entry(self.kind, list(out.token_ids), out.logprobs, self.params.logprobs or 0,
                                   self.serving.tokenizer)
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
            return {"index": out.index, "delta": delta, "logprobs": logprobs, "finish_reason": out.finish_reason}
        return {"index": out.index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}

    async def _outputs(self) -> AsyncIterator:
        """Engine outputs, with metrics; the request is aborted in the engine if the client goes away."""
        started = time.perf_counter()
        first_token_at = None
        finished = False
        self.metrics.running.inc()
        try:
            async for output in self.serving.generate(self.prompt_ids, self.params, self.request_id, self.sparsity,
                                                      self.steering):
                new_tokens = sum(len(o.token_ids) for o in output.outputs)
                if new_tokens and first_token_at is None:
                    first_token_at = time.perf_counter()
                    self.metrics.ttft.labels(self.endpoint).observe(first_token_at - started)
                self.completion_tokens += new_tokens
                yield output
            finished = True
        finally:
            self.metrics.running.dec()
            self.metrics.prompt_tokens.inc(len(self.prompt_ids))
            self.metrics.generation_tokens.inc(self.completion_tokens)
            if finished:
                self.metrics.requests.labels(self.endpoint, "ok").inc()
                self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - started)
            else:
                await self.serving.abort(self.request_id)
                self.metrics.aborted.inc()
                self.metrics.requests.labels(self.endpoint, "aborted").inc()
                log.info("request %s aborted after %d tokens", self.request_id, self.completion_tokens)

    async def collect(self) -> dict:
        """The whole response; if the client goes away first, the request is aborted in the engine."""
        generation = asyncio.create_task(self._collect())
        watcher = asyncio.create_task(_until_disconnected(self.request))
        done, _ = await asyncio.wait({generation, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if generation in done:
            watcher.cancel()
            return generation.result()
        generation.cancel()
        raise APIError(499, "the client closed the request", code="client_closed_request")

    async def _collect(self) -> dict:
        texts: dict[int, list[str]] = {}
        token_ids: dict[int, list[int]] = {}
        logprobs: dict[int, list] = {}
        finish: dict[int, str | None] = {}
        async for output in self._outputs():
            for out in output.outputs:
                texts.setdefault(out.index, []).append(out.text)
                token_ids.setdefault(out.index, []).extend(out.token_ids)
                if out.logprobs is not None:
                    logprobs.setdefault(out.index, []).extend(out.logprobs)
                finish[out.index] = out.finish_reason
        choices = []
        for index in sorted(texts):
            text = "".join(texts[index])
            lp = _logprobs_entry(self.kind, token_ids[index],
                                 logprobs.get(index, []) if self.params.logprobs is not None else None,
                                 self.params.logprobs or 0, self.serving.tokenizer)
            if self.kind == "chat.completion":
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish[index]})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish[index]})
        return {**self._envelope(choices, self.kind), "usage": self._usage()}

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        started: set[int] = set()
        try:
            async for output in self._outputs():
                choices = []
                for out in output.outputs:
                    choices.append(self._choice_delta(out, first=out.index not in started))
                    started.add(out.index)
                if choices:
                    yield f"data: {json.dumps(self._envelope(choices, obj))}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**self._envelope([], obj), 'usage': self._usage()})}\n\n"
        except APIError as error:  # the engine died mid-stream: say so in the stream, as OpenAI does
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
