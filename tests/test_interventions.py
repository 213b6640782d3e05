"""Per-row interventions inside one batched forward pass (DESIGN.md invariants): rows that ask
for nothing are untouched, neutral settings are exact no-ops, and each per-row edit equals the
offline edit of the weights it stands for. Small random profiles keep this fast; the trained
ones are checked by the calibration tests and measured by the benchmarks."""

from __future__ import annotations

import pytest
import torch

from server.engine.offline import OfflineGenerator
from server.engine.request import SamplingParams
from server.interventions.eigenshift import EigenShiftProfile
from server.interventions.memorization import MemorizationProfile
from server.interventions.plan import InterventionPlan
from server.interventions.registry import InterventionError, InterventionRegistry
from server.interventions.sae import SaeConfig, SaeFormatError, SparseAutoencoder
from server.interventions.vectors import SteeringVector
from server.model.layers import Linear
from server.runtime import load_model
from server.settings import ServerSettings

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
SAE_LAYER = 6


def random_sae(hidden: int, layer: int = SAE_LAYER, d_sae: int = 256, k: int = 16, seed: int = 0,
               name: str = "test-sae", architecture: str = "topk") -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, hidden, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    cfg = SaeConfig(architecture=architecture, d_in=hidden, d_sae=d_sae, k=k if architecture == "topk" else None,
                    hook_name=f"blocks.{layer}.hook_resid_post", model_name="test")
    threshold = torch.full((d_sae,), 0.1) if architecture == "jumprelu" else None
    return SparseAutoencoder(cfg, W_dec.T.clone(), torch.zeros(d_sae), W_dec, torch.zeros(hidden), threshold, name)


def random_eigenshift(model, k: int = 8, alpha: float = 0.3, name: str = "test-eig") -> EigenShiftProfile:
    U, S, Vh = torch.linalg.svd(model.head.weight.float().cpu(), full_matrices=False)
    pick = torch.arange(k) * 7  # any k components
    return EigenShiftProfile(name, U[:, pick].contiguous(), S[pick].contiguous(), Vh[pick].T.contiguous(), alpha)


def random_memorization(model, granularity: str, fraction: float = 0.02, seed: int = 0,
                        name: str = "test-mem", rank: int = 4, layer_step: int = 3) -> MemorizationProfile:
    """Neuron or weight masks of `fraction`, or a subspace of `rank` in every `layer_step`-th layer."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    if granularity == "neuron":
        pruned = torch.rand(c.num_layers, c.intermediate_size, generator=g) < fraction
        return MemorizationProfile(name, "neuron", c.num_layers, c.intermediate_size, pruned_neurons=pruned)
    if granularity == "subspace":
        basis = torch.zeros(c.num_layers, c.intermediate_size, rank)
        for layer in range(0, c.num_layers, layer_step):
            basis[layer] = torch.linalg.qr(torch.randn(c.intermediate_size, rank, generator=g))[0]
        mean = 0.05 * torch.randn(c.num_layers, c.intermediate_size, generator=g)
        return MemorizationProfile(name, "subspace", c.num_layers, c.intermediate_size, basis=basis,
                                   reference_mean=mean)
    n = int(fraction * c.hidden_size * c.intermediate_size)
    layers = torch.randint(0, c.num_layers, (n,), generator=g, dtype=torch.int32)
    rows = torch.randint(0, c.hidden_size, (n,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, c.intermediate_size, (n,), generator=g, dtype=torch.int32)
    keys = torch.unique(layers.long() * 10**8 + rows.long() * 10**4 + cols.long())  # no duplicates
    index = ((keys // 10**8).int(), (keys // 10**4 % 10**4).int(), (keys % 10**4).int())
    return MemorizationProfile(name, "weight", c.num_layers, c.intermediate_size, weight_index=index)


@pytest.fixture(scope="module")
def loaded():
    # float32 so that per-row corrections can be compared to offline weight edits tightly
    return load_model(ServerSettings(max_model_len=256, wina_profile="none", dtype="float32",
                                     load_interventions=False, log_level="warning"))


def make_registry(loaded) -> InterventionRegistry:
    """One random profile of each kind (tests/test_gpu.py builds the same on CUDA)."""
    model = loaded.model
    reg = InterventionRegistry(model, loaded.fingerprint, loaded.name)
    reg.add_sae(random_sae(model.config.hidden_size))
    reg.add_vector(SteeringVector("two-layer", (3, 9), torch.randn(2, model.config.hidden_size,
                                                                   generator=torch.Generator().manual_seed(1))))
    reg.add_eigenshift(random_eigenshift(model))
    reg.add_memorization(random_memorization(model, "neuron", name="mem-neuron"))
    reg.add_memorization(random_memorization(model, "weight", name="mem-weight"))
    reg.add_memorization(random_memorization(model, "subspace", name="mem-subspace"))
    return reg


@pytest.fixture(scope="module")
def registry(loaded):
    return make_registry(loaded)


def _batch(tokenizer, prompts):
    ids = [tokenizer(p).input_ids for p in prompts]
    T = min(map(len, ids))
    return torch.tensor([i[:T] for i in ids])  # [B, T], cut to a common length


def run(model, tokens, rows, all_logits=False):
    """Prefill every row (its prompt-step plan), then one batched decode step: -> logits [B, V]
    (or the prefill logits [B, T-1, V] of every row with all_logits)."""
    B, T = tokens.shape
    device = model.device  # the same checks run on CUDA (tests/test_gpu.py)
    tokens = tokens.to(device)
    cache = model.new_cache(B)
    prefill = []
    for row in range(B):
        plan = InterventionPlan.build([rows[row]], prompt_step=True, device=device)
        prefill.append(model(tokens[row:row + 1, :-1], torch.tensor([row], device=device),
                             torch.tensor([0], device=device), cache, all_logits=True, edits=plan)[0])
    plan = InterventionPlan.build(list(rows), prompt_step=False, device=device)
    decode = model(tokens[:, -1:], torch.arange(B, device=device), torch.full((B,), T - 1, device=device), cache,
                   edits=plan)
    return torch.stack(prefill) if all_logits else decode


def test_no_plan_when_no_row_asks(registry):
    assert InterventionPlan.build([None, None], prompt_step=False, device=torch.device("cpu")) is None
    assert registry.resolve(None) is None and registry.resolve([]) is None


ASKING_ENTRIES = [
    {"type": "steer", "sae": "test-sae", "feature": 5, "strength": 8.0},
    {"type": "steer", "sae": "test-sae", "feature": 5, "clamp": 30.0},
    {"type": "steer", "vector": "two-layer", "strength": 2.0},
    {"type": "eigenshift", "profile": "test-eig", "alpha": 0.0},
    {"type": "unmemorize", "profile": "mem-neuron"},
    {"type": "unmemorize", "profile": "mem-weight"},
    {"type": "unmemorize", "profile": "mem-subspace"},
]
NEUTRAL_ENTRIES = [
    {"type": "steer", "sae": "test-sae", "feature": 5, "strength": 0.0},
    {"type": "steer", "vector": "two-layer", "strength": 0.0},
    {"type": "eigenshift", "profile": "test-eig", "alpha": 1.0},
]


@pytest.mark.parametrize("entry", ASKING_ENTRIES)
def test_plain_rows_untouched_by_neighbours(loaded, registry, entry):
    model = loaded.model
    tokens = _batch(loaded.tokenizer, PROMPTS)
    plain = run(model, tokens, [None, None, None])
    asked = registry.resolve([entry])
    mixed = run(model, tokens, [None, asked, None])
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    assert not torch.allclose(mixed[1], plain[1], atol=1e-3)  # the asking row did change


@pytest.mark.parametrize("entry", NEUTRAL_ENTRIES)
def test_neutral_settings_are_exact_noops(loaded, registry, entry):
    model = loaded.model
    tokens = _batch(loaded.tokenizer, PROMPTS[:2])
    plain = run(model, tokens, [None, None])
    same = run(model, tokens, [registry.resolve([entry])] * 2)
    assert torch.equal(plain, same)


def test_clamp_to_own_value_changes_nothing(loaded, registry):
    model = loaded.model
    sae = registry.saes["test-sae"]
    ids = torch.tensor([loaded.tokenizer("Hello there").input_ids[:2]])  # BOS-free: 2 tokens, clamp acts on position 1
    latents = sae.encode(model.residual_stream(ids, sae.layer)[0, 1])  # [d_sae]
    active = int(latents.argmax())
    inactive = int((latents == 0).nonzero()[0])
    plain = run(model, ids, [None], all_logits=True)
    for feature in (active, inactive):
        row = registry.resolve([{"type": "steer", "sae": "test-sae", "feature": feature,
                                 "clamp": float(latents[feature])}])
        clamped = run(model, ids, [row], all_logits=True)
        torch.testing.assert_close(clamped, plain, atol=2e-4, rtol=0)  # float32 re-encode round-off
    pushed = run(model, ids, [registry.resolve([{"type": "steer", "sae": "test-sae", "feature": inactive,
                                                 "clamp": 50.0}])])
    assert not torch.allclose(pushed, run(model, ids, [None]), atol=1e-2)


def test_clamp_changes_only_that_latent(loaded, registry):
    """After the clamp, the SAE's reconstruction differs from before by exactly (V - z) W_dec[f]."""
    model = loaded.model
    sae = registry.saes["test-sae"]
    ids = torch.tensor([loaded.tokenizer("The quick brown fox").input_ids])
    h = model.residual_stream(ids, sae.layer)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    plan = InterventionPlan.build([registry.resolve([{"type": "steer", "sae": "test-sae", "feature": 3,
                                                      "clamp": 7.0}])], prompt_step=True, device=model.device)
    edited = plan.residual(sae.layer, h.clone(), positions)
    z = sae.encode(h)[0, :, 3]
    expected = h[0] + (7.0 - z).unsqueeze(1) * sae.W_dec[3]
    expected[0] = h[0, 0]  # position 0 (BOS / attention sink) is left alone
    torch.testing.assert_close(edited[0], expected, atol=1e-5, rtol=1e-5)


def test_add_equals_adding_to_residual(loaded, registry):
    model = loaded.model
    sae = registry.saes["test-sae"]
    ids = torch.tensor([loaded.tokenizer("The quick brown fox").input_ids])
    h = model.residual_stream(ids, sae.layer)
    plan = InterventionPlan.build([registry.resolve([{"type": "steer", "sae": "test-sae", "feature": 9,
                                                      "strength": 4.0}])], prompt_step=True, device=model.device)
    edited = plan.residual(sae.layer, h.clone(), torch.arange(ids.shape[1]).unsqueeze(0))
    torch.testing.assert_close(edited, h + 4.0 * sae.W_dec[9], atol=1e-6, rtol=0)
    assert torch.equal(plan.residual(sae.layer + 1, h, None), h)  # other layers untouched


def test_generated_positions_skip_the_prompt(loaded, registry):
    entry = {"type": "steer", "vector": "two-layer", "strength": 3.0, "positions": "generated"}
    row = registry.resolve([entry])
    assert InterventionPlan.build([row], prompt_step=True, device=torch.device("cpu")).adds == {}
    assert set(InterventionPlan.build([row], prompt_step=False, device=torch.device("cpu")).adds) == {3, 9}


def test_eigenshift_equals_offline_head_edit(loaded, registry):
    """The per-row low-rank correction gives the logits of a head whose kept singular values were
    scaled by alpha (the paper's offline edit). Float32: the two differ only by summation order,
    about 1e-5 relative to logits of size ~10-30."""
    model = loaded.model
    profile = registry.eigenshift["test-eig"]
    tokens = _batch(loaded.tokenizer, PROMPTS)
    row = registry.resolve([{"type": "eigenshift", "profile": "test-eig", "alpha": 0.25}])
    corrected = run(model, tokens, [row, None, row])
    shared_head = model.head  # tied to the embedding: swap in an edited copy, never edit it in place
    model.head = Linear(profile.edited_head(shared_head.weight, 0.25), None)
    try:
        edited = run(model, tokens, [None, None, None])
    finally:
        model.head = shared_head
    torch.testing.assert_close(corrected[[0, 2]], edited[[0, 2]], atol=2e-3, rtol=1e-4)
    assert not torch.allclose(corrected[1], edited[1], atol=1e-3)  # row 1 kept the shared head


def test_sae_encoder_through_the_kernel_matches_torch(loaded, registry):
    """On CPU the registry computes the SAE encoder's product (clamps) with the model's kernel; its
    pre-activations equal torch's float32 matmul up to summation order."""
    sae = registry.saes["test-sae"]
    if loaded.model.dense_kernel is None:
        pytest.skip("no CPU kernel here: the SAE keeps torch's matmul")
    assert sae._encoder_product is not None
    x = torch.randn(8, 1, sae.cfg.d_in, generator=torch.Generator().manual_seed(3))
    expected = ((x - sae.b_dec) if sae.cfg.apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.pre_activation(x), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["mem-neuron", "mem-weight", "mem-subspace"])
def test_unmemorize_equals_offline_pruning(loaded, registry, name):
    """A masked row equals the model whose down_proj was edited offline (float32): weights
    pruned, or W (I - U U^T) plus the bias W U (m U) for a subspace. The weight-mask and subspace
    paths subtract their part after the dense product instead of leaving it out, and the edited
    copy runs torch's layers rather than the CPU kernel: differences of summation order only."""
    model = loaded.model
    profile, _ = registry.memorization[name]
    tokens = _batch(loaded.tokenizer, PROMPTS)
    row = registry.resolve([{"type": "unmemorize", "profile": name}])
    masked = run(model, tokens, [row, None, row], all_logits=True)
    masked_step = run(model, tokens, [row, None, row])  # the decode step: on CPU, the decode kernel
    originals, fused = [layer.mlp.down for layer in model.layers], model.decode_layers
    try:
        model.decode_layers = None  # the fused kernel layers hold the original down_proj
        for i, layer in enumerate(model.layers):
            weight, bias = profile.offline_down(i, layer.mlp.down.weight)
            layer.mlp.down = Linear(weight, bias)
        edited = run(model, tokens, [None, None, None], all_logits=True)
        edited_step = run(model, tokens, [None, None, None])
    finally:
        model.decode_layers = fused
        for layer, down in zip(model.layers, originals):
            layer.mlp.down = down
    torch.testing.assert_close(masked[[0, 2]], edited[[0, 2]], atol=2e-3, rtol=1e-4)
    assert not torch.allclose(masked[1], edited[1], atol=1e-3)
    torch.testing.assert_close(masked_step[[0, 2]], edited_step[[0, 2]], atol=2e-3, rtol=1e-4)
    assert not torch.allclose(masked_step[1], edited_step[1], atol=1e-3)


def test_two_subspaces_in_one_batch(loaded, registry):
    """The CPU decode kernel applies one subspace per layer call; rows asking for two different
    ones take the layer's parts instead, and each row still gets what it gets alone."""
    model = loaded.model
    if "mem-subspace-2" not in registry.memorization:
        registry.add_memorization(random_memorization(model, "subspace", seed=5, name="mem-subspace-2"))
    first = registry.resolve([{"type": "unmemorize", "profile": "mem-subspace"}])
    second = registry.resolve([{"type": "unmemorize", "profile": "mem-subspace-2"}])
    plan = InterventionPlan.build([first, second, None], prompt_step=False, device=model.device)
    assert plan.neurons(0).for_kernel() is None
    one = InterventionPlan.build([first, None, first], prompt_step=False, device=model.device)
    assert one.neurons(0).for_kernel() is not None and one.neurons(1) is None  # rank 4 in every third layer
    tokens = _batch(loaded.tokenizer, PROMPTS)
    both = run(model, tokens, [first, second, None])
    torch.testing.assert_close(both[0], run(model, tokens, [first, None, None])[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(both[1], run(model, tokens, [None, second, None])[1], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(both[2], run(model, tokens, [None, None, None])[2], atol=0, rtol=0)
    assert not torch.allclose(both[0], both[1], atol=1e-3)


def test_subspace_offset_is_the_reference_mean():
    """x - (x U - m U) U^T: an input equal to the reference mean leaves down_proj's input as it
    is; the part of x along U is replaced by m's."""
    g = torch.Generator().manual_seed(0)
    basis = torch.zeros(2, 16, 3)
    basis[1] = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    mean = torch.randn(2, 16, generator=g)
    profile = MemorizationProfile("p", "subspace", 2, 16, basis=basis, reference_mean=mean)
    assert profile.projection(0) is None and profile.pruned_count == 3
    weight = torch.randn(5, 16, generator=g)
    w, b = profile.offline_down(1, weight)
    torch.testing.assert_close(mean[1] @ w.T + b, mean[1] @ weight.T)
    x = torch.randn(16, generator=g)
    U = basis[1]
    expected = x - U @ (U.T @ x) + U @ (U.T @ mean[1])
    torch.testing.assert_close(x @ w.T + b, expected @ weight.T, atol=1e-5, rtol=1e-5)


def test_several_entries_compose(loaded, registry):
    """Entries at several layers, of several kinds, in one request: each one matters."""
    model = loaded.model
    tokens = _batch(loaded.tokenizer, PROMPTS[:1])
    entries = [{"type": "steer", "sae": "test-sae", "feature": 5, "strength": 6.0},
               {"type": "steer", "vector": "two-layer", "strength": 1.0},
               {"type": "eigenshift", "profile": "test-eig", "alpha": 0.5},
               {"type": "unmemorize", "profile": "mem-neuron"}]
    full = run(model, tokens, [registry.resolve(entries)])
    for drop in range(len(entries)):
        partial = run(model, tokens, [registry.resolve(entries[:drop] + entries[drop + 1:])])
        assert not torch.allclose(full, partial, atol=1e-3), entries[drop]


@pytest.mark.parametrize("entries, param, words", [
    ([{"type": "steer", "sae": "nope", "feature": 1, "strength": 1.0}], "interventions.0.sae", "nope"),
    ([{"type": "steer", "sae": "test-sae", "feature": 256, "strength": 1.0}], "interventions.0.feature", "256"),
    ([{"type": "steer", "vector": "missing-vec", "strength": 1.0}], "interventions.0.vector", "missing-vec"),
    ([{"type": "eigenshift", "profile": "toxic?"}], "interventions.0.profile", "toxic?"),
    ([{"type": "unmemorize", "profile": "canaries"}], "interventions.0.profile", "canaries"),
    ([{"type": "unmemorize", "profile": "mem-neuron"}, {"type": "unmemorize", "profile": "mem-neuron"}],
     "interventions.1", "twice"),
    ([{"type": "steer", "sae": "test-sae", "vector": "two-layer", "feature": 1, "strength": 1.0}],
     "interventions.0", "exactly one"),
    ([{"type": "steer", "sae": "test-sae", "feature": 1, "strength": 1.0, "clamp": 2.0}],
     "interventions.0", "exactly one"),
    ([{"type": "steer", "sae": "test-sae", "feature": 1, "strength": float("nan")}],
     "interventions.0.strength", "10000"),
    ([{"type": "steer", "sae": "test-sae", "feature": 1, "strength": 1e38}], "interventions.0.strength", "10000"),
    ([{"type": "steer", "sae": "test-sae", "feature": 1, "clamp": -1e30}], "interventions.0.clamp", "10000"),
    ([{"type": "eigenshift", "profile": "test-eig", "alpha": 1.5}], "interventions.0.alpha", "1"),
    ([{"type": "prune-everything"}], "interventions.0", "type"),
])
def test_bad_entries_name_what_is_wrong(registry, entries, param, words):
    with pytest.raises(InterventionError) as info:
        registry.resolve(entries)
    assert info.value.param == param
    assert words in str(info.value)


def test_applied_echo_fills_defaults(registry):
    row = registry.resolve([{"type": "eigenshift", "profile": "test-eig"},
                            {"type": "steer", "sae": "test-sae", "feature": 2, "clamp": 1.0}])
    assert row.applied[0] == {"type": "eigenshift", "profile": "test-eig", "alpha": 0.3}
    assert row.applied[1]["layer"] == SAE_LAYER and row.applied[1]["positions"] == "all"


def test_registry_refuses_mismatched_profiles(loaded):
    model = loaded.model
    reg = InterventionRegistry(model, loaded.fingerprint, loaded.name)
    with pytest.raises(SaeFormatError, match="d_in=64"):
        reg.add_sae(random_sae(64))
    other = random_sae(model.config.hidden_size)
    other.cfg.extra_metadata["neuronserve_model_fingerprint"] = "someone-else"
    with pytest.raises(SaeFormatError, match="fingerprint"):
        reg.add_sae(other)
    with pytest.raises(Exception, match="layers"):
        reg.add_vector(SteeringVector("far", (99,), torch.zeros(1, model.config.hidden_size)))


def test_engine_rows_same_greedy_tokens_alone_and_in_batch(loaded, registry):
    """Through the engine: a plain row's greedy tokens do not depend on its neighbours' steering,
    and two rows with the same steering and seed sample the same tokens alone and together."""
    gen = OfflineGenerator(loaded, registry, max_batch_size=4)
    tok = loaded.tokenizer
    prompts = [tok(p).input_ids for p in PROMPTS]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = gen.generate(prompts[:1], greedy)[0].token_ids
    steer = [{"type": "steer", "sae": "test-sae", "feature": 5, "strength": 12.0},
             {"type": "eigenshift", "profile": "test-eig", "alpha": 0.0}]
    batch = gen.generate(prompts, greedy, [None, steer, [{"type": "unmemorize", "profile": "mem-weight"}]])
    assert batch[0].token_ids == alone
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    one = gen.generate(prompts[1:2], sampled, [steer])[0].token_ids
    both = gen.generate([prompts[1], prompts[1], prompts[0]], sampled, [steer, steer, None])
    assert both[0].token_ids == one and both[1].token_ids == one


def test_registry_loads_llama_cpp_control_vectors(loaded, tmp_path):
    import numpy as np

    from tests.test_vectors import _write_control_vector

    hidden = loaded.model.config.hidden_size
    _write_control_vector(tmp_path / "vector-calm.gguf", {4: np.ones(hidden, dtype=np.float32),
                                                          5: np.full(hidden, 2.0, dtype=np.float32)})
    _write_control_vector(tmp_path / "vector-wide.gguf", {4: np.ones(hidden + 1, dtype=np.float32)})
    reg = InterventionRegistry(loaded.model, loaded.fingerprint, loaded.name)
    reg.load([tmp_path])
    assert reg.vectors["calm"].layers == (4, 5)
    assert [r["path"] for r in reg.refused] == [str(tmp_path / "vector-wide.gguf")]
    row = reg.resolve([{"type": "steer", "vector": "calm", "strength": 0.5}])
    assert [(a.layer, float(a.vector[0])) for a in row.adds] == [(4, 0.5), (5, 1.0)]


def test_other_models_profiles_refused_quietly_in_their_own_directory(loaded, tmp_path, caplog):
    """profiles/<other model>/ is the layout calibration writes for another model: refused, listed,
    logged at INFO. The same file anywhere else is a warning (someone put it there for this model)."""
    import logging

    from server.interventions.memorization import save_memorization_profile

    profile = random_memorization(loaded.model, "neuron", name="theirs")
    kwargs = {"model_fingerprint": "0123456789abcdef", "model_name": "Other-Model 7B", "parameters": {},
              "data": {}, "quality": {}}
    own_dir = save_memorization_profile(tmp_path / "other-model-7b" / "memorization-theirs.safetensors", profile,
                                        **kwargs)
    misplaced = save_memorization_profile(tmp_path / "memorization-theirs.safetensors", profile, **kwargs)
    reg = InterventionRegistry(loaded.model, loaded.fingerprint, loaded.name)
    with caplog.at_level(logging.INFO, logger="server.interventions.registry"):
        reg.load([tmp_path])
    assert sorted(r["path"] for r in reg.refused) == sorted([str(own_dir), str(misplaced)])
    levels = {record.getMessage().split()[2].rstrip(":"): record.levelno for record in caplog.records
              if record.getMessage().startswith("not loading")}
    assert levels == {str(own_dir): logging.INFO, str(misplaced): logging.WARNING}


@pytest.mark.parametrize("method", ["sae", "vector", "eigenshift", "memorization"])
def test_calibrate_commands_are_wired(method):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "server.cli", "calibrate", method, "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"neuronserve calibrate {method}" in done.stdout
