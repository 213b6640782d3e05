"""WINA sparsity inside our forward pass: dense equivalence, per-row independence, the kernel path
against the masked dense path, calibration and profiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.dense_cpu import CpuDenseKernel
from kernels.wina_cpu import CpuWinaKernel
from kernels.wina_reference import column_norms
from server.calibration.wina import (
    WinaCalibrationConfig,
    calibrate_wina,
    write_profiles,
)
from server.model import LlamaDecoder, ModelConfig
from server.model.sparsity import O_COLUMNS, PROJECTIONS, WinaTable, criterion_factors
from server.profiles import ProfileError, load_profile
from server.runtime import load_model
from server.settings import ServerSettings

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def loaded():
    return load_model(ServerSettings(max_model_len=256, wina_profile="none", log_level="warning"))


@pytest.fixture(scope="module")
def profiles(loaded):
    # a few seconds of calibration: thresholds from 2 x 2 sequences, enough for these checks
    config = WinaCalibrationConfig(sequences_per_source=2, sequence_length=64, positions_per_sequence=40,
                                   heldout_sequences=0, allocations=("uniform", "greedy"), greedy_rows=64)
    return calibrate_wina(loaded.model, loaded.tokenizer, config)


def _batch(tokenizer, prompts):
    ids = [tokenizer(p).input_ids for p in prompts]
    T = min(map(len, ids))
    return torch.tensor([i[:T] for i in ids])  # [B, T], cut to a common length


def _logits(model, tokens, targets, cache):
    """Prefill every row, then one decode step per row with its target: -> last-step logits [B, V]."""
    B, T = tokens.shape
    for row in range(B):
        plan = model.sparsity_plan([targets[row]], T - 1)
        model(tokens[row:row + 1, :-1], torch.tensor([row]), torch.tensor([0]), cache, sparsity=plan)
    plan = model.sparsity_plan(list(targets), 1)
    return model(tokens[:, -1:], torch.arange(B), torch.full((B,), T - 1), cache, sparsity=plan), plan


def test_served_gpu_kernel_reaches_every_projection(loaded, profiles, tmp_path):
    """--wina-gpu-kernel is handed to every sparse projection (which Triton path runs on CUDA)."""
    from server.runtime import attach_wina

    model = loaded.model
    path, = write_profiles({"wina-uniform": profiles["wina-uniform"]}, tmp_path, loaded.fingerprint, loaded.name)
    settings = ServerSettings(wina_gpu_kernel="gather", wina_profile="none", log_level="warning")
    attach_wina(model, load_profile(path), settings)
    kinds = {p.gpu_kernel for layer in model.layers
             for p in (layer.attn.sparse_qkv, layer.attn.sparse_o, layer.mlp.sparse_gate_up, layer.mlp.sparse_down)}
    assert kinds == {"gather"}
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    assert model.layers[0].mlp.sparse_down.gpu_kernel == "tile"  # the default


def test_sparsity_zero_is_the_dense_model(loaded, profiles):
    model = loaded.model
    tokens = _batch(loaded.tokenizer, PROMPTS[:2])
    dense, _ = _logits(model, tokens, [0.0, 0.0], model.new_cache(2))
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    assert model.sparsity_plan([0.0, 0.0], 1) is None  # nothing to do: no extra work either
    again, _ = _logits(model, tokens, [0.0, 0.0], model.new_cache(2))
    assert torch.equal(dense, again)
    # a dense row beside a sparse one gets exactly the dense numbers (two rows: the same GEMV path)
    mixed, _ = _logits(model, tokens, [0.0, 0.5], model.new_cache(2))
    assert torch.equal(mixed[0], dense[0])
    assert not torch.allclose(mixed[1], dense[1])  # the sparse row did change


@pytest.mark.parametrize("B", [1, 3, 8])
def test_kernel_matches_masked_dense_path(loaded, profiles, B):
    """Decode runs the CPU kernel, prefill the masked dense path: per projection, on the same
    input, they keep the same channels and agree to the weight dtype's rounding."""
    model = loaded.model
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    plan = model.sparsity_plan([0.5, 0.25, 0.65, 0.4, 0.5, 0.9, 0.1, 0.5][:B], 1)
    layer_sparsity = plan.layer(7)
    layer = model.layers[7]
    g = torch.Generator().manual_seed(0)
    for projection, dense in ((layer.attn.sparse_qkv, layer.attn.qkv.forward),
                              (layer.attn.sparse_o, layer.attn.o_proj.forward),
                              (layer.mlp.sparse_gate_up, layer.mlp.activation),
                              (layer.mlp.sparse_down, layer.mlp.down.forward)):
        K = projection.linear.weight.shape[1]
        x = torch.randn(B, 1, K, generator=g)
        with_kernel = layer_sparsity.apply(projection, x, dense)
        kept_kernel = plan.kept[7].clone()
        masked = layer_sparsity._masked_dense(projection, x.reshape(B, K)).view(B, 1, -1)
        assert torch.equal(plan.kept[7], kept_kernel)
        # float16 outputs: the paths differ by summation order, and at batch 1 the masked path rounds
        # its input to float16 first: two float16 ulps of the largest output (2^-9 relative)
        scale = with_kernel.abs().max()
        torch.testing.assert_close(with_kernel, masked, atol=float(scale) * 2 ** -9, rtol=0)


def test_sparse_row_ignores_its_neighbours(loaded, profiles):
    model = loaded.model
    model.attach_sparsity(profiles["teal-uniform"]["table"], CpuWinaKernel.load())
    tokens = _batch(loaded.tokenizer, PROMPTS)
    alone, _ = _logits(model, tokens[:1], [0.5], model.new_cache(1))
    crowded, _ = _logits(model, tokens, [0.5, 0.9, 0.0], model.new_cache(3))
    # The kernel is exact per row, but batched attention (with a mask) and batch-1 attention round
    # differently in float32; that difference, then one float16 rounding per projection, moves
    # logits of magnitude ~20 by under 1e-2 (0.0078 measured). The neighbours' own sparsity
    # (0.9 and dense) would move them by whole units if it leaked.
    torch.testing.assert_close(crowded[0], alone[0], atol=2e-2, rtol=0)
    assert int(crowded[0].argmax()) == int(alone[0].argmax())


@pytest.mark.parametrize("name", ["wina-uniform", "teal-uniform", "wina-greedy"])
def test_achieved_sparsity_tracks_the_target(loaded, profiles, name):
    model = loaded.model
    model.attach_sparsity(profiles[name]["table"], CpuWinaKernel.load())
    tokens = _batch(loaded.tokenizer, PROMPTS)
    for target in (0.25, 0.5):
        _, plan = _logits(model, tokens, [target] * 3, model.new_cache(3))
        achieved = plan.skipped_fraction()
        # thresholds come from a tiny calibration set and three tokens are measured: their mean
        # within 0.1 of the target, each token within 0.2 (one token of the third prompt skips
        # 0.63-0.65 at a target of 0.5, moving with the kernel's float32 summation order)
        assert abs(float(achieved.mean()) - target) < 0.1, (name, target, achieved)
        assert torch.all((achieved - target).abs() < 0.2), (name, target, achieved)


def test_greedy_allocation_meets_each_level_on_average(loaded, profiles):
    c = loaded.model.config
    q, kv, h, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    sizes = torch.tensor([h * q, h * kv, h * kv, q * h, h * i, h * i, i * h], dtype=torch.float32)
    allocation = profiles["wina-greedy"]["allocation"]  # [S, L, 7]
    levels = profiles["wina-greedy"]["table"].levels
    average = (allocation * sizes).sum(-1) / sizes.sum()  # [S, L]
    torch.testing.assert_close(average, levels.view(-1, 1).expand_as(average), atol=1e-4, rtol=0)
    assert len(PROJECTIONS) == allocation.shape[-1]
    assert not torch.allclose(allocation[10], allocation[10, :, :1].expand_as(allocation[10]))  # not uniform


def test_profile_round_trip_and_model_check(loaded, profiles, tmp_path):
    paths = write_profiles({"wina-uniform": profiles["wina-uniform"]}, tmp_path, loaded.fingerprint, loaded.name)
    profile = load_profile(paths[0])
    assert profile.method == "wina" and profile.name == "wina-uniform"
    assert torch.equal(profile.tensors["thresholds"], profiles["wina-uniform"]["table"].thresholds)
    profile.check_model(loaded.fingerprint, loaded.name)
    with pytest.raises(ProfileError, match="made for model"):
        profile.check_model("0" * 16, "another-model")
    (tmp_path / "broken.safetensors").write_bytes(b"not a profile")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "broken.safetensors")


def test_official_wina_criterion_uses_norms_on_k_and_gate_only(loaded, profiles):
    """microsoft/wina's code scores k_proj and gate_proj inputs with column norms and the other
    five projections with |x| alone; the "wina_official" criterion reproduces that."""
    model = loaded.model
    table = profiles["wina-uniform"]["table"]
    model.attach_sparsity(WinaTable("wina_official", table.levels, table.thresholds), None)
    layer = model.layers[3]
    for fused, normed in ((layer.attn.sparse_qkv, (False, True, False)), (layer.attn.sparse_o, (False,)),
                          (layer.mlp.sparse_gate_up, (True, False)), (layer.mlp.sparse_down, (False,))):
        norms = column_norms(fused.linear.weight, fused.segments)
        for g, uses_norm in enumerate(normed):
            expected = norms[g] if uses_norm else torch.ones_like(norms[g])
            assert torch.equal(fused.col_norms[g], expected)
    plan = model.sparsity_plan([0.5], 1)
    assert plan is not None  # the table serves like any other
    with pytest.raises(ValueError, match="unknown WINA criterion"):
        criterion_factors(torch.ones(4, 3), (4,), O_COLUMNS, "bogus")


@pytest.fixture(scope="module")
def loaded_sparse_kernel_only():
    """Served with a kept budget no step reaches: sparse rows always through the sparse kernel."""
    return load_model(ServerSettings(max_model_len=256, wina_profile="none", log_level="warning",
                                     wina_cpu_sparse_kernel_max_kept=100.0))


@pytest.mark.parametrize("targets", [[0.5, 0.3, 0.7], [0.5, 0.0, 0.7], [0.0, 0.6, 0.0]],
                         ids=["all-sparse", "mixed", "one-sparse"])
@pytest.mark.parametrize("served", ["loaded", "loaded_sparse_kernel_only"],
                         ids=["default-budget", "sparse-kernel-always"])
def test_fused_sparse_decode_step_equals_separate_calls(request, served, profiles, targets):
    """A decode step with sparse rows runs each layer as one kernel call (the dense rows' projections
    dense; where the sparse rows' kept fractions add up to more than the budget, as by default at
    these targets except one-sparse, theirs as dense ones over their kept inputs);
    it gives the same numbers and kept counts, bit for bit, as the layer's separate projection calls
    (DecoderLayer.forward_decode, whose sparse rows run the sparse kernel)."""
    loaded = request.getfixturevalue(served)
    model = loaded.model
    if model.decode_layers is None:
        pytest.skip("no CPU decode kernel here")
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    assert all(layer.sparse for layer in model.decode_layers)
    tokens = _batch(loaded.tokenizer, PROMPTS)
    B, T = tokens.shape
    cache = model.new_cache(B)
    for row in range(B):  # dense prompts, then one sparse step at three targets
        model(tokens[row:row + 1, :-1], torch.tensor([row]), torch.tensor([0]), cache)
    plan = model.sparsity_plan(targets, 1)
    masked_dense = plan.kept_share > model.dense_kernel.sparse_kernel_max_kept  # as LlamaDecoder.forward decides
    assert masked_dense == (served == "loaded" and targets != [0.0, 0.6, 0.0])
    slots, positions = torch.arange(B), torch.full((B,), T - 1)
    h = F.embedding(tokens[:, -1:], model.embed).float()  # [B, 1, hidden]
    for i, layer in enumerate(model.layers):
        view = plan.layer(i)
        keys, values = cache.keys[i].clone(), cache.values[i].clone()
        fused = model.decode_layers[i](h, keys, values, slots, positions, None, view.thresholds_ptr, view.kept_ptr,
                                       plan.sparse_rows, masked_dense=masked_dense)
        fused_kept = view.kept.clone()
        separate = layer.forward_decode(model.decode_layers[i], h, cache.keys[i], cache.values[i], slots,
                                        positions, view, None)
        assert torch.equal(fused, separate), i
        assert torch.equal(view.kept, fused_kept) and bool((fused_kept > 0).all()), i
        assert torch.equal(keys, cache.keys[i]) and torch.equal(values, cache.values[i]), i
        h = fused


@pytest.mark.parametrize(("target", "start", "T"), [(0.5, 0, 20), (0.9, 0, 20), (0.9, 12, 4)],
                         ids=["0.5-masked-dense", "0.9-masked-dense", "0.9-sparse-kernel-after-a-prefix"])
def test_sparse_prompt_chunk_runs_fused_as_its_tokens_decode_one_by_one(loaded, profiles, target, start, T):
    """A sparse prompt chunk (up to CpuDenseKernel.MAX_ROWS tokens) runs fused, its tokens as sparse
    rows of one slot: every token's logits and kept counts are, bit for bit, what decoding the same
    tokens one step at a time gives (the torch layer path, which sparse chunks took before, agrees
    only up to float32 summation order, which hard thresholds amplify; RESULTS.md). 20 rows run as
    masked dense projections (their kept shares add up past the budget), 4 rows at 0.9 through the
    sparse kernel, after a dense prefix in the cache."""
    model = loaded.model
    if model.decode_layers is None:
        pytest.skip("no CPU decode kernel here")
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    if model.sparse_chunk_tokens is None:
        pytest.skip("sparse chunks do not run fused here")
    tokens = torch.tensor([loaded.tokenizer(" ".join(PROMPTS[::-1] * 2)).input_ids[:start + T]])  # [1, start + T]
    assert tokens.shape[1] == start + T
    plan = model.sparsity_plan([target], T)
    masked_dense = plan.kept_share * T > model.dense_kernel.sparse_kernel_max_kept  # as LlamaDecoder.forward decides
    assert masked_dense == (T == 20)
    caches = [model.new_cache(1), model.new_cache(1)]
    for cache in caches:  # the same dense prefix in both
        if start:
            model(tokens[:, :start], torch.tensor([0]), torch.tensor([0]), cache)
    chunk = model(tokens[:, start:], torch.tensor([0]), torch.tensor([start]), caches[0], all_logits=True,
                  sparsity=plan)[0]  # [T, V]
    steps, kept = [], []
    for t in range(start, start + T):
        step_plan = model.sparsity_plan([target], 1)
        steps.append(model(tokens[:, t:t + 1], torch.tensor([0]), torch.tensor([t]), caches[1], sparsity=step_plan)[0])
        kept.append(step_plan.kept)
    assert torch.equal(chunk, torch.stack(steps))
    assert torch.equal(plan.kept, torch.cat(kept, dim=1)) and int(plan.kept.sum()) > 0
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)
    assert abs(float(plan.skipped_fraction()[0]) - target) < 0.15


@pytest.mark.parametrize(("targets", "T"), [([0.0, 0.0, 0.0], 1), ([0.5, 0.0, 0.7], 1), ([0.9], 4), ([0.0], 6)],
                         ids=["dense-step", "mixed-step", "sparse-chunk", "dense-chunk"])
@pytest.mark.parametrize("served", ["loaded", "loaded_sparse_kernel_only"],
                         ids=["default-budget", "sparse-kernel-always"])
def test_decode_stack_equals_the_layers_called_one_by_one(request, served, profiles, targets, T):
    """Steps without edits run every layer in one kernel call (PreparedDecodeStack): the residual
    stream, the KV cache and the kept counts it leaves are, bit for bit, those of the model's layers
    called one at a time, dense, sparse and mixed, a step of several rows or a chunk of one."""
    loaded = request.getfixturevalue(served)
    model = loaded.model
    if model.decode_stack is None:
        pytest.skip("no CPU decode kernel here")
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    ids = loaded.tokenizer(" ".join(PROMPTS * 2)).input_ids
    B = len(targets)
    tokens = torch.tensor([ids[3 * row:3 * row + T + 2] for row in range(B)])  # [B, T + 2]
    cache = model.new_cache(B)
    for row in range(B):  # a dense prefix of two tokens
        model(tokens[row:row + 1, :2], torch.tensor([row]), torch.tensor([0]), cache)
    slots = torch.arange(B).repeat_interleave(T)  # [B*T], one per token row
    positions = (2 + torch.arange(T)).repeat(B)  # [B*T]
    h = F.embedding(tokens[:, 2:].reshape(-1, 1), model.embed).float().contiguous()  # [B*T, 1, hidden]
    plans = [model.sparsity_plan(targets, T) for _ in range(2)]
    tables = [(None, None, None) if plan is None else (plan.thresholds.data_ptr(), plan.kept.data_ptr(),
                                                       plan.sparse_rows) for plan in plans]
    masked_dense = plans[0] is not None and plans[0].kept_share * T > model.dense_kernel.sparse_kernel_max_kept
    keys, values = cache.keys.clone(), cache.values.clone()
    stacked = model.decode_stack(h, keys, values, slots, positions, *tables[0], masked_dense=masked_dense)
    layered = h
    for i, layer in enumerate(model.decode_layers):
        view = None if plans[1] is None else plans[1].layer(i)
        layered = layer(layered, cache.keys[i], cache.values[i], slots, positions, None,
                        *((None, None, None) if view is None else (view.thresholds_ptr, view.kept_ptr,
                                                                   plans[1].sparse_rows)),
                        masked_dense=masked_dense)
    assert torch.equal(stacked, layered)
    assert torch.equal(keys, cache.keys) and torch.equal(values, cache.values)
    assert not torch.equal(keys[:, :, :, 2:2 + T], torch.zeros_like(keys[:, :, :, 2:2 + T]))  # written
    if plans[0] is not None:
        assert torch.equal(plans[0].kept, plans[1].kept) and int(plans[0].kept.sum()) > 0
    wrong_dtype = torch.float32 if keys.dtype != torch.float32 else torch.float16
    for bad in (keys[:-1].contiguous(), keys[:, :, :, :-1].contiguous(), keys.to(wrong_dtype)):
        with pytest.raises(ValueError, match="contiguous cache"):
            model.decode_stack(h, bad, bad.clone(), slots, positions)


def test_attaching_another_profile_replaces_the_fused_sparsity(loaded, profiles):
    """The fused layer never keeps a previous profile's score factors: attaching one without the
    CPU kernel (masked path) leaves no layer fused-sparse, and the next attach fuses again."""
    model = loaded.model
    if model.decode_layers is None:
        pytest.skip("no CPU decode kernel here")
    model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
    assert all(layer.sparse for layer in model.decode_layers)
    model.attach_sparsity(profiles["teal-uniform"]["table"], None)
    assert not any(layer.sparse for layer in model.decode_layers)
    model.attach_sparsity(profiles["teal-uniform"]["table"], CpuWinaKernel.load())
    assert all(layer.sparse for layer in model.decode_layers)


def test_masked_dense_steps_decode_as_the_sparse_kernel(loaded, loaded_sparse_kernel_only, profiles):
    """Through the model's forward: six rows at 0.5 (kept share 3, over the default budget: masked
    dense projections) and the same rows where the budget keeps them on the sparse kernel give the
    same logits and kept counts, bit for bit, over a few greedy steps."""
    results = []
    for loaded_model in (loaded, loaded_sparse_kernel_only):
        model = loaded_model.model
        if model.decode_layers is None:
            pytest.skip("no CPU decode kernel here")
        model.attach_sparsity(profiles["wina-uniform"]["table"], CpuWinaKernel.load())
        tokens = _batch(loaded_model.tokenizer, (PROMPTS * 2)[:6])
        B, T = tokens.shape
        cache = model.new_cache(B)
        last = torch.cat([model(tokens[row:row + 1], torch.tensor([row]), torch.tensor([0]), cache)
                          for row in range(B)])  # [B, V]
        steps, kept = [], []
        for step in range(3):
            plan = model.sparsity_plan([0.5] * B, 1)
            last = model(last.argmax(-1, keepdim=True), torch.arange(B), torch.full((B,), T + step), cache,
                         sparsity=plan)
            steps.append(last)
            kept.append(plan.kept.clone())
        results.append((torch.stack(steps), torch.stack(kept)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("head_dim", [16, 12], ids=["segments-on-panels", "segments-inside-panels"])
def test_masked_dense_on_a_small_random_llama(head_dim):
    """Any Llama shape: q, k and v widths that do not end on a panel boundary (head_dim 12: 48, 24,
    24 against panels of 32 in the AVX-512 build) leave the step on the sparse kernel, which the
    masked path would otherwise have to cut panels for; either way the rows get the sparse kernel's
    numbers, bit for bit, at any budget."""
    kernels = [CpuDenseKernel.load(sparse_kernel_max_kept=budget) for budget in (0.0, 100.0)]
    if kernels[0] is None or CpuWinaKernel.load() is None:
        pytest.skip("no CPU kernels here")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=4 * head_dim, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    state = LlamaForCausalLM(config).state_dict()
    levels = torch.tensor([0.0, 0.5])
    # [levels, layers, 7]: at 0.5 about half of the inputs of q/k/v/gate/up (|x| ~ 0.1) and of o/down (~ 1e-3) go
    top = torch.tensor([0.05, 0.05, 0.05, 1e-3, 0.05, 0.05, 1e-3]).expand(2, 7)
    thresholds = torch.stack([torch.zeros(2, 7), top])
    results = []
    for kernel in kernels:
        model = LlamaDecoder(ModelConfig.from_hf(config), state, torch.float16, torch.device("cpu"), 64, kernel)
        model.attach_sparsity(WinaTable("wina", levels, thresholds), CpuWinaKernel.load())
        cache = model.new_cache(3)
        ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(1))
        for row in range(3):
            model(ids[row:row + 1], torch.tensor([row]), torch.tensor([0]), cache)
        plan = model.sparsity_plan([0.5, 0.0, 0.4], 1)
        logits = model(ids[:, -1:], torch.arange(3), torch.full((3,), 5), cache, sparsity=plan)
        widths = torch.tensor([4 * head_dim] * 3 + [4 * head_dim] + [4 * head_dim] * 2 + [72])  # each projection's K
        # every projection keeps some inputs and drops some in most rows and layers
        assert bool((plan.kept > 0).all()) and float((plan.kept < widths).float().mean()) > 0.9, plan.kept
        results.append((logits, plan.kept.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
