"""The CPU dense kernel (kernels/csrc/dense_cpu.c) against its torch reference."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_build import (
    AVX2,
    AVX512,
    pick_instruction_set,
    supported_instruction_sets,
)
from kernels.dense_cpu import (
    DEFAULT_SPARSE_KERNEL_MAX_KEPT,
    CpuDenseKernel,
    dense_linear_reference,
)

KERNEL = CpuDenseKernel.load()  # the build the server runs here: the widest this CPU supports
BUILDS = {isa.name: CpuDenseKernel.load(instruction_set=isa.name) for isa in supported_instruction_sets()}
pytestmark = pytest.mark.skipif(KERNEL is None, reason="CPU dense kernel needs AVX2/FMA/F16C and gcc")

# Both sides sum float32 products and round to the weight dtype; they differ only in summation
# order, so float32 outputs agree to a few ulps of sum |x_i w_i| and half outputs to one half ulp
# where the two sums straddle a rounding boundary (as in tests/test_wina_cpu.py).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SHAPES = [(37, 53), (64, 40), (100, 70), (576, 960), (1536, 576)]  # (K, N): tails of 1 to 7 and none


def _case(K, N, B, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g).to(dtype), torch.randn(B, K, generator=g),
            torch.randn(N, generator=g))


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("B", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(K, N, B, dtype, with_bias):
    weight, x, bias = _case(K, N, B, dtype)
    bias = bias if with_bias else None
    expected = dense_linear_reference(x, weight, bias)
    got = KERNEL.linear(x, KERNEL.pack(weight), None if bias is None else bias.float().contiguous())
    assert got.dtype == dtype and got.shape == (B, N)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=atol * K ** 0.5, rtol=rtol)


@pytest.mark.parametrize("K,I", [(576, 1536), (53, 37)])  # 37: each half padded to whole panels
@pytest.mark.parametrize("B", [1, 4, 8, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gate_up_matches_reference(K, I, B, dtype):
    weight, x, bias = _case(K, 2 * I, B, dtype, seed=1)
    expected = dense_linear_reference(x, weight, bias, gate_up=True)
    got = KERNEL.linear(x, KERNEL.pack(weight, 2), bias.float().contiguous(), gate_up=True)
    assert got.shape == (B, I)
    atol, rtol = TOLERANCES[dtype]
    # silu(g) * u multiplies two rounded values, so a half ulp in either shows up scaled by the other
    torch.testing.assert_close(got.float(), expected.float(), atol=4 * atol * K ** 0.5, rtol=4 * rtol)


def test_silu_over_the_float_range():
    # The kernel's SiLU runs on 8 lanes with its own exp (kernels/csrc/simd_cpu.h): within 2 ulp of
    # torch's (float32 weights, so no rounding hides it) from -100 to 100 (outputs under 1e-36,
    # near v = -88 where e^-v nears the float maximum, within that), and exactly -0 and v where
    # e^-v leaves the float range; a NaN input stays NaN.
    gates = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([-1e30, 1e30, 0.0])])
    weight = torch.cat([gates, torch.ones_like(gates)]).unsqueeze(1).contiguous()  # [2I, 1]: gate_i, up = 1
    packed = KERNEL.pack(weight, 2)
    got = KERNEL.linear(torch.ones(1, 1), packed, gate_up=True)[0]
    expected = F.silu(gates)
    torch.testing.assert_close(got, expected, atol=1e-36, rtol=2.4e-7)
    assert KERNEL.linear(torch.full((1, 1), float("nan")), packed, gate_up=True).isnan().all()


@pytest.mark.parametrize("B", [1, 5])
def test_plain_call_on_a_two_part_weight(B):
    # the fused gate/up Linear's plain projection (no SwiGLU) reads the same two-part layout
    weight, x, bias = _case(53, 2 * 37, B, torch.float16, seed=3)
    got = KERNEL.linear(x, KERNEL.pack(weight, 2), bias.float().contiguous())
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(got.float(), dense_linear_reference(x, weight, bias).float(),
                               atol=atol * 53 ** 0.5, rtol=rtol)


def test_gate_up_needs_two_parts():
    weight, x, _ = _case(64, 80, 2, torch.float16)
    with pytest.raises(ValueError, match="2 parts"):
        KERNEL.linear(x, KERNEL.pack(weight), gate_up=True)


def test_keeps_leading_dims_and_accepts_half_inputs():
    weight, x, _ = _case(64, 40, 6, torch.float16)
    x = x.view(2, 3, 64).half()
    got = KERNEL.linear(x, KERNEL.pack(weight))
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got.float(), dense_linear_reference(x.view(6, 64), weight).float().view(2, 3, 40),
                               atol=2e-3 * 8, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_independent_of_its_batch_neighbours(dtype):
    # Rows share weight loads but each keeps its own accumulators, summed in one fixed order: a
    # row's result must be bit-for-bit the same alone, in a pair, at an odd position, or beside
    # 15 others (the model's no-cross-talk guarantee between requests rests on it).
    weight, x, bias = _case(1536, 576, 17, dtype, seed=2)
    bias = bias.float().contiguous()
    packed = KERNEL.pack(weight)
    alone = KERNEL.linear(x[3:4], packed, bias)[0]
    for n in (4, 5, 8, 9, 16, 17):
        assert torch.equal(KERNEL.linear(x[:n], packed, bias)[3], alone), n
    gate_up = KERNEL.pack(torch.cat([weight, weight.flip(0)]), 2)
    alone = KERNEL.linear(x[4:5], gate_up, None, gate_up=True)[0]
    for n in (5, 6, 8, 16):
        assert torch.equal(KERNEL.linear(x[:n], gate_up, None, gate_up=True)[4], alone), n


def test_row_does_not_depend_on_thread_count():
    """Threads split the panels (across the two parts of a gate/up weight too), never a sum: any
    thread count gives the same bits."""
    weight, x, bias = _case(100, 2 * 61, 5, torch.float16, seed=5)  # 3 panels per part
    packed, bias = KERNEL.pack(weight, 2), bias.float().contiguous()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append((KERNEL.linear(x, packed, bias), KERNEL.linear(x, packed, bias, gate_up=True)))
    finally:
        torch.set_num_threads(threads)
    for plain, gated in results[1:]:
        assert torch.equal(plain, results[0][0]) and torch.equal(gated, results[0][1])


def test_no_rows_gives_an_empty_result():
    weight, _, _ = _case(64, 40, 1, torch.float16)
    assert KERNEL.linear(torch.empty(0, 64), KERNEL.pack(weight)).shape == (0, 40)
    assert KERNEL.linear(torch.empty(2, 0, 64), KERNEL.pack(weight, 2), gate_up=True).shape == (2, 0, 20)


def test_rejects_a_mismatched_input():
    weight, x, _ = _case(64, 40, 2, torch.float16)
    with pytest.raises(ValueError, match="does not fit"):
        KERNEL.linear(x[:, :63], KERNEL.pack(weight))


def test_load_falls_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    # An empty cache and a compiler that fails: no kernel, and a warning that says what runs instead.
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING):
        assert CpuDenseKernel.load(tmp_path) is None
    assert "dense_cpu.c unavailable" in caplog.text and "run through torch" in caplog.text


def test_instruction_set_choice():
    assert pick_instruction_set("auto", AVX2.cpu_flags) == AVX2
    assert pick_instruction_set("avx512", AVX2.cpu_flags) is None  # the server refuses to start on it
    assert pick_instruction_set("auto", AVX512.cpu_flags | {"sse2"}) == AVX512
    assert pick_instruction_set("avx2", AVX512.cpu_flags) == AVX2
    assert pick_instruction_set("auto", frozenset({"avx", "sse2"})) is None
    with pytest.raises(ValueError, match="unknown instruction set"):
        pick_instruction_set("neon")


two_builds = pytest.mark.skipif(len(BUILDS) < 2 or None in BUILDS.values(),
                                reason="this CPU runs one build of the kernel (AVX-512 needs avx512f/vl/bw/dq)")


@two_builds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_builds_give_the_same_bits(dtype):
    """The AVX2 and AVX-512 builds block rows and columns differently (4 x 24 and 8 x 32) but sum
    each output over k in the same order: every row count (each block size and tail of both),
    plain with a bias and gate_up, must give the same bits."""
    avx2, avx512 = BUILDS["avx2"], BUILDS["avx512"]
    bits = (lambda t: t) if dtype == torch.float32 else (lambda t: t.view(torch.int16))
    for K, N in SHAPES + [(53, 2 * 37)]:
        weight, x, bias = _case(K, N, 17, dtype, seed=K)
        bias = bias.float().contiguous()
        for parts, gate_up in ((1, False), (2, True)) if N % 2 == 0 else ((1, False),):
            packed = [kernel.pack(weight, parts) for kernel in (avx2, avx512)]
            for B in range(1, 18):
                narrow, wide = (kernel.linear(x[:B], panels, bias, gate_up=gate_up)
                                for kernel, panels in zip((avx2, avx512), packed))
                assert torch.equal(bits(narrow), bits(wide)), (K, N, B, gate_up)


@two_builds
def test_a_weight_packed_for_one_build_is_refused_by_the_other():
    weight, x, _ = _case(64, 40, 2, torch.float16)
    with pytest.raises(ValueError, match="panels of 24 columns, this avx512 build reads 32"):
        BUILDS["avx512"].linear(x, BUILDS["avx2"].pack(weight))


def test_stage_timer_build_counts_and_computes_the_same(tmp_path):
    """The build benchmarks/decode_breakdown.py times with (-DNEURONSERVE_STAGE_TIMERS) compiles,
    counts the seconds of a dense_linear call, and gives the served build's bits; the served build
    exports no timers."""
    timed, read_timers = CpuDenseKernel.load_stage_timed(tmp_path, KERNEL.instruction_set)
    weight, x, bias = _case(576, 960, 3, torch.float16)
    before = read_timers()["dense_linear"]
    got = timed.linear(x, timed.pack(weight), bias)
    assert read_timers()["dense_linear"] > before
    assert torch.equal(got, KERNEL.linear(x, KERNEL.pack(weight), bias))
    assert not hasattr(KERNEL._library, "stage_timers")


def test_the_server_default_of_the_sparse_kernel_budget_is_the_kernels():
    from server.settings import ServerSettings

    field = ServerSettings.model_fields["wina_cpu_sparse_kernel_max_kept"]
    assert field.default == DEFAULT_SPARSE_KERNEL_MAX_KEPT
    assert KERNEL.sparse_kernel_max_kept == DEFAULT_SPARSE_KERNEL_MAX_KEPT
