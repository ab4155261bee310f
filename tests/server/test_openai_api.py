"""The OpenAI API as vLLM's users know it, on the real server: structured outputs, tools, tokenize, strict fields,
bounded bodies. The official openai client where it can send the request, raw HTTP where it cannot."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.server.conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "likes_tea"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                         "likes_tea": {"type": "boolean"}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 16}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("extra", [{}, {"sparsity": 0.5}, {"steering": {"vectors": [{"name": "formal",
                                                                                       "strength": 2.0}]}}],
                         ids=["dense", "sparse", "steered"])
def test_json_schema_answers_validate(server, extra):
    client = server.client()
    for temperature, strict in ((0.0, True), (1.0, False)):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=80,
            temperature=temperature, seed=3, response_format=_schema_format(PERSON, strict), extra_body=extra or None)
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
        assert response.choices[0].finish_reason == "stop"
        assert response.model_extra["sparsity"] == extra.get("sparsity", 0.0)


def test_json_object_streamed_parses(server):
    chunks = server.client().chat.completions.create(
        model=MODEL, max_tokens=80,
        messages=[{"role": "user", "content": "Return a JSON object with the keys colour and hex for the colour red."}],
        temperature=0.0, response_format={"type": "json_object"}, stream=True)
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict)


def test_named_tool_choice_calls_that_tool(server):
    response = server.client().chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, max_tokens=80, temperature=0.0, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_streams_calls_as_openai_does(server):
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=80, temperature=0.0,
                                           tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert whole.choices[0].finish_reason == "tool_calls" and len(whole.choices[0].message.tool_calls) == 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=80, temperature=0.0,
                                                 tools=[WEATHER, TIME], tool_choice="required",
                                                 parallel_tool_calls=False, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == whole.choices[0].message.tool_calls[0].function.name
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_and_auto_answers(server):
    client = server.client()
    conversation = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."}]
    response = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=16, temperature=0.0,
                                              tools=[WEATHER], tool_choice="auto")
    choice = response.choices[0]
    assert choice.finish_reason in {"stop", "length", "tool_calls"}
    assert choice.message.content or choice.message.tool_calls
    none = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=8, temperature=0.0,
                                          tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_a_tool_parser_gets_the_special_tokens_it_asks_for(server):
    # hermes reads its text with special tokens kept (some models mark <tool_call> special), as vLLM serves it
    client = server.client()
    question = [{"role": "user", "content": "Say hello."}]
    answers = {choice: client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=32, temperature=0.0, tools=[WEATHER], tool_choice=choice,
        extra_body={"ignore_eos": True}).choices[0].message.content for choice in ("auto", "none")}
    assert "<|im_end|>" in answers["auto"] and "<|im_end|>" not in answers["none"]
    assert answers["auto"].replace("<|im_end|>", "").startswith(answers["none"][:8])


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias": {"50": 1}}, "logit_bias"),
    ({"frobnicate": True}, "frobnicate"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),  # without tools
    ({"n": 2, "temperature": 0.0}, "n"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [{"role": "critic", "content": "hi"}]}, "messages.0.role"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": _schema_format({"type": "no-such-type"})}, "response_format"),
])
def test_unsupported_or_invalid_fields_are_400s_naming_them(server, body, param):
    request = {"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 4, **body}
    response = httpx.post(f"{server.api}/chat/completions", json=request, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error


def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    tokens = [httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "messages": messages},
                         headers=AUTH).json()["tokens"] for messages in (parts, joined)]
    assert tokens[0] == tokens[1]


def test_tokenize_and_detokenize_as_vllm_serves_them(server):
    client = server.client()
    usage = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1).usage
    chat = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "messages": ASK_WEATHER}, headers=AUTH)
    assert chat.status_code == 200 and chat.json()["count"] == usage.prompt_tokens
    text = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Hello there", "return_token_strs": True},
                      headers=AUTH).json()
    assert text["count"] == len(text["tokens"]) == len(text["token_strs"]) and text["max_model_len"] == 512
    back = httpx.post(f"{server.base_url}/detokenize", json={"tokens": text["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": "Hello there"}
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**9]}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_malformed_bodies_get_openai_errors(server):
    for body in (b'{"model": ', b"[" * 100_000 + b"]" * 100_000,
                 b'{"model": "%s", "messages": ' % MODEL.encode() + b'{"a": ' * 5000 + b"1" + b"}" * 5001):
        response = httpx.post(f"{server.api}/chat/completions", content=body,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(f"{server.base_url}/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_a_body_past_the_bound_is_a_413_declared_or_not(server):
    big = b'{"model": "x", "prompt": "' + b"a" * (4 * 2**20) + b'"}'
    declared = httpx.post(f"{server.api}/completions", content=big, headers={**AUTH, "Content-Type":
                                                                             "application/json"})
    streamed = httpx.post(f"{server.api}/completions", content=iter([big[i:i + 2**16]
                                                                     for i in range(0, len(big), 2**16)]),
                          headers={**AUTH, "Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_huge_bodies_do_not_stall_other_requests(server):
    """Three 10 MB bodies at once (two declared, one chunked); /health and a small chat still answer at once."""
    big = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"word " * (2 * 2**20) + b'"}'
    client = server.client()

    def send(chunked: bool):
        content = iter([big[i:i + 2**16] for i in range(0, len(big), 2**16)]) if chunked else big
        return httpx.post(f"{server.api}/completions", content=content, timeout=120,
                          headers={**AUTH, "Content-Type": "application/json"}).status_code

    def timed(call):
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1)  # warm
    with ThreadPoolExecutor(5) as pool:
        uploads = [pool.submit(send, chunked) for chunked in (False, False, True)]
        health = pool.submit(timed, lambda: httpx.get(f"{server.base_url}/health").raise_for_status())
        chat = pool.submit(timed, lambda: client.chat.completions.create(model=MODEL, messages=ASK_WEATHER,
                                                                          max_tokens=1))
        assert [u.result() for u in uploads] == [413, 413, 413]
        # 0.5 s is the target (measured in bench/); the bound here is generous for a loaded 2-core CI machine
        assert health.result() < 3 and chat.result() < 5, (health.result(), chat.result())
