"""`thresher serve` as users see it: a real server process on 127.0.0.1, the official openai client, real HTTP.

The last test kills the engine under the server, so it stays last in this file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _chat(client, messages=QUESTION, max_tokens=12, **extra_body):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                          extra_body=extra_body or None)


def test_engine_start_answered_503_not_a_hang(server):
    assert server.startup_statuses[0] == 503 and server.startup_statuses[-1] == 200
    assert server.startup_chat_status == 503


def test_chat_completion_reports_usage_and_what_was_applied(server):
    response = _chat(server.client())
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model_extra["sparsity"] == 0.0 and response.model_extra["steering"] is None


def test_streamed_chat_equals_the_unstreamed_answer(server):
    client = server.client()
    whole = _chat(client).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 12


def test_text_completion_with_logprobs_streamed_and_not(server):
    client = server.client()
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0.0, logprobs=2)
    choice = response.choices[0]
    assert choice.text and len(choice.logprobs.tokens) == response.usage.completion_tokens == 6
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0.0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_n_seed_stop_and_chat_logprobs(server):
    client = server.client()
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=3, temperature=1.0,
                                              seed=7, logprobs=True, top_logprobs=3)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert all(len(c.logprobs.content[0].top_logprobs) == 3 for c in response.choices)
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=3, temperature=1.0,
                                           seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    whole = _chat(client, max_tokens=20).choices[0].message.content
    cut = whole.split()[1]
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0.0,
                                             stop=[cut]).choices[0]
    assert cut not in stopped.message.content and stopped.finish_reason == "stop"


def test_sparsity_and_steering_ride_in_extra_body(server):
    client = server.client()
    dense = _chat(client, max_tokens=16)
    sparse = _chat(client, max_tokens=16, sparsity=0.5)
    assert sparse.model_extra["sparsity"] == 0.5
    steered = _chat(client, max_tokens=16, steering={"vectors": [{"name": "positive", "strength": 3.0}]})
    assert steered.model_extra["steering"] == {"layer": 15, "features": [],
                                               "vectors": [{"name": "positive", "strength": 3.0}]}
    assert steered.choices[0].message.content != dense.choices[0].message.content
    assert sparse.choices[0].message.content != dense.choices[0].message.content


def test_the_reference_artifact_serves_every_level_and_vector(server):
    client = server.client()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    vectors = [v["name"] for v in httpx.get(f"{server.api}/steering/vectors", headers=headers).json()["data"]]
    assert sorted(vectors) == ["formal", "positive", "terse"]
    dense = _chat(client, max_tokens=12).choices[0].message.content
    answers = {}
    for level in (0.25, 0.4, 0.5, 0.6):
        response = _chat(client, max_tokens=12, sparsity=level)
        assert response.model_extra["sparsity"] == level
        answers[level] = response.choices[0].message.content
    assert answers[0.6] != dense
    for name in vectors:
        response = _chat(client, max_tokens=12, steering={"vectors": [{"name": name, "strength": 3.0}]})
        assert response.model_extra["steering"]["vectors"] == [{"name": name, "strength": 3.0}]
        assert response.choices[0].message.content != dense, name


def test_concurrent_requests_with_mixed_steering_each_get_their_own_result(server):
    client = server.client()
    specs = [None, {"vectors": [{"name": "formal", "strength": 2.0}]}, None,
             {"vectors": [{"name": "terse", "strength": 2.0}]}, {"features": [{"id": 3, "strength": 6.0}]}, None,
             {"vectors": [{"name": "positive", "strength": -2.0}]}, None]
    prompts = [[{"role": "user", "content": f"Tell me a fact about the number {i}."}] for i in range(len(specs))]

    def ask(i):
        extra = {"steering": specs[i]} if specs[i] else {}
        return _chat(client, prompts[i], max_tokens=10, **extra).choices[0].message.content

    solo = [ask(i) for i in range(len(specs))]
    with ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(ask, range(len(specs))))
    for i, spec in enumerate(specs):
        if spec is None:  # unsteered rows in a steered batch: exactly their solo tokens
            assert together[i] == solo[i], i
    unsteered_neighbours = [_chat(client, prompts[i], max_tokens=10).choices[0].message.content
                            for i, spec in enumerate(specs) if spec]
    assert sum(s != u for s, u in zip([together[i] for i, spec in enumerate(specs) if spec],
                                      unsteered_neighbours)) >= 3, "steering took effect per request"


@pytest.mark.parametrize(("extra", "param"), [
    ({"sparsity": 0.33}, "sparsity"),
    ({"sparsity": 1.5}, "sparsity"),
    ({"steering": {"features": [{"id": 10**6, "strength": 1.0}]}}, "steering.features.0.id"),
    ({"steering": {"vectors": [{"name": "sarcastic", "strength": 1.0}]}}, "steering.vectors.0.name"),
    ({"steering": {"vectors": [{"name": "formal", "strength": 500.0}]}}, "steering.vectors.0.strength"),
    ({"steering": {"features": [{"id": i, "strength": 1.0} for i in range(9)]}}, "steering.features"),
    ({"steering": {"features": [{"id": 1, "clamp": -1.0}]}}, "steering.features.0.clamp"),
    ({"steering": {"features": [{"id": 1, "clamp": 2.0, "strength": 1.0}]}}, "steering.features.0"),
    ({"steering": {"features": [{"id": 1}]}}, "steering.features.0"),
    ({"steering": {"features": "all"}}, "steering.features"),
    ({"steering": {"layer": 2, "vectors": [{"name": "formal", "strength": 1.0}]}}, "steering.layer"),
    ({"attention": {"budget": -1}}, "attention.budget"),
    ({"attention": {"budget": 1.5}}, "attention.budget"),
    ({"attention": {"budget": "256"}}, "attention.budget"),
    ({"attention": {"budget": 64}}, "attention.budget"),
    ({"attention": {"budget": 256, "window": 64}}, "attention.window"),
    ({"attention": 256}, "attention"),
    ({"attention": {"budget": 2**31 + 1}}, "attention.budget"),
])
def test_bad_extensions_are_400s_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        _chat(server.client(), **extra)
    assert error.value.status_code == 400 and error.value.body["param"] == param, error.value.body
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["message"]


def test_attention_budget_reads_fewer_pages_and_is_echoed(server):
    """A 400-token prompt: a budget covering the context decodes as dense attention does (both after the same
    prompt was cached); a 128-token budget reads 4 of its 13-14 pages per step, as the metrics show."""
    from thresher.data import default_texts

    client = server.client()
    assert client.models.list().data[0].model_extra["attention"] == {
        "selects_pages": True, "page_size": 32, "min_budget": 128, "default_budget": 0}
    prompt = default_texts("evaluation")[0][:1800]

    def complete(budget=None):
        extra = None if budget is None else {"attention": {"budget": budget}}
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.0,
                                         extra_body=extra)

    first = complete()
    assert first.model_extra["attention"] == {"budget": 0} and 350 < first.usage.prompt_tokens < 500
    dense, covered = complete(), complete(512)
    assert covered.model_extra["attention"] == {"budget": 512}
    assert covered.choices[0].text == dense.choices[0].text
    read, total = (server.metric(f"thresher_attention_pages_{name}_total") for name in ("read", "dense"))
    assert read == total > 0
    budgeted = 'thresher_requests_by_attention_budget_total{budget="128"}'
    requests_at_128 = server.metric(budgeted)  # the playground's test sends some too
    small = complete(128)
    assert small.model_extra["attention"] == {"budget": 128} and small.choices[0].text
    more_read, more_total = (server.metric(f"thresher_attention_pages_{name}_total") for name in ("read", "dense"))
    assert 0.25 < (more_read - read) / (more_total - total) < 0.35
    assert server.metric("thresher_attention_pages_read_fraction") < 0.35
    assert server.metric(budgeted) == requests_at_128 + 1


def test_non_finite_strength_is_a_400(server):
    """JSON has no infinity, but 1e999 parses to it; the openai client refuses to send one, so raw HTTP does."""
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
            '"steering": {"vectors": [{"name": "formal", "strength": 1e999}]}}' % MODEL)
    response = httpx.post(f"{server.api}/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "steering.vectors.0.strength"


def test_other_errors_in_openai_shape(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=7.0)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    assert error.value.body["code"] == "context_length_exceeded" and error.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert error.value.body["param"] == "model" and "SmolLM2" in error.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as error:
        openai.OpenAI(base_url=server.api, api_key="wrong-key", max_retries=0).models.list()
    assert error.value.body["type"] == "authentication_error"
    keyless = httpx.post(f"{server.api}/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"
    assert _chat(client).choices[0].message.content, "the server keeps serving after bad requests"
    assert server.metric('thresher_errors_total{status="400"') >= 2


def test_catalog_vectors_models_and_schema(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["sparsity_levels"] == [0.0, 0.25, 0.4, 0.5, 0.6]
    hits = httpx.get(f"{server.api}/steering/features", params={"q": "the", "limit": 5}, headers=headers).json()
    assert hits["layer"] == 15 and 0 < len(hits["data"]) <= 5
    feature = hits["data"][0]
    detail = httpx.get(f"{server.api}/steering/features/{feature['id']}", headers=headers).json()
    assert detail["id"] == feature["id"] and detail["top_contexts"]
    missing = httpx.get(f"{server.api}/steering/features/999999", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "feature_not_found"
    vectors = httpx.get(f"{server.api}/steering/vectors", headers=headers).json()["data"]
    assert {v["name"] for v in vectors} == {"formal", "positive", "terse"}
    schema = httpx.get(f"{server.base_url}/openapi.json").json()["components"]["schemas"]
    assert {"sparsity", "steering", "attention"} <= set(schema["ChatCompletionRequest"]["properties"])
    assert "SteeringSpec" in schema


def test_client_disconnect_mid_stream_aborts_the_request(server):
    aborted_before = server.metric("thresher_aborted_requests_total")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.api}/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as response:
        events = response.iter_lines()
        assert next(e for e in events if e.startswith("data:"))
    # 400 tokens take ~15 s on 2 cores; an aborted request leaves the engine at once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("thresher_running_requests") == 0 and server.metric(
                "thresher_aborted_requests_total") > aborted_before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected stream was not aborted")


def test_metrics_count_requests_tokens_levels_and_steering(server):
    assert server.metric('thresher_requests_total{endpoint="/v1/chat/completions",outcome="ok"}') > 5
    assert server.metric("thresher_generation_tokens_total") > 50
    assert server.metric('thresher_requests_by_sparsity_total{level="0.5"}') >= 1
    assert server.metric('thresher_steered_requests_total{kind="vectors"}') >= 1
    assert server.metric("thresher_time_to_first_token_seconds_count") > 5


def test_a_dead_engine_answers_503_never_hangs(server):
    """Kill the engine core under the running server (last test: it ends this server's useful life)."""
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the server runs its engine in a child process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.base_url}/health").status_code != 503:
        assert time.monotonic() < deadline, "/health still says ok after the engine died"
        time.sleep(0.5)
    started = time.monotonic()
    response = httpx.post(f"{server.api}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "messages": QUESTION, "max_tokens": 4}, timeout=30)
    assert response.status_code == 503 and time.monotonic() - started < 10
    assert json.loads(response.text)["error"]["code"] == "engine_unavailable"
