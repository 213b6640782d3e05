"""The `interventions` request field over HTTP: profiles found at start (and refused when made for
another model), echo of what was applied, 400s that name the bad entry, per-row isolation inside
shared batches, the compare endpoint, streaming and the Prometheus counter."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server.api.serving import parse_default_interventions
from server.interventions.memorization import save_memorization_profile
from server.interventions.vectors import SteeringVector, save_vector_profile
from server.interventions.eigenshift import save_eigenshift_profile
from server.model.loader import load_checkpoint
from server.settings import ServerSettings
from tests.conftest import live_server
from tests.test_interventions import random_eigenshift, random_memorization, random_sae

GREEDY = dict(temperature=0.0, ignore_eos=True)
STEER = {"type": "steer", "sae": "sae-test", "feature": 5, "strength": 40.0}


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    """A random SAE, vector, EigenShift and memorization profile made for the default model, and
    an SAE made for a narrower model (refused at start)."""
    settings = ServerSettings()
    ckpt = load_checkpoint(settings.model, settings.cache_dir)
    hidden = ckpt.hf_config.hidden_size
    directory = tmp_path_factory.mktemp("profiles") / "smollm2"
    sae = random_sae(hidden, name="sae-test")
    sae.cfg.extra_metadata["neuronserve_model_fingerprint"] = ckpt.fingerprint
    sae.save(directory / "sae-test")
    random_sae(64, name="sae-narrow").save(directory / "sae-narrow")
    meta = dict(model_fingerprint=ckpt.fingerprint, model_name="test", parameters={}, data={}, quality={})
    save_vector_profile(directory / "vector-calm.safetensors",
                        SteeringVector("calm", (8,), torch.randn(1, hidden, generator=torch.Generator().manual_seed(3)) * 6),
                        **meta)

    class HeadOnly:  # what random_eigenshift / random_memorization read from a model
        class config:
            num_layers = ckpt.hf_config.num_hidden_layers
            intermediate_size = ckpt.hf_config.intermediate_size
            hidden_size = hidden

        class head:
            weight = ckpt.state_dict["model.embed_tokens.weight"].float()

    save_eigenshift_profile(directory / "eigenshift-toxicity.safetensors",
                            random_eigenshift(HeadOnly, name="toxicity"), **meta)
    save_memorization_profile(directory / "memorization-canaries.safetensors",
                              random_memorization(HeadOnly, "neuron", fraction=0.05, name="canaries"), **meta)
    return directory.parent


@pytest.fixture(scope="module")
def steer_server(profile_dir):
    with live_server(profiles=[profile_dir]) as s:
        yield s


@pytest.fixture()
def http(steer_server):
    with httpx.Client(base_url=steer_server.base_url, timeout=300) as c:
        yield c


def complete(http, **body):
    r = http.post("/v1/completions", json={"max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_profiles_listed_and_mismatched_refused(http):
    listing = http.get("/v1/interventions").json()
    names = {(e["type"], e.get("name") or e.get("id")) for e in listing["data"]}
    assert {("sae", "sae-test"), ("vector", "calm"), ("eigenshift", "toxicity"),
            ("unmemorize", "canaries")} <= names
    refused = [r for r in listing["refused"] if "sae-narrow" in r["path"]]
    assert refused and "d_in=64" in refused[0]["reason"]


def test_applied_interventions_are_echoed(http):
    body = complete(http, prompt="Hello", interventions=[STEER, {"type": "eigenshift", "profile": "toxicity"}])
    assert body["interventions"] == [{**STEER, "positions": "all", "layer": 6},
                                     {"type": "eigenshift", "profile": "toxicity", "alpha": 0.3}]
    assert complete(http, prompt="Hello")["interventions"] == []


@pytest.mark.parametrize("entry, param, words", [
    ({"type": "steer", "sae": "sae-narrow", "feature": 1, "strength": 1.0}, "interventions.0.sae", "sae-narrow"),
    ({"type": "steer", "sae": "sae-test", "feature": 9999, "strength": 1.0}, "interventions.0.feature", "9999"),
    ({"type": "steer", "vector": "angry", "strength": 1.0}, "interventions.0.vector", "angry"),
    ({"type": "unmemorize", "profile": "secrets"}, "interventions.0.profile", "secrets"),
    ({"type": "steer", "sae": "sae-test", "feature": 1}, None, "strength"),
    ({"type": "steer", "sae": "sae-test", "feature": 1, "strength": 1e38}, "interventions.0.strength", "10000"),
    ({"type": "teleport"}, None, "type"),
])
def test_bad_interventions_are_400_naming_them(http, entry, param, words):
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "interventions": [entry]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_strength_zero_equals_no_steering(http):
    plain = complete(http, prompt="The ocean is", **GREEDY)["choices"][0]["text"]
    zero = complete(http, prompt="The ocean is", interventions=[{**STEER, "strength": 0.0}], **GREEDY)
    steered = complete(http, prompt="The ocean is", interventions=[STEER], **GREEDY)
    assert zero["choices"][0]["text"] == plain
    assert steered["choices"][0]["text"] != plain


def test_plain_request_unchanged_by_steered_neighbours(http):
    prompt = "Write one sentence about trains."
    alone = complete(http, prompt=prompt, max_tokens=12, **GREEDY)["choices"][0]["text"]
    neighbours = [dict(prompt=f"Item {i}:", max_tokens=16, interventions=entries, **GREEDY) for i, entries in
                  enumerate([[STEER], [{"type": "unmemorize", "profile": "canaries"}],
                             [{"type": "eigenshift", "profile": "toxicity", "alpha": 0.0}],
                             [{"type": "steer", "vector": "calm", "strength": 2.0, "positions": "generated"}]])]
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(complete, http, **n) for n in neighbours[:2]]
        target = pool.submit(complete, http, prompt=prompt, max_tokens=12, **GREEDY)
        futures += [pool.submit(complete, http, **n) for n in neighbours[2:]]
        assert target.result()["choices"][0]["text"] == alone
        for f in futures:
            f.result()


def test_compare_returns_both_sides_of_one_batch(http):
    body = {"prompt": "My favourite food is", "max_tokens": 10, "temperature": 0.8, "seed": 11,
            "interventions": [STEER]}
    r = http.post("/v1/steer/compare", json=body)
    assert r.status_code == 200, r.text
    both = r.json()
    plain = {k: v for k, v in body.items() if k != "interventions"}
    assert both["default"]["text"] == complete(http, **plain)["choices"][0]["text"]
    assert both["steered"]["text"] == complete(http, **body)["choices"][0]["text"]
    assert both["default"]["text"] != both["steered"]["text"]
    assert both["interventions"][0]["sae"] == "sae-test"
    assert http.post("/v1/steer/compare", json={"prompt": "x"}).status_code == 400
    for field, value in (("n", 2), ("echo", True), ("stream", True)):
        r = http.post("/v1/steer/compare", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_compare_returns_logprobs_when_asked(http):
    body = {"prompt": "My favourite food is", "max_tokens": 4, "temperature": 0, "logprobs": 2,
            "interventions": [STEER]}
    both = http.post("/v1/steer/compare", json=body).json()
    for side, entries in (("default", {}), ("steered", {"interventions": [STEER]})):
        alone = complete(http, **{k: v for k, v in body.items() if k != "interventions"}, **entries)
        assert both[side]["logprobs"] == alone["choices"][0]["logprobs"]
    assert http.post("/v1/steer/compare", json={**body, "logprobs": None}).json()["default"]["logprobs"] is None


def test_streaming_carries_interventions_on_the_finishing_chunk(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True,
                                                      "interventions": [STEER]}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing and finishing[0]["interventions"][0]["feature"] == 5


def test_chat_takes_interventions(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                 "interventions": [{"type": "unmemorize", "profile": "canaries"}]})
    assert r.status_code == 200, r.text
    assert r.json()["interventions"] == [{"type": "unmemorize", "profile": "canaries"}]


def test_counter_by_type_and_profile(http):
    complete(http, prompt="Count me", interventions=[{"type": "unmemorize", "profile": "canaries"}])
    metrics = http.get("/metrics").text
    line = [m for m in metrics.splitlines() if m.startswith("neuronserve:intervention_requests_total")
            and 'type="unmemorize"' in m and 'profile="canaries"' in m]
    assert line and float(line[0].rsplit(" ", 1)[1]) >= 1


def test_openai_client_sends_interventions_in_extra_body(steer_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=steer_server.base_url + "/v1", api_key="none")
    out = client.completions.create(model=steer_server.state.serving.model_name, prompt="Hi", max_tokens=3,
                                    extra_body={"interventions": [STEER]})
    assert out.model_extra["interventions"][0]["sae"] == "sae-test"


def test_default_interventions_are_checked_at_start(steer_server):
    registry = steer_server.state.serving.registry
    good = ServerSettings(default_interventions=json.dumps([{"type": "eigenshift", "profile": "toxicity"}]))
    assert parse_default_interventions(good, registry) == [{"type": "eigenshift", "profile": "toxicity"}]
    for bad, words in (('[{"type": "eigenshift", "profile": "nope"}]', "nope"), ("{", "not JSON"),
                       ('{"type": "eigenshift"}', "JSON list")):
        with pytest.raises(ValueError, match=words):
            parse_default_interventions(ServerSettings(default_interventions=bad), registry)


def test_python_client_steers_and_compares(steer_server):
    from clients import NeuronServeClient

    with NeuronServeClient(steer_server.base_url) as client:
        listed = client.interventions()
        assert any(item.get("id") == "sae-test" for item in listed)
        out = client.complete("Hello", max_tokens=4, temperature=0.0, interventions=[STEER])
        assert out.interventions[0]["sae"] == "sae-test"
        both = client.compare("Hello", max_tokens=4, temperature=0.0, interventions=[STEER])
        assert both["steered"]["text"] == out.text
