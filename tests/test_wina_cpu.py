"""The CPU WINA kernel (kernels/csrc/wina_cpu.c) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.wina_cpu import CpuWinaKernel
from kernels.wina_reference import (
    column_norms, thresholds_for_topk, wina_gate_up_reference, wina_linear_reference,
)

KERNEL = CpuWinaKernel.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="CPU WINA kernel needs AVX2/FMA/F16C and gcc")

# Both sides accumulate in float32 and round to the weight dtype at the end; they differ only in
# summation order (sequential FMA here, blocked GEMM in torch). For float32 weights that is a few
# ulps of the sum of |x_i w_i| (K <= 600 terms of magnitude ~1: 1e-4 is ~100 ulps of headroom);
# for half outputs the two float32 sums round to the same half except at a rounding boundary,
# where they differ by one half ulp (2^-10 relative for fp16, 2^-7 for bf16).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SHAPES = [  # (K, segments)
    (37, (53,)),
    (64, (40, 24, 24)),
    (100, (70, 70)),
    (576, (576, 192, 192)),
]


def _case(K, segments, B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(sum(segments), K, generator=g).to(dtype)  # [N, K]
    x = torch.randn(B, K, generator=g)
    bias = torch.randn(sum(segments), generator=g)
    return weight, x, bias


@pytest.mark.parametrize("K,segments", SHAPES)
@pytest.mark.parametrize("B", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_matches_reference(K, segments, B, sparsity, dtype):
    weight, x, bias = _case(K, segments, B, dtype)
    norms = column_norms(weight, segments)
    thresholds = thresholds_for_topk(x, norms, K - round(sparsity * K))
    weight_t = weight.t().contiguous()
    expected, expected_kept = wina_linear_reference(x, weight_t, norms, thresholds, segments, bias)
    got, kept = KERNEL.linear(x, weight_t, norms, thresholds, segments, bias)
    assert torch.equal(kept, expected_kept)
    assert kept.sum() == B * len(segments) * (K - round(sparsity * K))
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=atol * K ** 0.5, rtol=rtol)
    if sparsity == 1.0:
        assert torch.equal(got.float(), bias.to(dtype).float().expand(B, -1))


@pytest.mark.parametrize("B", [1, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gate_up_matches_reference(B, sparsity, dtype):
    K, segments = 100, (70, 70)
    weight, x, bias = _case(K, segments, B, dtype, seed=1)
    norms = column_norms(weight, segments)
    thresholds = thresholds_for_topk(x, norms, K - round(sparsity * K))
    weight_t = weight.t().contiguous()
    expected, expected_kept = wina_gate_up_reference(x, weight_t, norms, thresholds, bias)
    got, kept = KERNEL.linear(x, weight_t, norms, thresholds, segments, bias, gate_up=True)
    assert torch.equal(kept, expected_kept)
    atol, rtol = TOLERANCES[dtype]
    # silu(g) * u multiplies two rounded values of magnitude ~sqrt(K): the error scales with K too
    torch.testing.assert_close(got.float(), expected.float(), atol=atol * K, rtol=rtol * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_does_not_depend_on_neighbours(dtype):
    """A row's output is bit-for-bit the same alone and beside rows with other masks."""
    K, segments = 576, (576, 192, 192)
    weight, x, _ = _case(K, segments, 6, dtype, seed=2)
    norms = column_norms(weight, segments)
    weight_t = weight.t().contiguous()
    per_row_keep = [576, 288, 57, 0, 400, 10]
    thresholds = torch.cat([thresholds_for_topk(x[i:i + 1], norms, k) for i, k in enumerate(per_row_keep)])
    together, _ = KERNEL.linear(x, weight_t, norms, thresholds, segments)
    for i in range(6):
        alone, _ = KERNEL.linear(x[i:i + 1], weight_t, norms, thresholds[i:i + 1], segments)
        assert torch.equal(alone, together[i:i + 1])


@pytest.mark.parametrize("lopsided", [False, True])
def test_row_does_not_depend_on_thread_count(lopsided):
    """Threads split the reading of kept rows, never a sum's order: one, two and three threads give
    the same bits, also where one half of the channels keeps far more than the other (lopsided)."""
    K, segments = 576, (1536, 1536)
    weight, x, bias = _case(K, segments, 3, torch.float16, seed=4)
    if lopsided:
        x[:, : K // 2] *= 8.0  # most kept channels fall below K / 2
    norms = column_norms(weight, segments)
    thresholds = thresholds_for_topk(x, norms, K // 2)
    weight_t = weight.t().contiguous()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(KERNEL.linear(x, weight_t, norms, thresholds, segments, bias, gate_up=True))
    finally:
        torch.set_num_threads(threads)
    for y, kept in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(kept, results[0][1])
    expected, expected_kept = wina_gate_up_reference(x, weight_t, norms, thresholds, bias)
    assert torch.equal(results[0][1], expected_kept)
    if lopsided:  # the case this test is about
        low = (x[:, : K // 2].abs() * norms[:, None, : K // 2] > thresholds.t()[:, :, None]).sum()
        assert low > 0.8 * expected_kept.sum()
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(results[0][0].float(), expected.float(), atol=atol * K, rtol=rtol * 2)


@pytest.mark.skipif(KERNEL is None or KERNEL.instruction_set != "avx512", reason="needs an AVX-512 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_avx2_and_avx512_builds_agree(dtype):
    """Both builds form each output's float32 chains in the same order (AVX-512 only reads 16
    columns per vector): the same bits, over widths that leave 8-column and scalar tails."""
    avx2 = CpuWinaKernel.load(instruction_set="avx2")
    for K, segments, B in [(576, (576, 192, 192), 1), (100, (70, 70), 3), (64, (40, 24, 24), 8), (37, (53,), 2)]:
        weight, x, bias = _case(K, segments, B, dtype, seed=5)
        norms = column_norms(weight, segments)
        thresholds = thresholds_for_topk(x, norms, K // 2)
        weight_t = weight.t().contiguous()
        wide = KERNEL.linear(x, weight_t, norms, thresholds, segments, bias)
        narrow = avx2.linear(x, weight_t, norms, thresholds, segments, bias)
        assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_output_holds_the_rounded_values(dtype):
    """The float32 output (the model's, rounded eight at a time) carries exactly the values of the
    weight-dtype output (rounded one at a time), huge and tiny magnitudes and a ragged tail included."""
    K, segments = 101, (45, 19)
    weight, x, bias = _case(K, segments, 3, dtype, seed=5)
    x = x * torch.logspace(-6, 6, K)  # outputs from ~1e-6 to beyond the half range
    norms = column_norms(weight, segments)
    thresholds = thresholds_for_topk(x, norms, 60)
    weight_t = weight.t().contiguous()
    prepared_half = KERNEL.prepare(weight_t, norms, segments, bias)
    prepared_f32 = KERNEL.prepare(weight_t, norms, segments, bias, out_dtype=torch.float32)
    kept = torch.empty(3, 2, dtype=torch.int32)
    half = prepared_half(x, thresholds.data_ptr(), 2, kept.data_ptr(), 2)
    f32 = prepared_f32(x, thresholds.data_ptr(), 2, kept.data_ptr(), 2)
    assert f32.dtype == torch.float32 and half.dtype == dtype
    assert torch.equal(f32, half.float())


def test_threshold_zero_is_dense():
    """Threshold 0 keeps every non-zero input: the product equals the dense one."""
    K, segments = 576, (576,)
    weight, x, _ = _case(K, segments, 3, torch.float32, seed=3)
    norms = column_norms(weight, segments)
    got, kept = KERNEL.linear(x, weight.t().contiguous(), norms, torch.zeros(3, 1), segments)
    assert bool((kept == K).all())
    torch.testing.assert_close(got, x @ weight.t(), atol=1e-4, rtol=1e-5)  # summation order only


def test_bad_arguments_are_refused():
    weight, x, _ = _case(37, (53,), 2, torch.float32)
    norms = column_norms(weight, (53,))
    with pytest.raises(ValueError, match="thresholds"):
        KERNEL.linear(x, weight.t().contiguous(), norms, torch.zeros(3, 1), (53,))
    with pytest.raises(ValueError, match="segments"):
        KERNEL.prepare(weight.t().contiguous(), norms, (50,))
    with pytest.raises(ValueError, match="gate_up"):
        KERNEL.prepare(weight.t().contiguous(), norms, (53,), gate_up=True)
