"""Per-request WINA sparsity over HTTP, with the committed profile of the default model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import live_server
from tests.test_api import GREEDY, complete, sse_events

PROMPT = "The three primary colors are"


def test_the_default_profile_is_loaded_and_listed(client):
    listing = client.get("/v1/interventions").json()
    wina = [p for p in listing["data"] if p["type"] == "wina"]
    assert [p["name"] for p in wina] == ["wina-uniform"]
    assert wina[0]["max_sparsity"] >= 0.9 - 1e-6
    assert wina[0]["parameters"]["criterion"] == "wina"
    assert listing["defaults"] == {"sparsity": 0.0, "interventions": []}


def test_response_reports_target_and_achieved(client):
    dense = complete(client, prompt=PROMPT, max_tokens=24, **GREEDY)
    assert dense["sparsity"] == {"target": 0.0, "achieved": 0.0}
    sparse = complete(client, prompt=PROMPT, max_tokens=24, sparsity=0.5, **GREEDY)
    assert sparse["sparsity"]["target"] == 0.5
    # calibrated on other text: the achieved share lands near the target, not on it
    assert abs(sparse["sparsity"]["achieved"] - 0.5) < 0.1, sparse["sparsity"]
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8, "sparsity": 0.25,
        **GREEDY}).json()
    assert chat["sparsity"]["target"] == 0.25 and 0.1 < chat["sparsity"]["achieved"] < 0.4


def test_streaming_reports_sparsity_on_the_finishing_chunk(client):
    with client.stream("POST", "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 8, "stream": True, "sparsity": 0.4, **GREEDY}) as r:
        events = sse_events(r)
    finishing = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["sparsity"]["target"] == 0.4
    assert all("sparsity" not in e for e in events[:-1] if e is not finishing[0])


def test_dense_request_unchanged_by_sparse_neighbours(client):
    alone = complete(client, prompt=PROMPT, max_tokens=24, **GREEDY)["choices"][0]["text"]

    def run(sparsity):
        return complete(client, prompt=PROMPT if sparsity == 0 else f"Story {sparsity}:", max_tokens=24,
                        sparsity=sparsity, **GREEDY)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [0.5, 0.0, 0.5, 0.9]))
    assert results[1]["choices"][0]["text"] == alone
    assert [r["sparsity"]["target"] for r in results] == [0.5, 0.0, 0.5, 0.9]


def test_sparsity_changes_the_output_at_high_levels(client):
    dense = complete(client, prompt=PROMPT, max_tokens=24, **GREEDY)["choices"][0]["text"]
    very_sparse = complete(client, prompt=PROMPT, max_tokens=24, sparsity=0.9, **GREEDY)["choices"][0]["text"]
    assert very_sparse != dense


def test_bad_sparsity_values(client):
    for value in (0.95, -0.1, "half", [0.5]):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "sparsity": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["param"] == "sparsity"


def test_sparsity_histogram(client):
    complete(client, prompt=PROMPT, max_tokens=4, sparsity=0.5, **GREEDY)
    text = client.get("/metrics").text
    assert 'neuronserve:request_sparsity_achieved_bucket{le="0.6",model_name="SmolLM2-135M-Instruct"}' in text
    count = [line for line in text.splitlines()
             if line.startswith("neuronserve:request_sparsity_achieved_count")]
    assert count and float(count[0].rsplit(" ", 1)[1]) >= 1


def test_without_a_profile_sparsity_is_refused_and_default_applies():
    with live_server(wina_profile="none") as s:
        import httpx

        with httpx.Client(base_url=s.base_url, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "sparsity": 0.5})
            assert r.status_code == 400 and "no WINA profile" in r.json()["error"]["message"]
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "sparsity": 0}).status_code == 200
            assert [p for p in c.get("/v1/interventions").json()["data"] if p["type"] == "wina"] == []
    with live_server(default_sparsity=0.5) as s:
        import httpx

        with httpx.Client(base_url=s.base_url, timeout=60) as c:
            body = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **GREEDY}).json()
            assert body["sparsity"]["target"] == 0.5
            body = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "sparsity": 0,
                                                   **GREEDY}).json()
            assert body["sparsity"] == {"target": 0.0, "achieved": 0.0}
