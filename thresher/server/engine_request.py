"""From a validated API request to what vLLM is given: a tokenized prompt and finished `SamplingParams`.

The way of a chat request through the server, start to end:

1. `routes.chat_completions` receives the body, already parsed and validated by FastAPI into
   `protocol.ChatCompletionRequest` (types, ranges; a failure is a 400 naming the field, see `errors`).
2. `prepare_chat` (here) checks the model name and the thresher extensions against the artifact, renders the chat
   template, tokenizes, checks the context length, and builds `SamplingParams` with thresher's `extra_args` and the
   prompt's `cache_salt` (`thresher.engine.request_extras`): an `EngineRequest`.
3. `generation.Generation` hands the prompt and params to `ServingEngine.generate` (vLLM's `AsyncLLM`), then
   collects the outputs into one response or streams them as server-sent events, and aborts the request in the
   engine if the client goes away.
"""

from __future__ import annotations

from dataclasses import dataclass

from thresher.artifact import ArtifactError
from thresher.engine import request_extras
from thresher.server.errors import APIError, bad_request
from thresher.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest, completion_id
from thresher.server.serving import ServingEngine
from thresher.steering import SteeringError, SteeringSpec


@dataclass
class EngineRequest:
    """One request as the engine takes it, with what thresher applied to it."""

    kind: str  # "chat.completion" or "text_completion"
    request_id: str
    prompt: dict  # vLLM's TokensPrompt: prompt_token_ids, and cache_salt when steered
    params: object  # vllm.SamplingParams, extra_args included
    sparsity: float
    steering: SteeringSpec | None
    stream: bool
    include_usage: bool


def prepare_chat(body: ChatCompletionRequest, serving: ServingEngine) -> EngineRequest:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = serving.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # the template rejects some role orders
        raise bad_request(f"messages: the chat template rejects them: {error}", param="messages") from None
    prompt_ids = serving.tokenizer(text, add_special_tokens=False)["input_ids"]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _engine_request(body, serving, prompt_ids, body.max_completion_tokens or body.max_tokens, logprobs,
                           "chat.completion", "messages")


def prepare_completion(body: CompletionRequest, serving: ServingEngine) -> EngineRequest:
    if isinstance(body.prompt, str):
        prompt_ids = serving.tokenizer(body.prompt)["input_ids"]
    else:
        vocab = len(serving.tokenizer)
        if not body.prompt or any(not 0 <= t < vocab for t in body.prompt):
            raise bad_request(f"prompt: token ids must be a non-empty list within 0..{vocab - 1}", param="prompt")
        prompt_ids = list(body.prompt)
    return _engine_request(body, serving, prompt_ids, body.max_tokens, body.logprobs, "text_completion", "prompt")


def _thresher_options(body: SamplingRequest, serving: ServingEngine) -> tuple[float, SteeringSpec | None]:
    """The request's sparsity level and steering spec, checked against the artifact."""
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
        try:
            serving.assets.validate(steering)
        except SteeringError as error:
            raise bad_request(str(error), param=error.param) from None
        steering = None if steering.is_empty() else steering.model_copy(update={"layer": serving.assets.layer})
    return sparsity, steering


def _engine_request(body: SamplingRequest, serving: ServingEngine, prompt_ids: list[int], max_tokens: int | None,
                    logprobs: int | None, kind: str, prompt_field: str) -> EngineRequest:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    sparsity, steering = _thresher_options(body, serving)
    serving.check_ready()
    limit = serving.max_model_len
    room = limit - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise bad_request(f"{prompt_field}: the prompt has {len(prompt_ids)} tokens and max_tokens is "
                          f"{max_tokens}; together they exceed the context of {limit} tokens",
                          param=prompt_field, code="context_length_exceeded")
    extra_args, cache_salt = request_extras(sparsity, steering)
    params = SamplingParams(
        n=body.n, max_tokens=max_tokens or room, temperature=body.temperature, top_p=body.top_p,
        stop=body.stop_list(), seed=body.seed, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos,
        output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY, extra_args=extra_args,
    )
    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return EngineRequest(
        kind=kind, request_id=completion_id("chatcmpl" if kind == "chat.completion" else "cmpl"), prompt=prompt,
        params=params, sparsity=sparsity, steering=steering, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage))
