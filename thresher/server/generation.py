"""One request in the engine: generated, collected into one response or streamed as server-sent events, counted in
the metrics, and aborted in the engine when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request

from thresher import __version__
from thresher.server.engine_request import EngineRequest
from thresher.server.errors import APIError
from thresher.server.metrics import ServerMetrics
from thresher.server.protocol import Usage, now
from thresher.server.serving import ServingEngine

log = logging.getLogger(__name__)
# OpenAI's field for the backend configuration that answered
SYSTEM_FINGERPRINT = f"thresher-{__version__}"


async def _until_disconnected(request: Request, interval: float = 0.5) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(interval)


def _logprobs_entry(kind: str, token_ids: list[int], logprobs: list[dict] | None, top_n: int, tokenizer,
                    text_offset: int = 0) -> dict | None:
    """OpenAI logprobs of the new tokens: chat's `content` list, or the completions' parallel lists (with each
    token's offset in the choice's text, the first at `text_offset`)."""
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
    offsets = [text_offset]
    for token, _, _ in rows[:-1]:
        offsets.append(offsets[-1] + len(token))
    return {"tokens": [t for t, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [dict(alts) for _, _, alts in rows], "text_offset": offsets[:len(rows)]}


class Generation:
    """One prepared request in the engine: `collect()` for one response, `sse()` for a stream."""

    def __init__(self, serving: ServingEngine, metrics: ServerMetrics, request: Request, prepared: EngineRequest):
        self.serving, self.metrics, self.request, self.prepared = serving, metrics, request, prepared
        self.kind, self.params = prepared.kind, prepared.params
        self.request_id = prepared.request_id
        self.prompt_tokens = len(prepared.prompt["prompt_token_ids"])
        self.applied = prepared.applied.model_dump()
        self.endpoint = "/v1/chat/completions" if self.kind == "chat.completion" else "/v1/completions"
        self.completion_tokens = 0
        self.created = now()
        self.tools = ToolCalls(prepared) if prepared.new_tool_parser is not None else None
        self.streamed_chars: dict[int, int] = {}  # per choice of a text completion's stream: its text so far

    def _usage(self) -> dict:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens).model_dump()

    def _envelope(self, choices: list[dict], obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.serving.settings.served_model_name, "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices, **self.applied}

    def _choice_delta(self, out, first: bool) -> dict | None:
        """One choice of a stream chunk; None when the tool parser holds its text back (inside a call's markup)."""
        logprobs = _logprobs_entry(self.kind, list(out.token_ids), out.logprobs, self.params.logprobs or 0,
                                   self.serving.tokenizer, self.streamed_chars.get(out.index, 0))
        if self.kind != "chat.completion":
            self.streamed_chars[out.index] = self.streamed_chars.get(out.index, 0) + len(out.text)
            return {"index": out.index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        if self.tools is None:
            delta = {"content": out.text}
        else:
            delta = self.tools.delta(out, self.prepared.prompt["prompt_token_ids"])
            if delta is None and out.finish_reason is None and logprobs is None and not first:
                return None
        delta = {"role": "assistant", **(delta or {})} if first else delta or {}
        finish_reason = self.tools.finish_reason(out) if self.tools is not None else out.finish_reason
        return {"index": out.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    async def _outputs(self) -> AsyncIterator:
        """Engine outputs, with metrics; the request is aborted in the engine if the client goes away."""
        started = time.perf_counter()
        first_token_at = None
        finished = False
        self.metrics.running.inc()
        try:
            async for output in self.serving.generate(self.prepared.prompt, self.params, self.request_id):
                new_tokens = sum(len(o.token_ids) for o in output.outputs)
                if new_tokens and first_token_at is None:
                    first_token_at = time.perf_counter()
                    self.metrics.ttft.labels(self.endpoint).observe(first_token_at - started)
                self.completion_tokens += new_tokens
                yield output
            finished = True
        finally:
            self.metrics.running.dec()
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
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
            if self.kind == "chat.completion" and self.tools is not None:
                message, finish_reason = self.tools.message(index, text, token_ids[index], finish[index])
                choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason})
            elif self.kind == "chat.completion":
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
                    choice = self._choice_delta(out, first=out.index not in started)
                    if choice is not None:
                        choices.append(choice)
                        started.add(out.index)
                if choices:
                    yield f"data: {json.dumps(self._envelope(choices, obj))}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**self._envelope([], obj), 'usage': self._usage()})}\n\n"
        except APIError as error:
            if not started:  # before the first chunk: a plain error response (the route awaits that chunk)
                raise
            yield f"data: {json.dumps(error.body())}\n\n"  # the engine died mid-stream: said in the stream
        yield "data: [DONE]\n\n"


class ToolCalls:
    """The tool calls in a chat request's outputs, parsed by vLLM's parser as vLLM's server does: per choice, with
    `tool_choice` "required" or a named function read from the JSON the constraint forced."""

    def __init__(self, prepared: EngineRequest):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam

        self.request, self.new_parser = prepared.tool_request, prepared.new_tool_parser
        self.named = isinstance(self.request.tool_choice, ChatCompletionNamedToolChoiceParam)
        self.parsers: dict[int, object] = {}
        self.called: set[int] = set()

    def _parser(self, index: int):
        return self.parsers.setdefault(index, self.new_parser())

    def message(self, index: int, text: str, token_ids: list[int], finish_reason: str | None) -> tuple[dict, str]:
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
        from vllm.renderers.chat_utils import make_tool_call_id

        _, content, calls = self._parser(index).parse(text, self.request, enable_auto_tools=True,
                                                      model_output_token_ids=token_ids)
        calls = maybe_filter_parallel_tool_calls(calls or [], self.request)
        message = {"role": "assistant", "content": content}
        if calls:
            self.called.add(index)
            message["tool_calls"] = [{"id": call.id or make_tool_call_id(), "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in calls]
        return message, self._finish_reason(index, finish_reason)

    def delta(self, out, prompt_ids: list[int]) -> dict | None:
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        delta = self._parser(out.index).parse_delta(out.text, list(out.token_ids), self.request, prompt_ids,
                                                    finished=out.finish_reason is not None)
        if delta is None:
            return None
        delta = maybe_filter_parallel_tool_calls(delta, self.request)
        if delta.tool_calls:
            self.called.add(out.index)
        return delta.model_dump(exclude_none=True, exclude={"reasoning"})

    def finish_reason(self, out) -> str | None:
        return None if out.finish_reason is None else self._finish_reason(out.index, out.finish_reason)

    def _finish_reason(self, index: int, finish_reason: str | None) -> str | None:
        # as OpenAI: "tool_calls" when the model called tools of its choice or as required, "stop" for a named one
        if index in self.called and not self.named and finish_reason == "stop":
            return "tool_calls"
        return finish_reason
