"""From a validated API request to what vLLM is given: a tokenized prompt and finished `SamplingParams`.

The way of a chat request through the server, start to end:

1. The body is at most `ServingEngine.max_body_bytes` (`limits.BodyLimit`, else a 413), parsed and validated by
   FastAPI into `protocol.ChatCompletionRequest` (types, ranges, unknown fields; a failure is a 400 naming the
   field, see `errors`), then handed to `routes.chat_completions`.
2. `prepare_chat` (here):
   - checks the model name and the thresher extensions (`sparsity`, `steering`, `attention`) against the artifact
     and the engine;
   - builds vLLM's own `ChatCompletionRequest` from the body: vLLM's tool parser (`--tool-call-parser`) reads it,
     adjusts it for `tool_choice` "required" or a named function (a JSON schema of the calls), and vLLM maps its
     `response_format` to `StructuredOutputsParams`, so constrained decoding is vLLM's;
   - checks the prompt's length cheaply (characters) and then exactly (tokens), the chat template rendered and
     tokenized off the event loop;
   - builds `SamplingParams`, with the structured-output constraint, thresher's `extra_args` and the prompt's
     `cache_salt` (`thresher.engine.request_extras`): an `EngineRequest`.
3. `generation.Generation` hands prompt and params to `ServingEngine.generate` (vLLM's `AsyncLLM`), collects the
   outputs into one response or streams them as server-sent events (tool calls parsed by the same vLLM parser),
   and aborts the request in the engine if the client goes away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vllm.exceptions import VLLMValidationError

from thresher.artifact import ArtifactError
from thresher.engine import request_extras
from thresher.server.errors import APIError, bad_request, vllm_rejected
from thresher.server.protocol import (Applied, AttentionOptions, ChatCompletionRequest, CompletionRequest,
                                      SamplingRequest, completion_id)
from thresher.server.serving import ServingEngine
from thresher.steering import SteeringError

# the fields of a chat request that vLLM's tool parsers and structured-output mapping read
VLLM_READS = {"tools", "tool_choice", "parallel_tool_calls", "response_format"}


@dataclass
class EngineRequest:
    """One request as the engine takes it, with what thresher applied to it."""

    kind: str  # "chat.completion" or "text_completion"
    request_id: str
    prompt: dict  # vLLM's TokensPrompt: prompt_token_ids, and cache_salt when steered
    params: object  # vllm.SamplingParams, structured outputs and extra_args included
    applied: Applied  # sparsity level, steering spec and attention budget
    stream: bool
    include_usage: bool
    # chat with tools: vLLM's request and a factory of its parsers (one per choice: they keep stream state)
    tool_request: object | None = None
    new_tool_parser: object | None = None


async def prepare_chat(body: ChatCompletionRequest, serving: ServingEngine) -> EngineRequest:
    applied = _thresher_options(body, serving)
    vllm_request = _vllm_chat_request(body)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    new_parser = None
    if body.tools and body.tool_choice != "none":
        new_parser = serving.tool_parser_factory(vllm_request.tools)
        try:
            vllm_request = new_parser().adjust_request(vllm_request)
        except (ValueError, VLLMValidationError) as error:
            raise vllm_rejected(error, "tools") from None
    try:
        structured_outputs = vllm_request.extract_structured_outputs()
    except (ValueError, VLLMValidationError) as error:
        raise vllm_rejected(error, "tool_choice" if body.tools else "response_format") from None
    messages = [m.template_message() for m in body.messages]
    characters = sum(len(m["content"]) for m in messages) + len(json.dumps(tools) if tools else "")
    _check_length(serving, characters, "messages", body.max_completion_tokens or body.max_tokens, exact=False)
    try:
        prompt_ids = await serving.tokenize_chat(messages, tools)
    except Exception as error:  # the template rejects some role orders
        raise bad_request(f"messages: the chat template rejects them: {error}", param="messages") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # a tool parser may keep special tokens in the text it parses (hermes' <tool_call>)
    prepared = _engine_request(body, serving, applied, prompt_ids,
                               body.max_completion_tokens or body.max_tokens, logprobs, "chat.completion",
                               "messages", structured_outputs, vllm_request.skip_special_tokens)
    if new_parser is not None:
        prepared.tool_request, prepared.new_tool_parser = vllm_request, new_parser
    return prepared


async def prepare_completion(body: CompletionRequest, serving: ServingEngine) -> EngineRequest:
    applied = _thresher_options(body, serving)
    if isinstance(body.prompt, str):
        _check_length(serving, len(body.prompt), "prompt", body.max_tokens, exact=False)
        prompt_ids = await serving.tokenize(body.prompt)
    else:
        vocab = len(serving.tokenizer)
        if any(not 0 <= t < vocab for t in body.prompt):
            raise bad_request(f"prompt: token ids must be within 0..{vocab - 1}", param="prompt")
        prompt_ids = list(body.prompt)
    return _engine_request(body, serving, applied, prompt_ids, body.max_tokens, body.logprobs,
                           "text_completion", "prompt", None)


def _vllm_chat_request(body: ChatCompletionRequest):
    """vLLM's own model of what its tool parsers and structured-output mapping read (the messages are rendered here,
    not by vLLM)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMChatCompletionRequest

    fields = {"messages": [], **body.model_dump(mode="json", by_alias=True, exclude_unset=True, include=VLLM_READS)}
    for tool in fields.get("tools") or []:  # OpenAI: a function without parameters takes none
        if tool["function"].get("parameters") is None:
            tool["function"]["parameters"] = {"type": "object", "properties": {}}
    json_schema = (fields.get("response_format") or {}).get("json_schema")
    if json_schema is not None and json_schema.get("schema") is None:  # no schema: any JSON object, as json_object
        json_schema["schema"] = {"type": "object"}
    try:
        return VLLMChatCompletionRequest.model_validate(fields)
    except (ValueError, VLLMValidationError) as error:  # vLLM's own checks, e.g. of a response_format
        raise vllm_rejected(error, "response_format") from None


def _thresher_options(body: SamplingRequest, serving: ServingEngine) -> Applied:
    """The request's sparsity level, steering spec and attention budget, checked against the artifact and the
    engine."""
    settings = serving.settings
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
        if steering.layer is not None and steering.layer != serving.assets.layer:  # even with nothing to add
            raise bad_request(f"steering.layer: the artifact steers at layer {serving.assets.layer}, not "
                              f"{steering.layer}", param="steering.layer")
        try:
            serving.assets.validate(steering)
        except SteeringError as error:
            raise bad_request(str(error), param=error.param) from None
        steering = None if steering.is_empty() else steering.model_copy(update={"layer": serving.assets.layer})
    budget = settings.default_attention_budget if body.attention is None else body.attention.budget
    if budget:
        serving.check_ready()
        if not serving.selects_pages:
            raise bad_request("attention.budget: this engine's attention has no page selection; send 0 or leave "
                              "attention out", param="attention.budget")
        budget -= budget % serving.page_size  # what the engine reads: whole pages
    return Applied(sparsity=sparsity, steering=steering, attention=AttentionOptions(budget=budget))


def _check_length(serving: ServingEngine, size: int, field: str, max_tokens: int | None, exact: bool) -> None:
    """A prompt of `size` tokens (`exact`) or characters (a bound: before tokenizing, no token is longer than
    `serving.max_token_chars`) leaves room for `max_tokens` in the context, or the request is a 400."""
    limit = serving.max_model_len
    tokens = size if exact else -(-size // serving.max_token_chars)
    room = limit - tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        measured = f"{size} tokens" if exact else f"{size} characters, at least {tokens} tokens,"
        raise bad_request(f"{field}: the prompt has {measured} and max_tokens is {max_tokens}; together they "
                          f"exceed the context of {limit} tokens", param=field, code="context_length_exceeded")


def _engine_request(body: SamplingRequest, serving: ServingEngine, applied: Applied, prompt_ids: list[int],
                    max_tokens: int | None, logprobs: int | None, kind: str, prompt_field: str, structured_outputs,
                    skip_special_tokens: bool = True) -> EngineRequest:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    serving.check_ready()
    _check_length(serving, len(prompt_ids), prompt_field, max_tokens, exact=True)
    extra_args, cache_salt = request_extras(applied.sparsity, applied.steering, applied.attention.budget)
    try:
        params = SamplingParams(
            n=body.n, max_tokens=max_tokens or serving.max_model_len - len(prompt_ids), temperature=body.temperature,
            top_p=body.top_p, stop=body.stop_list(), seed=body.seed, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos,
            output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured_outputs, skip_special_tokens=skip_special_tokens, extra_args=extra_args,
        )
    except (ValueError, VLLMValidationError) as error:  # vLLM's own checks of the sampling options
        raise vllm_rejected(error, None) from None
    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return EngineRequest(
        kind=kind, request_id=completion_id("chatcmpl" if kind == "chat.completion" else "cmpl"), prompt=prompt,
        params=params, applied=applied, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage))
