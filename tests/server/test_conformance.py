"""thresher answers as vLLM's own OpenAI server does: the same requests go to both, on the same embedded model, and
the responses' shapes (keys and JSON types, not text) must match, field by field, except where a difference is
deliberate and listed here."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from tests.helpers import free_port, served
from tests.server.conftest import API_KEY, MODEL

STRICT_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "description": "The weather in a city now.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 16}}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CHAT = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0.0}

# (name, method, path, body): each sent to both servers
REQUESTS = [
    ("plain", "POST", "/v1/chat/completions", CHAT),
    ("streamed", "POST", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("json schema", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 60, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}),
    ("tool required", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 80, "tools": [STRICT_WEATHER],
                                                        "tool_choice": "required"}),
    ("tool named, streamed", "POST", "/v1/chat/completions", {
        **CHAT, "max_tokens": 80, "tools": [STRICT_WEATHER], "stream": True,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("tool auto", "POST", "/v1/chat/completions", {**CHAT, "tools": [STRICT_WEATHER], "tool_choice": "auto"}),
    ("logprobs", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}),
    ("n", "POST", "/v1/chat/completions", {**CHAT, "n": 2, "temperature": 1.0, "seed": 1}),
    ("stop", "POST", "/v1/chat/completions", {**CHAT, "stop": ["."]}),
    ("completion logprobs", "POST", "/v1/completions", {"model": MODEL, "prompt": "The capital of France is",
                                                         "max_tokens": 3, "temperature": 0.0, "logprobs": 2}),
    ("completion streamed", "POST", "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 3,
                                                         "stream": True}),
    ("models", "GET", "/v1/models", None),
    ("tokenize", "POST", "/tokenize", {"model": MODEL, "messages": ASK}),
    ("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": [19556, 665]}),
    ("bad temperature", "POST", "/v1/chat/completions", {**CHAT, "temperature": 7.0}),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}),
    ("tool choice without tools", "POST", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}),
    ("stream options without stream", "POST", "/v1/chat/completions",
     {**CHAT, "stream_options": {"include_usage": True}}),
    ("top logprobs without logprobs", "POST", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}),
    ("greedy n", "POST", "/v1/chat/completions", {**CHAT, "n": 2}),
]

# Deliberate differences, by JSON path ("*" for any index): why each is so.
THRESHER_ONLY = {
    "sparsity": "thresher's extension: the sparsity level applied",
    "steering": "thresher's extension: the steering spec applied",
    "data.*.sparsity_levels": "thresher's extension: the artifact's calibrated levels",
    "data.*.default_sparsity": "thresher's extension",
    "data.*.steering_layer": "thresher's extension",
    "attention": "thresher's extension: the attention budget applied",
    "data.*.attention": "thresher's extension: attention budgets (page size, least and default budget)",
}
VLLM_ONLY = {
    # vLLM's fields outside OpenAI's API, for vLLM-only request fields or features (null in these answers)
    "prompt_logprobs": "vLLM: prompt logprobs", "choices.*.prompt_logprobs": "vLLM: prompt logprobs",
    "prompt_token_ids": "vLLM: return_token_ids", "choices.*.token_ids": "vLLM: return_token_ids",
    "choices.*.prompt_token_ids": "vLLM: return_token_ids",
    "prompt_text": "vLLM: return_prompt_text", "choices.*.stop_reason": "vLLM: the stop string or token that ended it",
    "kv_transfer_params": "vLLM: disaggregated prefill", "ec_transfer_params": "vLLM: encoder cache transfer",
    "metrics": "vLLM: per-request metrics", "choices.*.routed_experts": "vLLM: mixture-of-experts routing",
    "choices.*.message.reasoning": "vLLM: reasoning parsers (thresher serves no reasoning model)",
    "data.*.root": "vLLM: the model's path on disk, which thresher does not expose",
    "data.*.parent": "vLLM: LoRA adapters' base model", "data.*.permission": "vLLM: a legacy placeholder list",
    "error.object": "vLLM: duplicates the error's kind outside OpenAI's error object",
    # OpenAI features thresher does not offer: vLLM sends them as null, thresher leaves them out (the OpenAI SDK
    # reads both as None)
    "choices.*.message.refusal": "no refusals", "choices.*.message.annotations": "no web search",
    "choices.*.message.audio": "no audio", "choices.*.message.function_call": "the deprecated functions API",
    "choices.*.delta.content": "tool-call deltas carry no content key (vLLM's carry null)",
    "service_tier": "no service tiers", "usage.prompt_tokens_details": "no cached-token accounting",
    "usage.completion_tokens_details": "no reasoning-token accounting",
}
# the same path typed differently, on purpose
RETYPED = {
    "error.code": "OpenAI's error code is a string (or null); vLLM puts the HTTP status number there",
}


def shape(value, path: str = "") -> dict[str, str]:
    """Every JSON path of a value (list items as '*') with its JSON type."""
    if isinstance(value, dict):
        found = {path: "object"} if path else {}
        for key, item in value.items():
            found.update(shape(item, f"{path}.{key}" if path else key))
        return found
    if isinstance(value, list):
        found = {path: "array"}
        for item in value:
            found.update(shape(item, f"{path}.*"))
        return found
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", type(None): "null"}
    return {path: kinds[type(value)]}


def _ignored(path: str, listed: dict) -> bool:
    return any(path == key or path.startswith(key + ".") for key in listed)


def answer(base_url: str, method: str, path: str, body) -> tuple[int, dict]:
    """Status and the shape of the answer: a stream's chunks are merged into one shape."""
    response = httpx.request(method, base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=120)
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.status_code, shape(response.json())
    merged = {}
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            merged.update(shape(json.loads(line[6:])))
    return response.status_code, merged


@pytest.fixture(scope="module")
def vllm_server(embedded_model, tmp_path_factory):
    """vLLM's own OpenAI server on the embedded model, configured as `thresher serve` configures its engine; stopped
    when this module's tests end, so it does not compete for the cores with the later tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model.path),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
               "--enforce-eager", "--max-model-len", "512", "--dtype", "float32", "--max-num-seqs", "16",
               "--kv-cache-memory-bytes", str(2**28), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with served(command, port, log) as base_url:
        yield base_url


def test_responses_have_vllms_shapes(server, vllm_server):
    differences = []
    for name, method, path, body in REQUESTS:
        ours_status, ours = answer(server.base_url, method, path, body)
        theirs_status, theirs = answer(vllm_server, method, path, body)
        if ours_status != theirs_status:
            differences.append(f"{name}: status {ours_status}, vLLM's {theirs_status}")
            continue
        for key in sorted(set(ours) | set(theirs)):
            if key not in theirs and not _ignored(key, THRESHER_ONLY):
                differences.append(f"{name}: {key} only in thresher's answer ({ours[key]})")
            elif key not in ours and not _ignored(key, VLLM_ONLY):
                differences.append(f"{name}: {key} only in vLLM's answer ({theirs[key]})")
            elif (key in ours and key in theirs and ours[key] != theirs[key] and "null" not in (ours[key], theirs[key])
                  and key not in RETYPED):
                differences.append(f"{name}: {key} is {ours[key]} here, {theirs[key]} in vLLM's answer")
    assert not differences, "\n".join(differences)
