"""The WINA Triton kernels against the plain-torch reference (kernels/wina_reference.py).

Runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below before triton is
imported); the GPU test reruns itself with the compiled kernel on CUDA where a device exists.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels import wina_triton as wt
from kernels.wina_reference import (
    column_norms,
    thresholds_for_topk,
    wina_gate_up_reference,
    wina_linear_reference,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The interpreter tests pass CPU tensors, which only the interpreted kernels accept; they are
# skipped if another module imported kernels.wina_triton first without TRITON_INTERPRET=1.
interpreted = pytest.mark.skipif(not wt.INTERPRETED,
                                 reason="kernels.wina_triton was imported without TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]

# Tolerances for the linear outputs, per output dtype, as (atol, rtol).
# Kernel and reference both form the same exact-in-fp32 products (16-bit inputs) or the same fp32
# products, and accumulate in fp32; only the summation order differs (the reference runs one
# matmul, the kernel sums BLOCK_K chunks, then split-K partials). For K <= 576 and |y| ~ 1 that is
# below ~sqrt(K) * 2**-24 * sum|x w| ~ 1e-5, hence fp32's 2e-5 absolute and 1e-5 relative. A
# 16-bit output is that fp32 value rounded once: a 1e-5 difference can move a value across a
# rounding midpoint, so the two may differ by one ulp of the output dtype, which is at most 2**-7
# of the value for bfloat16 (8-bit significand) and 2**-10 for float16 (11-bit significand); the
# 2e-5 absolute covers values near zero, where the fp32 difference itself shows.
TOLERANCES = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-5, 2**-7),
    torch.float16: (2e-5, 2**-10),
}
# One ulp relative to the value, per dtype, for the gate/up bound in _assert_gate_up_close; for
# fp32 the gate/up error is the summation-order one above (<= 2e-5 absolute, ~1e-5 relative).
ULP = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _problem(batch: int, k: int, segments: tuple[int, ...], dtype: torch.dtype, sparsity: float,
             bias: bool, seed: int = 0, device: str = "cpu"):
    """Random x, weight_t, norms, top-k thresholds (exactly round((1-s) K) kept) and bias."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(segments)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)  # [N, K], y ~ N(0, kept/K)
    x = torch.randn(batch, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    col_norms = column_norms(weight, segments)
    keep = round((1.0 - sparsity) * k)
    thresholds = thresholds_for_topk(x, col_norms, keep)
    tensors = (x, weight.t().contiguous(), col_norms, thresholds, b)
    return tuple(t.to(device) if t is not None else None for t in tensors), keep


def _assert_linear_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)


def _assert_gate_up_close(h, h_ref, x, weight_t, col_norms, thresholds, bias, dtype) -> None:
    """Elementwise bound for silu(gate) * up. Gate and up are each rounded to `dtype` (as in the
    reference) and may each differ from the reference's by one ulp (see TOLERANCES); silu' <= 1.1,
    so h moves by at most ulp * (1.1 |gate| |up| + |silu(gate)| |up|), plus one ulp of h for the
    final rounding and 2e-5 absolute for the fp32 differences near zero. A plain rtol would not do:
    h -> 0 as gate -> -inf while the gate term does not."""
    half = weight_t.shape[1] // 2
    gate_up, _ = wina_linear_reference(x, weight_t, col_norms, thresholds, (half, half), bias)
    gate, up = gate_up.float().split(half, dim=1)
    ulp = ULP[dtype]
    bound = ulp * (1.1 * gate.abs() * up.abs() + F.silu(gate).abs() * up.abs() + h_ref.float().abs()) + 2e-5
    assert h.dtype == h_ref.dtype == dtype and h.shape == h_ref.shape
    excess = (h.float() - h_ref.float()).abs() - bound
    assert excess.max().item() <= 0, f"gate_up off by {excess.max().item():.3g} beyond the bound"


def _check_linear(batch, k, segments, dtype, sparsity, bias, fn=wt.wina_linear_triton, **kwargs):
    (x, weight_t, col_norms, thresholds, b), keep = _problem(batch, k, segments, dtype, sparsity, bias)
    y, kept = fn(x, weight_t, col_norms, thresholds, segments, b, **kwargs)
    ref, ref_kept = wina_linear_reference(x, weight_t, col_norms, thresholds, segments, b)
    assert kept.dtype == torch.int32 and torch.equal(kept, ref_kept)
    assert torch.equal(kept, torch.full((batch, len(segments)), keep, dtype=torch.int32))
    if keep == 0:  # nothing kept: exactly the bias (or zeros)
        expected = b.expand(batch, -1) if b is not None else torch.zeros(batch, sum(segments), dtype=dtype)
        assert torch.equal(y, expected)
    _assert_linear_close(y, ref, dtype)


def _check_gate_up(batch, k, half, dtype, sparsity, bias, fn=wt.wina_gate_up_triton, **kwargs):
    (x, weight_t, col_norms, thresholds, b), keep = _problem(batch, k, (half, half), dtype, sparsity, bias)
    h, kept = fn(x, weight_t, col_norms, thresholds, b, **kwargs)
    ref, ref_kept = wina_gate_up_reference(x, weight_t, col_norms, thresholds, b)
    assert kept.dtype == torch.int32 and torch.equal(kept, ref_kept)
    assert torch.equal(kept, torch.full((batch, 2), keep, dtype=torch.int32))
    if keep == 0 and b is None:
        assert torch.equal(h, torch.zeros(batch, half, dtype=dtype))
    _assert_gate_up_close(h, ref, x, weight_t, col_norms, thresholds, b, dtype)


# ----------------------------------------------------------------------------------------------
# Interpreter tests (CPU)
# ----------------------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
@pytest.mark.parametrize("segments", [(53,), (20, 17, 16)], ids=["one_segment", "three_segments"])
def test_linear_odd_shapes(segments, batch, sparsity, dtype):
    _check_linear(batch, 37, segments, dtype, sparsity, bias=batch % 2 == 1)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_linear_qkv_shape(sparsity, dtype):
    """The default model's fused q/k/v: K=576, segments of different widths, on the tile kernel
    (the gather path's loop over kept channels is slow in the interpreter: it runs these shapes
    on the GPU, test_compiled_kernel_on_cuda)."""
    _check_linear(3, 576, (576, 192, 192), dtype, sparsity, bias=sparsity == 0.5, fn=wt.wina_linear_sparse)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_gate_up_odd_shapes(batch, sparsity, dtype):
    _check_gate_up(batch, 100, 70, dtype, sparsity, bias=batch == 4)


@interpreted
@pytest.mark.parametrize("config", [wt.WinaKernelConfig(block_k=16, block_n=16, use_dot=False),
                                    wt.WinaKernelConfig(block_k=16, block_n=16, split_k=3, num_stages=2),
                                    wt.WinaKernelConfig(block_k=16, block_n=16, use_dot=True)],
                         ids=["broadcast", "split_k3", "dot"])
@pytest.mark.parametrize(("batch", "dtype"), [(1, torch.float32), (5, torch.bfloat16), (12, torch.float16)],
                         ids=["1-fp32", "5-bf16", "12-fp16"])
def test_small_blocks_split_k_and_dot(batch, dtype, config):
    """16x16 tiles: several column blocks per segment, a K tail, the broadcast path (forced),
    split-K partials (3 splits of K=37 in 16-channel chunks) and the tl.dot path."""
    _check_linear(batch, 37, (20, 17, 16), dtype, 0.5, True, fn=wt.wina_linear_sparse, config=config)
    _check_gate_up(batch, 37, 21, dtype, 0.5, True, fn=wt.wina_gate_up_sparse, config=config)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [12, 16, 32])
def test_large_batch_sparse_kernel(batch, dtype):
    """Batch tiles of 16 and 32 rows take the tl.dot path; 32 is the kernel's limit."""
    _check_linear(batch, 37, (20, 17, 16), dtype, 0.5, True, fn=wt.wina_linear_sparse)
    _check_gate_up(batch, 37, 21, dtype, 0.5, True, fn=wt.wina_gate_up_sparse)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_above_crossover_takes_dense_path(dtype):
    batch = 32
    assert batch > wt.DENSE_CROSSOVER_BATCH
    _check_linear(batch, 37, (20, 17, 16), dtype, 0.5, True)
    _check_gate_up(batch, 37, 21, dtype, 0.9, False)


@interpreted
def test_mixed_input_and_weight_dtypes():
    """fp32 activations with bf16 weights: products in fp32, as the reference forms them."""
    (x, weight_t, col_norms, thresholds, b), _ = _problem(4, 37, (53,), torch.bfloat16, 0.5, True)
    x = x.float() + 1e-3  # values no bf16 can hold
    thresholds = thresholds_for_topk(x, col_norms, 18)
    for batch_limit in (wt.DENSE_CROSSOVER_BATCH, 0):  # sparse kernel, then dense path
        y, kept = wt.wina_linear_triton(x, weight_t, col_norms, thresholds, (53,), b,
                                        crossover_batch=batch_limit)
        ref, ref_kept = wina_linear_reference(x, weight_t, col_norms, thresholds, (53,), b)
        assert torch.equal(kept, ref_kept)
        _assert_linear_close(y, ref, torch.bfloat16)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_wrappers_run_the_gather_path(sparsity, dtype):
    """path="gather" (what --wina-gpu-kernel gather serves with) through the wrappers, one segment
    and three, odd shapes, and the fused gate/up."""
    for segments, batch in (((53,), 1), ((20, 17, 16), 5)):
        _check_linear(batch, 37, segments, dtype, sparsity, bias=batch == 5, path="gather")
    _check_gate_up(3, 100, 70, dtype, sparsity, bias=True, path="gather")


@interpreted
@pytest.mark.parametrize("batch", [4, 12])
def test_row_ignores_neighbours_masks(batch):
    """Row 0's output is bit-identical whatever the other rows keep, though their masks change
    which weight rows the kernel loads (fp32, the same kernel and tiles: exact equality)."""
    (x, weight_t, col_norms, thresholds, b), _ = _problem(batch, 100, (20, 17, 16), torch.float32, 0.5, True)
    y0, kept0 = wt.wina_linear_triton(x, weight_t, col_norms, thresholds, (20, 17, 16), b)
    (xg, wg, cng, thrg, bg), _ = _problem(batch, 100, (70, 70), torch.float32, 0.5, True)
    h0, hkept0 = wt.wina_gate_up_triton(xg, wg, cng, thrg, bg)
    for neighbours_keep in (0, 10, 100):
        other = thresholds.clone()
        other[1:] = thresholds_for_topk(x[1:], col_norms, neighbours_keep)
        y1, kept1 = wt.wina_linear_triton(x, weight_t, col_norms, other, (20, 17, 16), b)
        assert torch.equal(y1[0], y0[0]) and torch.equal(kept1[0], kept0[0])
        other = thrg.clone()
        other[1:] = thresholds_for_topk(xg[1:], cng, neighbours_keep)
        h1, hkept1 = wt.wina_gate_up_triton(xg, wg, cng, other, bg)
        assert torch.equal(h1[0], h0[0]) and torch.equal(hkept1[0], hkept0[0])


# The two ways to skip rows: (linear, gate_up) launchers of the tile kernels and of the gather path.
PATHS = {"tile": (wt.wina_linear_sparse, wt.wina_gate_up_sparse),
         "gather": (wt.wina_linear_gather, wt.wina_gate_up_gather)}


SHAPES = ((100, (20, 17, 16), False), (576, (576, 192, 192), False), (576, (1536, 1536), True))
SMALL_SHAPES = ((100, (20, 17, 16), False), (130, (40, 40), True))


def _check_row_same_at_any_batch(dtype: torch.dtype, path: str, device: str = "cpu", shapes=SHAPES,
                                 **kwargs) -> None:
    """Row 0 alone and in batches of 2..16 rows whose other rows keep other channels: the same
    bits. The tile kernels run every such batch in the same 16-row tile (an MMA's output row
    depends on its own input row alone); the gather path adds each row's products in channel
    order whatever its neighbours keep. `kwargs` go to the launchers (a config)."""
    linear, gate_up_fn = PATHS[path]
    for k, segments, gate_up in shapes:
        (x, weight_t, col_norms, thresholds, b), _ = _problem(16, k, segments, dtype, 0.5, True, device=device)
        thresholds[1:] = thresholds_for_topk(x[1:], col_norms, k // 4)  # the neighbours keep fewer
        outputs = []
        for batch in (1, 2, 5, 16):
            if gate_up:
                outputs.append(gate_up_fn(x[:batch], weight_t, col_norms, thresholds[:batch], b, **kwargs))
            else:
                outputs.append(linear(x[:batch], weight_t, col_norms, thresholds[:batch], segments, b, **kwargs))
        for y, kept in outputs[1:]:
            assert torch.equal(y[0], outputs[0][0][0]) and torch.equal(kept[0], outputs[0][1][0])


@interpreted
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_same_at_any_batch_size(dtype, path):
    if path == "tile":
        _check_row_same_at_any_batch(dtype, path)
    else:  # smaller shapes (the interpreter is slow on this loop), in several chunks
        _check_row_same_at_any_batch(dtype, path, shapes=SMALL_SHAPES, config=wt.GatherConfig(chunk=32, block_n=64))


@interpreted
@pytest.mark.parametrize("config", [wt.GatherConfig(chunk=16, block_n=16, unroll=4),
                                    wt.GatherConfig(chunk=8, block_n=32, unroll=2, num_warps=2, reduce_block_n=16,
                                                    reduce_unroll=2),
                                    wt.GatherConfig(chunk=16, block_n=16, unroll=4, fused=True),
                                    wt.GatherConfig(chunk=8, block_n=16, unroll=2, loop_stages=3)],
                         ids=["chunk16", "chunk8", "chunk16-fused", "chunk8-pipelined"])
@pytest.mark.parametrize(("batch", "dtype"), [(1, torch.float32), (5, torch.bfloat16), (12, torch.float16)],
                         ids=["1-fp32", "5-bf16", "12-fp16"])
def test_gather_small_chunks(batch, dtype, config):
    """Several chunks with a K tail (K=37), several column blocks per segment and a kept count
    that is not a multiple of the unroll: the gather path against the reference."""
    _check_linear(batch, 37, (20, 17, 16), dtype, 0.5, True, fn=wt.wina_linear_gather, config=config)
    _check_gate_up(batch, 37, 21, dtype, 0.5, True, fn=wt.wina_gate_up_gather, config=config)


def _check_fused_gather_same_bits(device: str, cases, **config) -> None:
    """The fused gather path (each GEMV program compacts its own chunk) and the three-launch one
    add the same products in the same order: the same bits, and the same kept counts."""
    for batch, k, segments, gate_up in cases:
        (x, weight_t, col_norms, thresholds, b), _ = _problem(batch, k, segments, torch.float16, 0.5, True,
                                                              device=device)
        base = wt.gather_config(batch, k, segments, x.device)
        if config:
            base = replace(base, **config)
        outputs = []
        for fused in (False, True):
            if gate_up:
                outputs.append(wt.wina_gate_up_gather(x, weight_t, col_norms, thresholds, b,
                                                      config=replace(base, fused=fused)))
            else:
                outputs.append(wt.wina_linear_gather(x, weight_t, col_norms, thresholds, segments, b,
                                                     config=replace(base, fused=fused)))
        (y0, kept0), (y1, kept1) = outputs
        assert torch.equal(y0, y1) and torch.equal(kept0, kept1)


@interpreted
def test_fused_gather_same_bits():
    _check_fused_gather_same_bits("cpu", [(5, 37, (20, 17, 16), False), (3, 37, (21, 21), True)],
                                  chunk=16, block_n=16, unroll=4)


@interpreted
def test_empty_batch():
    (x, weight_t, col_norms, thresholds, b), _ = _problem(0, 37, (20, 17, 16), torch.bfloat16, 0.5, True)
    y, kept = wt.wina_linear_triton(x, weight_t, col_norms, thresholds, (20, 17, 16), b)
    assert y.shape == (0, 53) and y.dtype == torch.bfloat16 and kept.shape == (0, 3)
    (x, weight_t, col_norms, thresholds, b), _ = _problem(0, 37, (21, 21), torch.float16, 0.5, False)
    h, kept = wt.wina_gate_up_triton(x, weight_t, col_norms, thresholds, b)
    assert h.shape == (0, 21) and h.dtype == torch.float16 and kept.shape == (0, 2)


@interpreted
def test_rejects_what_it_cannot_do():
    (x, weight_t, col_norms, thresholds, _), _ = _problem(2, 37, (20, 17, 16), torch.float32, 0.5, False)
    with pytest.raises(ValueError, match="at most 32 rows"):
        big = x.repeat(17, 1)
        wt.wina_linear_sparse(big, weight_t, col_norms, thresholds.repeat(17, 1), (20, 17, 16))
    with pytest.raises(ValueError, match="segments"):
        wt.wina_linear_triton(x, weight_t, col_norms[:1].repeat(4, 1), thresholds[:, :1].repeat(1, 4),
                              (10, 10, 17, 16))
    with pytest.raises(ValueError, match="weight_t must be"):
        wt.wina_linear_triton(x, weight_t[:, :50], col_norms, thresholds, (20, 17, 16))
    with pytest.raises(ValueError, match="contiguous"):
        wt.wina_linear_triton(x, weight_t.t().contiguous().t(), col_norms, thresholds, (20, 17, 16))
    with pytest.raises(ValueError, match="thresholds"):
        wt.wina_linear_triton(x, weight_t, col_norms, thresholds.double(), (20, 17, 16))
    with pytest.raises(ValueError, match="crossover_batch"):
        wt.wina_linear_triton(x, weight_t, col_norms, thresholds, (20, 17, 16), crossover_batch=64)
    with pytest.raises(ValueError, match="gate then up"):
        wt.wina_gate_up_triton(x, weight_t, col_norms, thresholds)
    with pytest.raises(ValueError, match="unknown sparse path"):
        wt.wina_linear_triton(x, weight_t, col_norms, thresholds, (20, 17, 16), path="scatter")
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        wt.wina_linear_gather(x, weight_t, col_norms, thresholds, (20, 17, 16), config=wt.GatherConfig(24, 16))
    with pytest.raises(ValueError, match="at most 32 rows"):
        wt.wina_linear_gather(x.repeat(17, 1), weight_t, col_norms, thresholds.repeat(17, 1), (20, 17, 16))


# ----------------------------------------------------------------------------------------------
# The compiled kernel on CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernel_on_cuda():
    if wt.INTERPRETED:
        # This process decorated the kernels for the interpreter; rerun this test in a fresh one
        # where Triton compiles them.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{Path(__file__).resolve()}::test_compiled_kernel_on_cuda"],
            check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        return

    def run(fn, ref_fn, batch, k, segments, dtype, sparsity, gate_up):
        (x, weight_t, col_norms, thresholds, b), keep = _problem(batch, k, segments, dtype, sparsity, True,
                                                                 device="cuda")
        if gate_up:
            out, kept = fn(x, weight_t, col_norms, thresholds, b)
            ref, ref_kept = ref_fn(x, weight_t, col_norms, thresholds, b)
            _assert_gate_up_close(out, ref, x, weight_t, col_norms, thresholds, b, dtype)
        else:
            out, kept = fn(x, weight_t, col_norms, thresholds, segments, b)
            ref, ref_kept = ref_fn(x, weight_t, col_norms, thresholds, segments, b)
            atol, rtol = TOLERANCES[dtype]
            # Shapes up to K=14336 here: the fp32 summation-order difference grows ~sqrt(K), so
            # 5x the interpreter tests' absolute tolerance; the one-ulp relative part is unchanged.
            torch.testing.assert_close(out, ref, atol=5 * atol, rtol=rtol)
        assert torch.equal(kept, ref_kept)
        assert torch.equal(kept, torch.full_like(kept, keep))
        return x, weight_t, col_norms, thresholds, b, out

    for dtype in DTYPES:
        for path, (linear, gate_up) in PATHS.items():
            for batch in (1, 2, 4, 8, 12, 16, 32):
                for sparsity in (0.0, 0.5, 0.9, 1.0):
                    run(linear, wina_linear_reference, batch, 576, (576, 192, 192), dtype, sparsity, False)
                    run(linear, wina_linear_reference, batch, 37, (20, 17, 16), dtype, sparsity, False)
                    run(gate_up, wina_gate_up_reference, batch, 576, (1536, 1536), dtype, sparsity, True)
            _check_row_same_at_any_batch(dtype, path, "cuda")
        # the wrappers (dense above the crossover) and split-K on a Llama-3-8B down projection
        run(wt.wina_linear_triton, wina_linear_reference, 32, 576, (576, 192, 192), dtype, 0.5, False)
        run(wt.wina_gate_up_triton, wina_gate_up_reference, 32, 576, (1536, 1536), dtype, 0.5, True)
        run(wt.wina_linear_triton, wina_linear_reference, 1, 14336, (4096,), dtype, 0.5, False)
        run(wt.wina_linear_sparse, wina_linear_reference, 1, 14336, (4096,), dtype, 0.5, False)
        run(wt.wina_gate_up_triton, wina_gate_up_reference, 8, 4096, (14336, 14336), dtype, 0.5, True)

    _check_fused_gather_same_bits("cuda", [(batch, 14336, (4096,), False) for batch in (1, 8)]
                                  + [(batch, 4096, (14336, 14336), True) for batch in (1, 8)]
                                  + [(3, 576, (576, 192, 192), False)])

    # Row 0 is bit-identical whatever its neighbours keep (fp32 and fp16, on the real kernels).
    for dtype in (torch.float32, torch.float16):
        for batch in (4, 16):
            for linear, _ in PATHS.values():
                x, weight_t, col_norms, thresholds, b, y0 = run(
                    linear, wina_linear_reference, batch, 576, (576, 192, 192), dtype, 0.5, False)
                other = thresholds.clone()
                other[1:] = thresholds_for_topk(x[1:], col_norms, 50)
                y1, _ = linear(x, weight_t, col_norms, other, (576, 192, 192), b)
                assert torch.equal(y1[0], y0[0])


def test_tuned_config_table_round_trip(tmp_path):
    """A tuning file as benchmarks/wina_tune_gpu.py writes it loads back into the same configs."""
    config = wt.WinaKernelConfig(block_k=64, block_n=128, split_k=7, num_warps=8, use_dot=False, num_stages=2)
    key = wt.tuning_key(False, 1, 14336, (4096,), 2)
    assert key == "linear B1 K14336 N4096 W2"
    assert wt.tuning_key(True, 16, 576, (1536, 1536), 4) == "gate_up B16 K576 N1536+1536 W4"
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"configs": {key: {k: v for k, v in asdict(config).items() if v is not None}}}))
    assert wt.load_tuned_configs(path) == {key: config}
    assert wt.load_tuned_configs(tmp_path / "missing.json") == {}
    assert wt.tuned_configs_path("NVIDIA H100 80GB HBM3").name == "nvidia_h100_80gb_hbm3.json"


@pytest.mark.parametrize("path", sorted(wt.TUNED_CONFIGS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_committed_tuned_configs_are_launchable(path):
    """Every committed tuning entry names a kernel, a batch tile and shapes, and a config that the
    launcher accepts (powers of two, the tile's path)."""
    for key, config in wt.load_tuned_configs(path).items():
        kernel, tile, k, widths, weight_bytes = key.split(" ")
        assert kernel in ("linear", "gate_up") and tile[0] == "B" and k[0] == "K" and widths[0] == "N"
        assert weight_bytes in ("W2", "W4")
        block_b = int(tile[1:])
        assert config.use_dot in (None, block_b >= 16)
        for value in (config.block_k, config.block_n):
            assert value >= 16 and value & (value - 1) == 0
        assert config.split_k >= 1 and config.num_warps in (1, 2, 4, 8, 16)
