"""End-to-end behaviour of the OpenAI-compatible API on the default model."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import LiveServer, live_server

GREEDY = {"temperature": 0}


def complete(client, **body):
    r = client.post("/v1/completions", json={"max_tokens": 16, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_models_version(client, server):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert client.get("/version").json()["version"]


def test_completion_shape_and_usage(client):
    body = complete(client, prompt="The capital of France is", **GREEDY)
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"].startswith(" Paris")
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}


def test_streaming_completion_equals_non_streaming(client):
    whole = complete(client, prompt="List three colors:", **GREEDY)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={
            "prompt": "List three colors:", "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == whole
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_and_stream(client):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["role"] == "assistant" and text
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": messages, "max_tokens": 12, "stream": True, **GREEDY}) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def test_tokenize_detokenize_round_trip(client):
    ids = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > ids["count"]


def test_greedy_row_unaffected_by_batch_neighbours(server, client):
    """The same greedy tokens alone and inside a batch of 7 differently-sampled requests."""
    prompt = "Write a short poem about the sea."
    alone = complete(client, prompt=prompt, max_tokens=32, **GREEDY)["choices"][0]["text"]
    others = [dict(prompt=f"Story {i}: the robot", temperature=0.5 + 0.1 * i, top_p=0.9, top_k=20 + i,
                   seed=i, max_tokens=40, ignore_eos=True,
                   logit_bias={str(100 + i): 5.0, "28": -100}) for i in range(7)]
    steps_before = server.state.serving.engine.steps
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, client, **o) for o in others[:4]]
        target = pool.submit(complete, client, prompt=prompt, max_tokens=32, **GREEDY)
        futures += [pool.submit(complete, client, **o) for o in others[4:]]
        batched = target.result()["choices"][0]["text"]
        for f in futures:
            f.result()
    total_tokens = 32 + sum(o["max_tokens"] for o in others)
    # Fewer engine steps than tokens proves the requests really shared forward passes.
    assert server.state.serving.engine.steps - steps_before < total_tokens / 2
    assert batched == alone


def test_seed_reproducible_and_n(client):
    body = dict(prompt="A random word:", temperature=1.0, seed=1234, max_tokens=12)
    a = complete(client, **body)["choices"][0]["text"]
    b = complete(client, **body)["choices"][0]["text"]
    assert a == b
    many = complete(client, **body, n=3)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert many["choices"][0]["text"] == a  # choice 0 uses the request's seed
    assert len({c["text"] for c in many["choices"]}) > 1


def test_stop_strings_and_stop_token_ids(client):
    body = complete(client, prompt="Count: 1, 2, 3,", max_tokens=30, stop=[" 6"], **GREEDY)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " 6"
    assert choice["text"] == " 4, 5,"
    kept = complete(client, prompt="Count: 1, 2, 3,", max_tokens=30, stop=[" 6"],
                    include_stop_str_in_output=True, **GREEDY)["choices"][0]["text"]
    assert kept == " 4, 5, 6"
    comma = client.post("/tokenize", json={"prompt": ","}).json()["tokens"][0]
    by_id = complete(client, prompt="Count: 1, 2, 3,", max_tokens=30, stop_token_ids=[comma], **GREEDY)
    assert by_id["choices"][0]["text"] == " 4" and by_id["choices"][0]["stop_reason"] == comma


def test_logit_bias_bans_a_token(client):
    first = complete(client, prompt="The capital of France is", max_tokens=1, logprobs=1, **GREEDY)
    token = first["choices"][0]["logprobs"]["tokens"][0]
    token_id = client.post("/tokenize", json={"prompt": token}).json()["tokens"][0]
    banned = complete(client, prompt="The capital of France is", max_tokens=1,
                      logit_bias={str(token_id): -100}, **GREEDY)
    assert banned["choices"][0]["text"] != first["choices"][0]["text"]


def test_min_tokens_and_ignore_eos(client):
    short = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 60, **GREEDY}).json()
    n = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and n < 60
    longer = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 60, "min_tokens": n + 5,
        **GREEDY}).json()
    assert longer["usage"]["completion_tokens"] >= n + 5
    forced = complete(client, prompt="Hi", max_tokens=40, ignore_eos=True, **GREEDY)
    assert forced["usage"]["completion_tokens"] == 40


def test_penalties_change_output(client):
    base = complete(client, prompt="the the the the", max_tokens=20, **GREEDY)["choices"][0]["text"]
    penalised = complete(client, prompt="the the the the", max_tokens=20, repetition_penalty=1.5,
                         frequency_penalty=1.0, presence_penalty=1.0, **GREEDY)["choices"][0]["text"]
    assert base.count("the") > penalised.count("the")


def test_echo_with_prompt_logprobs_for_lm_eval(client):
    """lm-evaluation-harness local-completions scoring: echo, logprobs, max_tokens 0 or 1."""
    for max_tokens in (0, 1):
        body = complete(client, prompt="Paris is the capital of France", echo=True, logprobs=1,
                        max_tokens=max_tokens, seed=1234, **GREEDY)
        lp = body["choices"][0]["logprobs"]
        assert body["choices"][0]["text"].startswith("Paris is the capital of France")
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == 6 + max_tokens
        assert all(v < 0 for v in lp["token_logprobs"][1:])
        assert "".join(lp["tokens"]) == body["choices"][0]["text"]
        assert lp["text_offset"][1] == len(lp["tokens"][0])
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert max(top.values()) >= value - 1e-6  # the top-1 alternative is at least as likely
        assert top[token] == value  # the scored token is always among them (OpenAI: up to logprobs+1)
        assert 1 <= len(top) <= 2
    # The generated token is greedy, so it is its own top-1 alternative.
    assert lp["top_logprobs"][-1] == {lp["tokens"][-1]: lp["token_logprobs"][-1]}


def test_completion_top_logprobs_hold_the_sampled_token(client):
    choice = complete(client, prompt="Once upon a", max_tokens=6, logprobs=0, temperature=1.0, seed=7)["choices"][0]
    lp = choice["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
        "top_logprobs": 3, **GREEDY}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and len(content[0]["top_logprobs"]) == 3
    assert content[0]["top_logprobs"][0]["token"] == content[0]["token"]  # greedy = most likely


def test_batch_of_prompts(client):
    body = complete(client, prompt=["One", "Two", "Three"], max_tokens=3, **GREEDY)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    alone = complete(client, prompt="Two", max_tokens=3, **GREEDY)["choices"][0]["text"]
    assert body["choices"][1]["text"] == alone


def test_client_disconnect_frees_slot_within_a_step(server):
    engine = server.state.serving.engine
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={
                "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True,
                "stream": True, **GREEDY}) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got == 3:
                    break
            assert engine.num_unfinished == 1
            steps_at_close = engine.steps
    deadline = time.monotonic() + 5
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.num_unfinished == 0
    # Disconnect is noticed when the next token is sent: the slot is free one or two steps later.
    assert engine.steps - steps_at_close <= 3


def _drop_non_streaming_request(server, headers: dict) -> None:
    """Sends a long non-streaming request, closes the connection as soon as the engine runs it
    (not after a fixed wait, which a fast machine outlasts), and expects the slot back."""
    engine = server.state.serving.engine
    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json", **headers},
                       body=json.dumps({"prompt": "Tell me a long story.", "max_tokens": 240, "ignore_eos": True,
                                        **GREEDY}))
    try:
        deadline = time.monotonic() + 30
        while engine.num_unfinished == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.num_unfinished == 1, "the request never started"
    finally:
        connection.close()
    deadline = time.monotonic() + 1.5  # the disconnect poll runs every 0.25 s
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_unfinished == 0, "the dropped request is still generating"


def test_client_disconnect_frees_slot_of_a_non_streaming_request(server):
    _drop_non_streaming_request(server, {})


def test_client_disconnect_frees_slot_behind_the_api_key_check():
    """The key check once ran as Starlette's BaseHTTPMiddleware, which hides disconnects."""
    with live_server(api_key="sekrit", warmup=False) as s:
        _drop_non_streaming_request(s, {"Authorization": "Bearer sekrit"})


def test_long_prompt_prefill_is_chunked_and_does_not_stall_streams(server, client):
    running_times, stop = [], threading.Event()

    def stream():
        with client.stream("POST", "/v1/completions", json={
                "prompt": "Count slowly:", "max_tokens": 150, "ignore_eos": True, "stream": True,
                **GREEDY}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    running_times.append(time.monotonic())
                if stop.is_set():
                    break

    t = threading.Thread(target=stream)
    t.start()
    while len(running_times) < 3:
        time.sleep(0.01)
    long_prompt = list(range(1000, 1450))  # 450 tokens = 8 chunks of 64
    submitted = time.monotonic()
    first = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1, **GREEDY})
    assert first.status_code == 200
    done = time.monotonic()
    stop.set()
    t.join()
    during = [x for x in running_times if submitted < x < done]
    # Each of the 8 prefill chunks shares a step with a decode of the running stream.
    assert len(during) >= 6


def test_metrics_move_with_a_request(client):
    def scrape() -> dict[str, float]:
        values = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("neuronserve:"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    complete(client, prompt="Metrics test", max_tokens=5, **GREEDY)
    after = scrape()
    label = '{model_name="SmolLM2-135M-Instruct"}'
    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "request_prompt_tokens_count",
                 "request_generation_tokens_count"):
        key = f"neuronserve:{name}{label}"
        assert after[key] > before.get(key, 0), name
    success = 'neuronserve:request_success_total{finished_reason="length",model_name="SmolLM2-135M-Instruct"}'
    assert after[success] == before.get(success, 0) + 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"neuronserve:{gauge}{label}" in after


def test_running_gauge_and_kv_usage_during_a_request(server, client):
    engine_metrics = server.state.metrics
    seen = []
    done = threading.Event()

    def watch():  # until the request has returned, however long a busy machine makes it take
        while not done.is_set():
            seen.append((engine_metrics.num_requests_running._value.get(),
                         engine_metrics.kv_cache_usage._value.get()))
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        complete(client, prompt="Gauge test", max_tokens=30, ignore_eos=True, **GREEDY)
    finally:
        done.set()
        t.join()
    assert max(r for r, _ in seen) >= 1 and max(u for _, u in seen) > 0


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    model = oa.models.list().data[0].id
    c = oa.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert c.choices[0].text.startswith(" Paris")
    chat = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=5, temperature=0)
    assert chat.choices[0].message.content
    chunks = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=5, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"bogus": 1})
    # guidellm / vLLM-benchmark style extra fields go through extra_body unchanged.
    ok = oa.completions.create(model=model, prompt="x", max_tokens=3, stop=None,
                               extra_body={"ignore_eos": True, "min_tokens": 3, "top_k": 5})
    assert ok.usage.completion_tokens == 3


def test_queue_full_gets_429_with_retry_after():
    with live_server(max_batch_size=1, max_queued_requests=1) as s, \
            httpx.Client(base_url=s.base_url, timeout=120) as c:
        long = {"prompt": "Busy", "max_tokens": 200, "ignore_eos": True, "stream": True, **GREEDY}
        with c.stream("POST", "/v1/completions", json=long) as first:
            next(first.iter_lines())  # running: holds the only slot
            engine = s.state.serving.engine
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(c.post, "/v1/completions", json={"prompt": "Queued", "max_tokens": 2})
                deadline = time.monotonic() + 10
                while engine.num_unfinished < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                rejected = c.post("/v1/completions", json={"prompt": "Rejected", "max_tokens": 2})
                assert rejected.status_code == 429
                assert rejected.headers["retry-after"] == "1"
                assert rejected.json()["error"]["type"] == "rate_limit_error"
        assert waiting.result().status_code == 200


def test_api_key_required_when_set():
    with live_server(api_key="sekrit", warmup=False) as s, httpx.Client(base_url=s.base_url) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_graceful_shutdown_finishes_in_flight_requests():
    s = LiveServer(shutdown_timeout=30, warmup=False).start()
    results = {}

    def run():
        with httpx.Client(base_url=s.base_url, timeout=120) as c:
            results["r"] = c.post("/v1/completions", json={"prompt": "Finish me", "max_tokens": 40,
                                                           "ignore_eos": True, **GREEDY})

    t = threading.Thread(target=run)
    t.start()
    engine = s.state.serving.engine
    deadline = time.monotonic() + 60
    while engine.num_unfinished == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    s.stop()  # what SIGTERM does in uvicorn: stop accepting, drain, then lifespan shutdown
    t.join()
    assert results["r"].status_code == 200
    assert results["r"].json()["usage"]["completion_tokens"] == 40
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.base_url + "/health", timeout=2)


def test_guidellm_style_stream_with_continuous_usage(client):
    """guidellm sends stop: null, ignore_eos and continuous_usage_stats: usage on every chunk."""
    with client.stream("POST", "/v1/completions", json={
            "model": "SmolLM2-135M-Instruct", "prompt": "Benchmark me", "max_tokens": 6, "stop": None,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        events = sse_events(r)
    chunks = [e for e in events[:-1] if e["choices"]]
    counts = [e["usage"]["completion_tokens"] for e in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert all(e["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] > 0 for e in chunks)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
