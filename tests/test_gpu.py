"""The model, WINA sparsity (through the compiled Triton kernels), interventions and the engine on
CUDA; skipped cleanly where torch sees no GPU.

Where the default model is not installed (a lent GPU machine gets no copy of its 98 MB GGUF), the
tests run on a random-weight Llama of the default model's shapes (benchmarks/stand_in_model.py),
with the tokenizer found in the directory NEURONSERVE_TEST_TOKENIZER names (scripts/gpu_checks.sh
carries the default model's). Such a stand-in checks the same code paths and invariants; it says
nothing about quality. The tests print the differences they bound, so one run on a lent machine
records them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import test_interventions as intervention_checks  # the CPU invariants, rerun here on CUDA
import torch

from server.calibration.wina import WinaCalibrationConfig, calibrate_wina_on
from server.engine.offline import OfflineGenerator
from server.engine.request import SamplingParams
from server.model.loader import ModelLoadError, resolve_model_path
from server.runtime import LoadedModel, load_model
from server.settings import ServerSettings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROMPTS = intervention_checks.PROMPTS


def _default_installed() -> bool:
    try:
        resolve_model_path("default")
    except ModelLoadError:
        return False
    return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    if _default_installed():
        return "default"
    tokenizer_dir = os.environ.get("NEURONSERVE_TEST_TOKENIZER")
    if not tokenizer_dir:
        pytest.skip("default model not installed and NEURONSERVE_TEST_TOKENIZER not set")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from stand_in_model import save_stand_in

    return str(save_stand_in(tmp_path_factory.mktemp("stand-in-llama"), Path(tokenizer_dir)))


def _load(checkpoint: str, device: str, dtype: str) -> LoadedModel:
    return load_model(ServerSettings(model=checkpoint, device=device, dtype=dtype, max_model_len=256,
                                     wina_profile="none", load_interventions=False, log_level="warning"))


@pytest.fixture(scope="module")
def cuda32(checkpoint) -> LoadedModel:
    return _load(checkpoint, "cuda", "float32")


@pytest.fixture(scope="module")
def cuda_registry(cuda32):
    return intervention_checks.make_registry(cuda32)


def _random_sequences(vocab: int, count: int = 6, length: int = 64) -> list[list[int]]:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(0)).tolist()


def _calibrate(loaded: LoadedModel) -> dict[str, dict]:
    config = WinaCalibrationConfig(positions_per_sequence=40, heldout_sequences=0)
    sequences = _random_sequences(loaded.model.config.vocab_size)
    return calibrate_wina_on(loaded.model, sequences, [], {"calibration": "random tokens"}, config)


@pytest.fixture(scope="module")
def wina_table(cuda32):
    return _calibrate(cuda32)["wina-uniform"]["table"]


def _ids(loaded: LoadedModel, prompts: list[str], device: str) -> torch.Tensor:
    ids = [loaded.tokenizer(p).input_ids for p in prompts]
    T = min(map(len, ids))
    return torch.tensor([i[:T] for i in ids], device=device)  # [B, T], cut to a common length


def test_cuda_forward_matches_cpu_float32(checkpoint, cuda32):
    cpu = _load(checkpoint, "cpu", "float32")
    outs = []
    for loaded, device in ((cpu, "cpu"), (cuda32, "cuda")):
        ids = _ids(loaded, PROMPTS[:1], device)
        zero = torch.tensor([0], device=device)
        outs.append(loaded.model(ids, zero, zero, loaded.model.new_cache(1), all_logits=True).cpu())
    print(f"max |cuda - cpu| logit: {float((outs[1] - outs[0]).abs().max()):.2e}, "
          f"max |logit| {float(outs[0].abs().max()):.1f}")
    # float32 on both (TF32 is off by default for matmuls); 0.1 absolute on logits up to ~30 still
    # catches any wrong layout or kernel, which moves logits by whole units.
    torch.testing.assert_close(outs[1], outs[0], atol=0.1, rtol=0)
    assert torch.equal(outs[1][0, -1].argmax(), outs[0][0, -1].argmax())


def test_calibrate_wina_on_cuda_matches_cpu(checkpoint, cuda32, wina_table):
    """`calibrate wina --device cuda` feeds the model device tensors and computes the same thresholds."""
    cpu_table = _calibrate(_load(checkpoint, "cpu", "float32"))["wina-uniform"]["table"]
    print(f"max relative threshold difference: "
          f"{float(((wina_table.thresholds - cpu_table.thresholds).abs() / cpu_table.thresholds.clamp(min=1e-6)).max()):.2e}")
    # quantiles of float32 scores whose inputs differ by summation order only (~1e-6 relative)
    torch.testing.assert_close(wina_table.thresholds, cpu_table.thresholds, rtol=1e-3, atol=1e-6)


def test_calibrate_sae_parts_on_cuda_match_cpu(checkpoint, cuda32):
    """`calibrate sae --device cuda`: the model's own samples (drawn on the CPU from the CUDA
    logits) and the spliced evaluation (the SAE stays on the CPU) run, and evaluate as on the CPU."""
    from server.calibration.sae import CorpusConfig, evaluate_sae, sample_texts

    config = CorpusConfig(sample_prompts=2, sample_tokens=8)
    samples = sample_texts(cuda32.model, cuda32.tokenizer, config, batch_size=2)
    assert len(samples) == 2 and all(len(s) > 8 for s in samples)
    sae = intervention_checks.random_sae(cuda32.model.config.hidden_size)
    sequences = _random_sequences(cuda32.model.config.vocab_size, count=2, length=32)
    on_cuda = evaluate_sae(cuda32.model, sae, sequences, batch_size=2)
    on_cpu = evaluate_sae(_load(checkpoint, "cpu", "float32").model, sae, sequences, batch_size=2)
    print({k: (on_cpu[k], on_cuda[k]) for k in ("explained_variance_positions_1plus", "ce_sae", "l0")})
    for key in ("explained_variance_positions_1plus", "ce_orig", "ce_sae", "ce_zero", "l0"):
        assert on_cuda[key] == pytest.approx(on_cpu[key], rel=1e-3, abs=1e-3), key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_triton_decode_matches_masked_dense_path(checkpoint, wina_table, dtype):
    """Decode runs the Triton kernel, prefill the masked dense path: per projection, on the same
    input, they keep the same channels and agree to the weight dtype's rounding."""
    loaded = _load(checkpoint, "cuda", dtype)
    model = loaded.model
    model.attach_sparsity(wina_table, None)
    targets = [0.5, 0.25, 0.65, 0.4, 0.5, 0.9, 0.1, 0.5]
    g = torch.Generator(device="cuda").manual_seed(0)
    # relative to the largest output: two ulps of the 16-bit outputs; fp32 sums in another order
    relative = {"float16": 2 ** -9, "bfloat16": 2 ** -7, "float32": 1e-5}[dtype]
    for B in (1, 3, 8):
        plan = model.sparsity_plan(targets[:B], 1)
        layer_sparsity = plan.layer(7)
        layer = model.layers[7]
        for projection, dense in ((layer.attn.sparse_qkv, layer.attn.qkv.forward),
                                  (layer.attn.sparse_o, layer.attn.o_proj.forward),
                                  (layer.mlp.sparse_gate_up, layer.mlp.activation),
                                  (layer.mlp.sparse_down, layer.mlp.down.forward)):
            K = projection.linear.weight.shape[1]
            x = torch.randn(B, 1, K, generator=g, device="cuda").to(model.kv_dtype)
            with_kernel = layer_sparsity.apply(projection, x, dense)
            kept_kernel = plan.kept[7].clone()
            masked = layer_sparsity._masked_dense(projection, x.reshape(B, K)).view(B, 1, -1)
            assert torch.equal(plan.kept[7], kept_kernel)
            scale = float(with_kernel.abs().max())
            diff = float((with_kernel.float() - masked.float()).abs().max())
            print(f"{dtype} B={B} {projection.columns}: max |kernel - masked| {diff:.2e} (scale {scale:.2f})")
            torch.testing.assert_close(with_kernel.float(), masked.float(), atol=scale * relative, rtol=0)


def _decode_logits(model, tokens: torch.Tensor, targets: list[float]) -> torch.Tensor:
    """Prefill every row at its own sparsity, then one batched decode step: -> logits [B, V]."""
    B, T = tokens.shape
    device = tokens.device
    cache = model.new_cache(B)
    for row in range(B):
        plan = model.sparsity_plan([targets[row]], T - 1)
        model(tokens[row:row + 1, :-1], torch.tensor([row], device=device), torch.tensor([0], device=device),
              cache, sparsity=plan)
    plan = model.sparsity_plan(list(targets), 1)
    return model(tokens[:, -1:], torch.arange(B, device=device), torch.full((B,), T - 1, device=device), cache,
                 sparsity=plan)


@pytest.mark.parametrize("gpu_kernel", ["tile", "gather"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_keep_their_greedy_token_whatever_the_neighbours_sparsity(checkpoint, wina_table, dtype, gpu_kernel):
    """The Triton kernels compute each row alone (tests/test_wina_triton.py checks bit-identity);
    what differs with the neighbours is cuBLAS's and attention's summation order for another batch
    shape, far below what a leak of the neighbours' sparsity (0.9, or dense) would do."""
    loaded = _load(checkpoint, "cuda", dtype)
    model = loaded.model
    model.attach_sparsity(wina_table, None, gpu_kernel)
    tokens = _ids(loaded, PROMPTS, "cuda")
    dense_pair = _decode_logits(model, tokens[:2], [0.0, 0.0])
    dense_beside_sparse = _decode_logits(model, tokens[:2], [0.0, 0.5])
    alone = _decode_logits(model, tokens[:1], [0.5])
    crowded = _decode_logits(model, tokens, [0.5, 0.9, 0.0])
    tolerance = {"float32": 1e-3, "bfloat16": 0.25}[dtype]  # bf16: 8 mantissa bits over 30 layers
    for name, got, want in (("dense row", dense_beside_sparse[0], dense_pair[0]),
                            ("sparse row", crowded[0], alone[0])):
        print(f"{dtype} {name}: max |logit difference| {float((got - want).abs().max()):.2e}, "
              f"max |logit| {float(want.abs().max()):.1f}")
        torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
        assert int(got.argmax()) == int(want.argmax())
    assert not torch.allclose(dense_beside_sparse[1], dense_pair[1], atol=tolerance)  # the sparse row changed


def test_engine_sparse_rows_same_greedy_tokens_alone_and_in_batch(cuda32, wina_table):
    cuda32.model.attach_sparsity(wina_table, None)
    try:
        gen = OfflineGenerator(cuda32, max_batch_size=4)
        prompts = [cuda32.tokenizer(p).input_ids for p in PROMPTS]
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        alone = gen.generate(prompts[:1], greedy, sparsity=0.5)[0].token_ids
        batch = gen.generate(prompts, greedy, sparsity=0.5)
        assert batch[0].token_ids == alone and len(alone) == 8
    finally:
        cuda32.model.wina = None  # the intervention checks below run dense


@pytest.mark.parametrize("entry", intervention_checks.ASKING_ENTRIES)
def test_plain_rows_untouched_by_neighbours(cuda32, cuda_registry, entry):
    intervention_checks.test_plain_rows_untouched_by_neighbours(cuda32, cuda_registry, entry)


@pytest.mark.parametrize("entry", intervention_checks.NEUTRAL_ENTRIES)
def test_neutral_settings_are_exact_noops(cuda32, cuda_registry, entry):
    intervention_checks.test_neutral_settings_are_exact_noops(cuda32, cuda_registry, entry)


def test_eigenshift_equals_offline_head_edit(cuda32, cuda_registry):
    intervention_checks.test_eigenshift_equals_offline_head_edit(cuda32, cuda_registry)


@pytest.mark.parametrize("name", ["mem-neuron", "mem-weight", "mem-subspace"])
def test_unmemorize_equals_offline_pruning(cuda32, cuda_registry, name):
    intervention_checks.test_unmemorize_equals_offline_pruning(cuda32, cuda_registry, name)


def test_engine_rows_same_greedy_tokens_alone_and_in_batch(cuda32, cuda_registry):
    intervention_checks.test_engine_rows_same_greedy_tokens_alone_and_in_batch(cuda32, cuda_registry)
