"""Triton kernels for WINA sparse GEMV: a linear layer that reads only the weight rows its rows keep.

Semantics are those of `kernels/wina_reference.py` (the oracle): row b keeps input channel i for
segment g when `|x[b, i]| * col_norms[g, i] > thresholds[b, g]`, and segment g's outputs are
`(x[b] * keep[b, g]) @ weight_t[:, segment g]`, accumulated in float32.

How the kernel skips memory traffic: `weight_t` is [K, N] row-major, so input channel k is one
contiguous weight row. Each program owns a block of output columns (inside one segment) and a range
of input channels; for every BLOCK_K chunk it loads x for all batch rows, computes each row's mask
in registers, and loads the weight rows that *at least one* row keeps with a masked `tl.load`
(masked-off rows issue no memory transactions). Each row then multiplies by its own masked input,
so a row's result never depends on its neighbours' masks: a weight row loaded only for a neighbour
meets a zero input. This is TEAL's gather idea made correct for every batch size (TEAL's kernel
skips rows by batch row 0's mask alone).

Two ways to do that skipping:

* the tile kernels (`wina_linear_sparse` / `wina_gate_up_sparse`), serving's default: one
  launch; each program walks every BLOCK_K chunk of its K range and masks the weight rows no row
  keeps;
* the gather path (`wina_linear_gather` / `wina_gate_up_gather`): a compaction lists, per chunk
  of channels, those some row keeps (with each row's masked input), in its own launch or (fused)
  at the start of each GEMV program; the GEMV then walks that list only, so its loop does no work
  for skipped rows; a last launch adds the chunks' partial sums in a fixed order. Faster at batch
  1 and 2, slower from batch 4-8 (benchmarks/RESULTS.md, "WINA on a GPU");
  `--wina-gpu-kernel gather` serves with it.

Each path gives a row the same bits at any batch size (see each section for why); the two paths
differ from each other in summation order, so a server uses one of them for every batch.

Above `DENSE_CROSSOVER_BATCH` rows, the union of the rows' masks covers most weight rows and
cuBLAS wins, so the wrapper masks x in torch and runs a dense matmul (same semantics).

Layers (Liger-style): private `@triton.jit` kernels; launchers (check shapes, allocate, pick block
sizes, launch); thin wrappers `wina_linear_triton` / `wina_gate_up_triton` that run the chosen
sparse path or, above the crossover, the dense one.

Triton is imported only here. With `TRITON_INTERPRET=1` set before this module is imported the
kernels run in Triton's interpreter on CPU tensors (the tests do this); otherwise they compile for
CUDA and need CUDA tensors.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.wina_reference import wina_mask

# Batches larger than this take the dense path (mask x in torch, then cuBLAS). 16 is a first guess
# from the roofline (the union of 16 rows' masks at 50 % sparsity already covers nearly every weight
# row); tune it on a GPU with benchmarks/wina_kernel_gpu.py.
DENSE_CROSSOVER_BATCH = 16
MAX_SPARSE_BATCH = 32  # the sparse kernel holds every batch row in one tile (BLOCK_B <= 32)
MAX_SEGMENTS = 3  # fused q/k/v
# Batches of at least this many rows pad the batch tile to >= 16 rows and use tl.dot (tensor cores)
# instead of a broadcast multiply-and-sum; memory-bound, the padding costs no bandwidth. At 1 every
# batch of 1 to 16 rows runs the same compiled kernel with the same K chunks, so a row gets the
# same bits whatever its batch (an MMA's output row depends on its own input row alone): with the
# broadcast path at batch 1 (faster there on an H100 by the ratio in benchmarks/RESULTS.md,
# "WINA on a GPU"), a sparse bfloat16 row of the stand-in model moved by 2.7 in its logits between
# batch 1 and batch 3, as the paths' different roundings flipped masks near their thresholds.
# The broadcast path stays for use_dot=False (tests, comparisons).
DOT_MIN_BATCH = 1
SparsePath = Literal["tile", "gather"]  # the two sparse kernels (see the module docstring)
SPARSE_PATHS = ("tile", "gather")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ELEMENTS = 2**31  # pointer offsets are int32 inside the kernels
TUNED_CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # one JSON file per GPU model
TUNED_CONFIGS_ENV = "NEURONSERVE_WINA_CONFIGS"  # a tuning file to use instead


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _accumulate(acc, xm, w, USE_DOT: tl.constexpr, DOT_NATIVE: tl.constexpr):
    """acc [BLOCK_B, BLOCK_N] fp32 += xm [BLOCK_B, BLOCK_K] fp32 @ w [BLOCK_K, BLOCK_N]."""
    if USE_DOT:
        if DOT_NATIVE:
            # x and w share a 16-bit dtype, so casting the masked x back to it is exact; the
            # tensor-core products are exact and accumulate in fp32.
            acc = tl.dot(xm.to(w.dtype), w, acc)
        else:
            # fp32 (or mixed) inputs: full-precision dot, never TF32.
            acc = tl.dot(xm, w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc += tl.sum(xm[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _segment_block(pid_n, N0, N1, N2, BLOCK_N: tl.constexpr):
    """Grid axis 0 enumerates the column blocks of segment 0, then 1, then 2, so every block lies
    inside one segment and uses that segment's norms and thresholds. -> (segment g, block index
    inside it, output columns [BLOCK_N], which of them exist)."""
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    in1 = (pid_n >= nb0).to(tl.int32)
    in2 = (pid_n >= nb0 + nb1).to(tl.int32)
    seg_start = N0 * in1 + N1 * in2
    seg_end = seg_start + N0 + (N1 - N0) * in1 + (N2 - N1) * in2
    local_block = pid_n - nb0 * in1 - nb1 * in2
    offs_n = seg_start + local_block * BLOCK_N + tl.arange(0, BLOCK_N)
    return in1 + in2, local_block, offs_n, offs_n < seg_end


@triton.jit
def _wina_linear_kernel(
    x_ptr,  # [B, K] input rows (fp32 / bf16 / fp16)
    w_ptr,  # [K, N] transposed weight, row-major (column stride 1): row k is input channel k
    cn_ptr,  # [G, K] float32 WINA column norms, one row per segment
    thr_ptr,  # [B, G] float32 per-row, per-segment thresholds
    bias_ptr,  # [N] bias; any pointer when HAS_BIAS is False (never read)
    y_ptr,  # [B, N] output in the weight dtype; with PARTIALS [splits, B, N] fp32 partial sums
    kept_ptr,  # [B, G] int32 kept counts: stored, or with PARTIALS atomically added (pre-zeroed)
    B,  # batch rows (<= BLOCK_B)
    K,  # input channels
    N0,  # width of segment 0
    N1,  # width of segment 1 (0 when there is one segment)
    N2,  # width of segment 2 (0 when there are fewer than three)
    stride_xb, stride_xk,  # x strides: row, channel
    stride_wk,  # weight_t row stride (its column stride is 1)
    stride_cg, stride_ck,  # col_norms strides: segment, channel
    stride_tb, stride_tg,  # thresholds strides: row, segment
    stride_ys, stride_yb,  # y strides: split (partials only), row (column stride is 1)
    stride_kb, stride_kg,  # kept strides: row, segment
    K_PER_SPLIT,  # input channels per split-K program, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,  # add bias_ptr in the epilogue (without PARTIALS; else the reduction adds it)
    PARTIALS: tl.constexpr,  # several programs along K (grid axis 1) write fp32 partial sums
    BLOCK_B: tl.constexpr,  # batch rows per tile: next power of two >= B (>= 16 with USE_DOT)
    BLOCK_K: tl.constexpr,  # input channels per loop step
    BLOCK_N: tl.constexpr,  # output columns per program
    USE_DOT: tl.constexpr,  # tl.dot (BLOCK_B >= 16) instead of a broadcast multiply-and-sum
    DOT_NATIVE: tl.constexpr,  # x and w share a 16-bit dtype: dot in that dtype
):
    pid_k = tl.program_id(1)
    g, local_block, offs_n, n_ok = _segment_block(tl.program_id(0), N0, N1, N2, BLOCK_N)

    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    thr = tl.load(thr_ptr + offs_b * stride_tb + g * stride_tg, mask=b_ok, other=0.0)

    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    kept = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.int32)  # per-lane counts, reduced after the loop
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        valid = b_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk,
                    mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_K]
        cn = tl.load(cn_ptr + g * stride_cg + offs_k * stride_ck, mask=k_ok, other=0.0)  # [BLOCK_K]
        keep = (tl.abs(x) * cn[None, :] > thr[:, None]) & valid  # each row's own mask
        kept += keep.to(tl.int32)
        need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some row keeps channel k
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                    mask=need[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = _accumulate(acc, tl.where(keep, x, 0.0), w, USE_DOT, DOT_NATIVE)

    kept = tl.sum(kept, axis=1)
    out_mask = b_ok[:, None] & n_ok[None, :]
    first_block = local_block == 0  # one program per (segment, split) reports the counts
    if not PARTIALS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        if first_block:
            tl.store(kept_ptr + offs_b * stride_kb + g * stride_kg, kept, mask=b_ok)
    else:
        tl.store(y_ptr + pid_k * stride_ys + offs_b[:, None] * stride_yb + offs_n[None, :], acc,
                 mask=out_mask)
        if first_block:
            tl.atomic_add(kept_ptr + offs_b * stride_kb + g * stride_kg, kept, mask=b_ok)


@triton.jit
def _wina_gate_up_kernel(
    x_ptr,  # [B, K] input rows (fp32 / bf16 / fp16)
    w_ptr,  # [K, 2I] transposed gate|up weight, row-major (column stride 1)
    cn_ptr,  # [2, K] float32 column norms: gate, up
    thr_ptr,  # [B, 2] float32 thresholds: gate, up
    bias_ptr,  # [2I] bias; any pointer when HAS_BIAS is False (never read)
    y_ptr,  # [B, I] silu(gate) * up in the weight dtype; with PARTIALS [splits, B, 2I] fp32 partials
    kept_ptr,  # [B, 2] int32 kept counts: stored, or with PARTIALS atomically added (pre-zeroed)
    B,  # batch rows (<= BLOCK_B)
    K,  # input channels
    I,  # intermediate width (gate and up columns each)
    stride_xb, stride_xk,  # x strides: row, channel
    stride_wk,  # weight_t row stride (its column stride is 1)
    stride_cg, stride_ck,  # col_norms strides: segment, channel
    stride_tb, stride_tg,  # thresholds strides: row, segment
    stride_ys, stride_yb,  # y strides: split (partials only), row (column stride is 1)
    stride_kb, stride_kg,  # kept strides: row, segment
    K_PER_SPLIT,  # input channels per split-K program, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,  # add bias_ptr in the epilogue (without PARTIALS; else the reduction adds it)
    PARTIALS: tl.constexpr,  # several programs along K (grid axis 1) write fp32 partial sums
    BLOCK_B: tl.constexpr,  # batch rows per tile: next power of two >= B (>= 16 with USE_DOT)
    BLOCK_K: tl.constexpr,  # input channels per loop step
    BLOCK_N: tl.constexpr,  # intermediate columns per program (each of gate and up)
    USE_DOT: tl.constexpr,  # tl.dot (BLOCK_B >= 16) instead of a broadcast multiply-and-sum
    DOT_NATIVE: tl.constexpr,  # x and w share a 16-bit dtype: dot in that dtype
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # gate columns; up columns are I + offs_n
    n_ok = offs_n < I
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    thr_g = tl.load(thr_ptr + offs_b * stride_tb, mask=b_ok, other=0.0)
    thr_u = tl.load(thr_ptr + offs_b * stride_tb + stride_tg, mask=b_ok, other=0.0)

    acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    kept_g = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.int32)  # per-lane counts, reduced after the loop
    kept_u = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.int32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        valid = b_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk,
                    mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_K], read once for both
        x_abs = tl.abs(x)
        cn_g = tl.load(cn_ptr + offs_k * stride_ck, mask=k_ok, other=0.0)
        cn_u = tl.load(cn_ptr + stride_cg + offs_k * stride_ck, mask=k_ok, other=0.0)
        keep_g = (x_abs * cn_g[None, :] > thr_g[:, None]) & valid
        keep_u = (x_abs * cn_u[None, :] > thr_u[:, None]) & valid
        kept_g += keep_g.to(tl.int32)
        kept_u += keep_u.to(tl.int32)
        need_g = tl.max(keep_g.to(tl.int32), axis=0) > 0
        need_u = tl.max(keep_u.to(tl.int32), axis=0) > 0
        w_rows = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :]
        w_g = tl.load(w_rows, mask=need_g[:, None] & n_ok[None, :], other=0.0)
        w_u = tl.load(w_rows + I, mask=need_u[:, None] & n_ok[None, :], other=0.0)
        acc_g = _accumulate(acc_g, tl.where(keep_g, x, 0.0), w_g, USE_DOT, DOT_NATIVE)
        acc_u = _accumulate(acc_u, tl.where(keep_u, x, 0.0), w_u, USE_DOT, DOT_NATIVE)

    kept_g = tl.sum(kept_g, axis=1)
    kept_u = tl.sum(kept_u, axis=1)
    out_mask = b_ok[:, None] & n_ok[None, :]
    first_block = pid_n == 0  # one program per split reports the counts
    if not PARTIALS:
        if HAS_BIAS:
            acc_g += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bias_ptr + I + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # Round gate and up to the output dtype first, as the reference materialises them there.
        gate = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], h.to(y_ptr.dtype.element_ty),
                 mask=out_mask)
        if first_block:
            tl.store(kept_ptr + offs_b * stride_kb, kept_g, mask=b_ok)
            tl.store(kept_ptr + offs_b * stride_kb + stride_kg, kept_u, mask=b_ok)
    else:
        partial = y_ptr + pid_k * stride_ys + offs_b[:, None] * stride_yb + offs_n[None, :]
        tl.store(partial, acc_g, mask=out_mask)
        tl.store(partial + I, acc_u, mask=out_mask)
        if first_block:
            tl.atomic_add(kept_ptr + offs_b * stride_kb, kept_g, mask=b_ok)
            tl.atomic_add(kept_ptr + offs_b * stride_kb + stride_kg, kept_u, mask=b_ok)


@triton.jit
def _sum_partials_kernel(
    p_ptr,  # [splits, B, W] fp32 partial sums of a split launch (split-K, or the gather path's chunks)
    bias_ptr,  # [W] bias; any pointer when HAS_BIAS is False (never read)
    y_ptr,  # [B, N] output in the weight dtype: N = W, or W / 2 with SWIGLU
    kept_part_ptr,  # [splits, B, G] int32 per-split kept counts; any pointer without COUNT_KEPT
    kept_ptr,  # [B, G] int32 out: their sums; any pointer without COUNT_KEPT
    SPLITS,  # partial sums per output
    N,  # output columns
    G,  # segments (COUNT_KEPT only)
    stride_ps, stride_pb,  # partials strides: split, row (column stride is 1)
    stride_yb,  # output row stride (column stride is 1)
    stride_ks,  # kept_part split stride (its row stride is G, segment stride 1)
    HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr,  # partials hold gate | up (W = 2N): the output is silu(gate) * up
    COUNT_KEPT: tl.constexpr,  # also sum the per-split kept counts (programs of column block 0)
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,  # kept counts: splits loaded per step
    UNROLL: tl.constexpr,  # partials loaded per loop step (independent loads in flight)
):
    """One launch after a split launch: sums the partials in split order, one after the other (the
    same sum on every run, unlike float atomics, and whatever the block shapes), adds the bias,
    rounds, and for gate/up applies SwiGLU."""
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    partial = p_ptr + row * stride_pb + offs_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # up columns (SWIGLU only)
    for s0 in range(0, SPLITS, UNROLL):
        for u in tl.static_range(UNROLL):
            live = n_ok & (offs_n * 0 + s0 + u < SPLITS)  # past the last split: an exact 0
            acc += tl.load(partial + (s0 + u) * stride_ps, mask=live, other=0.0)
            if SWIGLU:
                acc_u += tl.load(partial + (s0 + u) * stride_ps + N, mask=live, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            acc_u += tl.load(bias_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SWIGLU:  # as the unsplit kernel: gate and up rounded to the output dtype first
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * stride_yb + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    if COUNT_KEPT:  # noqa: SIM102  (a compile-time branch around a run-time one)
        if tl.program_id(1) == 0:
            # Integers: any order gives the same sum, so BLOCK_S splits at a time (one split per
            # step made 100+ dependent loads on Llama-3-8B's down projection).
            offs_g = tl.arange(0, BLOCK_G)
            offs_s = tl.arange(0, BLOCK_S)
            g_ok = offs_g < G
            kept = tl.zeros((BLOCK_G,), dtype=tl.int32)
            for s0 in range(0, SPLITS, BLOCK_S):
                s_ok = s0 + offs_s < SPLITS
                kept += tl.sum(tl.load(kept_part_ptr + (s0 + offs_s)[:, None] * stride_ks + row * G + offs_g[None, :],
                                       mask=s_ok[:, None] & g_ok[None, :], other=0), axis=0)
            tl.store(kept_ptr + row * G + offs_g, kept, mask=g_ok)


# ----------------------------------------------------------------------------------------------
# Gather path: compact the kept channels, then read only their weight rows
# ----------------------------------------------------------------------------------------------
#
# The tile kernels above walk every K chunk and mask the weight rows no row keeps: at batch 1 their
# time hardly moves from 50 % to 90 % sparsity (latency, not bytes, bounds their K loop). The
# gather path does the mask work once, in a compaction launch, and its GEMV then walks only the
# kept rows. Every output is still one sum in a fixed order whatever the batch: each thread adds
# its products one kept channel after the other in increasing channel order (a channel kept only
# by a neighbour adds an exact 0), each chunk of CHUNK channels is one partial, and the partials
# are added in chunk order. So a row gets the same bits alone or in any batch, as long as CHUNK
# does not depend on the batch (`gather_config` picks it from the shape alone).


@triton.jit
def _compact_chunk(
    x_ptr, cn_ptr, thr_ptr,  # inputs as in _wina_compact_kernel
    index_ptr,  # [CHUNK] int32 out (this chunk's list): the channels some row keeps, in increasing order
    xm_ptr,  # [CHUNK, BLOCK_B] float32 out: each row's input at those channels (0: not kept)
    kept_ptr,  # [B] int32 out, stride G: each row's own kept count in the chunk
    c, g, B, K, G,
    stride_xb, stride_xk, stride_cg, stride_ck, stride_tb, stride_tg,
    kept_writer,  # this program writes the kept counts where 0
    BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Lists the channels of chunk c that some row keeps for segment g (a `tl.cumsum` over the
    union of the rows' masks) with each row's masked input. -> how many."""
    offs_k = c * CHUNK + tl.arange(0, CHUNK)
    k_ok = offs_k < K
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    valid = b_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk,
                mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B, CHUNK]
    cn = tl.load(cn_ptr + g * stride_cg + offs_k * stride_ck, mask=k_ok, other=0.0)
    thr = tl.load(thr_ptr + offs_b * stride_tb + g * stride_tg, mask=b_ok, other=0.0)
    keep = (tl.abs(x) * cn[None, :] > thr[:, None]) & valid  # each row's own mask
    need = tl.max(keep.to(tl.int32), axis=0)  # [CHUNK]: 1 where some row keeps the channel
    slot = tl.cumsum(need, axis=0) - 1  # its place in the compacted list
    tl.store(index_ptr + slot, offs_k, mask=need > 0)
    tl.store(xm_ptr + slot[None, :] * BLOCK_B + offs_b[:, None], tl.where(keep, x, 0.0),
             mask=(need[None, :] > 0) & b_ok[:, None])
    tl.store(kept_ptr + offs_b * G, tl.sum(keep.to(tl.int32), axis=1), mask=b_ok & (offs_b * 0 + kept_writer == 0))
    return tl.sum(need, axis=0)


@triton.jit
def _wina_compact_kernel(
    x_ptr,  # [B, K] input rows
    cn_ptr,  # [G, K] float32 column norms
    thr_ptr,  # [B, G] float32 thresholds
    index_ptr,  # [G, CHUNKS, CHUNK] int32 out: each chunk's list of kept channels
    xm_ptr,  # [G, CHUNKS, CHUNK, BLOCK_B] float32 out: each row's input at those channels
    count_ptr,  # [G, CHUNKS] int32 out: how many channels of the chunk some row keeps
    kept_ptr,  # [CHUNKS, B, G] int32 out: each row's own kept count in the chunk
    B, K, CHUNKS, G,
    stride_xb, stride_xk, stride_cg, stride_ck, stride_tb, stride_tg,
    BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    g = tl.program_id(1)
    base = g * CHUNKS + c
    count = _compact_chunk(x_ptr, cn_ptr, thr_ptr, index_ptr + base * CHUNK, xm_ptr + base * CHUNK * BLOCK_B,
                           kept_ptr + c * B * G + g, c, g, B, K, G,
                           stride_xb, stride_xk, stride_cg, stride_ck, stride_tb, stride_tg, 0,
                           BLOCK_B=BLOCK_B, CHUNK=CHUNK)
    tl.store(count_ptr + base, count)


@triton.jit
def _wina_gather_kernel(
    w_ptr,  # [K, N] transposed weight, row-major (column stride 1)
    x_ptr, cn_ptr, thr_ptr,  # FUSED: the inputs, as in _wina_compact_kernel (else never read)
    index_ptr, xm_ptr,  # the compacted lists; FUSED: this launch's scratch, [programs, CHUNKS, CHUNK(, BLOCK_B)]
    count_ptr,  # [G, CHUNKS] the lists' lengths (not FUSED; else never read)
    kept_ptr,  # FUSED: [CHUNKS, B, G] int32 out, as in _wina_compact_kernel (else never written)
    p_ptr,  # [CHUNKS, B, N] float32 out: each chunk's partial sums
    B, K, CHUNKS, G,
    N0, N1, N2,  # segment widths (0 for absent segments)
    stride_wk,
    stride_xb, stride_xk, stride_cg, stride_ck, stride_tb, stride_tg,
    BLOCK_B: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,  # kept rows loaded per loop step (independent loads in flight)
    EVEN_N: tl.constexpr,  # every segment width is a multiple of BLOCK_N: no column mask
    FUSED: tl.constexpr,  # each program compacts its own chunk first (no compaction launch)
    LOOP_STAGES: tl.constexpr,  # software-pipelining depth of the kept-row loop (None: none)
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    g, local_block, offs_n, n_ok = _segment_block(pid_n, N0, N1, N2, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B

    if FUSED:
        # Every column block of a chunk lists the same channels; each writes its own copy (a
        # private scratch list, so no program reads another's writes) and the first column block
        # of the segment writes the kept counts.
        base = (pid_n * CHUNKS + c) * CHUNK
        count = _compact_chunk(x_ptr, cn_ptr, thr_ptr, index_ptr + base, xm_ptr + base * BLOCK_B,
                               kept_ptr + c * B * G + g, c, g, B, K, G,
                               stride_xb, stride_xk, stride_cg, stride_ck, stride_tb, stride_tg,
                               local_block, BLOCK_B=BLOCK_B, CHUNK=CHUNK)
        tl.debug_barrier()  # the list's stores, by every thread of the program, before its loads
    else:
        base = (g * CHUNKS + c) * CHUNK
        count = tl.load(count_ptr + g * CHUNKS + c)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    # Each load below is shaped like acc or like one of its rows ([BLOCK_B, 1] inputs, [1, BLOCK_N]
    # weight rows), so it lands in acc's layout and broadcasts in registers. A 1-D weight row took a
    # layout conversion through shared memory per row, which serialised the loop (an H100: ~0.8
    # TB/s whatever the sparsity); a [BLOCK_B, BLOCK_N] one was loaded once per batch row.
    rows_b = offs_b[:, None]  # [BLOCK_B, 1]: small, so Triton loads x per row in acc's layout
    cols = offs_n[None, :]  # [1, BLOCK_N]
    # Pipelined (LOOP_STAGES), the next steps' list entries and weight rows are copied to shared
    # memory while this step adds: the same products in the same order, so the same bits.
    for j in tl.range(0, count, UNROLL, num_stages=LOOP_STAGES):
        for u in tl.static_range(UNROLL):
            # Past the end of the list, x is 0 and the weight row is channel 0's (a finite row
            # times 0: an exact 0 added), so the weight load needs no mask beyond the columns:
            # with EVEN_N none, and it is read 16 bytes at a time. (The x mask compares whole
            # tensors: Triton's interpreter turns a tensor mask & a scalar one into integers.)
            channel = tl.load(index_ptr + base + j + u, mask=j + u < count, other=0)
            xv = tl.load(xm_ptr + (base + j + u) * BLOCK_B + rows_b, mask=(rows_b < B) & (rows_b * 0 + j + u < count),
                         other=0.0)  # [BLOCK_B, 1]
            if EVEN_N:
                w = tl.load(w_ptr + channel * stride_wk + cols)
            else:
                w = tl.load(w_ptr + channel * stride_wk + cols, mask=n_ok[None, :], other=0.0)
            acc += xv * w.to(tl.float32)
    N = N0 + N1 + N2
    tl.store(p_ptr + (c * B + offs_b[:, None]) * N + offs_n[None, :], acc, mask=b_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Decided when the kernels were decorated, i.e. by TRITON_INTERPRET at import time.
INTERPRETED = not isinstance(_wina_linear_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True)
class WinaKernelConfig:
    """Launch parameters of the sparse kernels (powers of two except split_k and num_warps)."""

    block_k: int  # input channels per loop step
    block_n: int  # output columns per program
    split_k: int = 1  # programs along K; > 1 writes fp32 partials that a second launch sums
    num_warps: int = 4
    use_dot: bool | None = None  # tl.dot on a batch tile padded to >= 16; None: batch >= DOT_MIN_BATCH
    num_stages: int | None = None  # software-pipelining depth of the K loop; None: Triton's default


def tuning_key(gate_up: bool, block_b: int, k: int, widths: Sequence[int], weight_bytes: int) -> str:
    """The key of one tuned configuration: kernel, batch tile (every batch that pads to the same
    BLOCK_B runs the same compiled kernel), input channels, segment widths and bytes per weight
    (float16 and bfloat16 share entries; float32 tiles need twice the shared memory)."""
    return (f"{'gate_up' if gate_up else 'linear'} B{block_b} K{k} N{'+'.join(str(w) for w in widths)} "
            f"W{weight_bytes}")


def tuned_configs_path(device_name: str) -> Path:
    """kernels/configs/<GPU name>.json (what benchmarks/wina_tune_gpu.py writes), or the file that
    $NEURONSERVE_WINA_CONFIGS names (read once per process)."""
    override = os.environ.get(TUNED_CONFIGS_ENV)
    if override:
        return Path(override)
    return TUNED_CONFIGS_DIR / (re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json")


@functools.lru_cache(maxsize=8)
def load_tuned_configs(path: Path) -> dict[str, WinaKernelConfig]:
    """{tuning_key: config} from a tuning file; {} when there is none (the heuristic then decides)."""
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {key: WinaKernelConfig(**entry) for key, entry in entries.items()}


def _tile(batch: int, use_dot: bool | None = None) -> tuple[int, bool]:
    """-> (BLOCK_B: the next power of two >= batch, at least 16 for tl.dot; USE_DOT)."""
    use_dot = batch >= DOT_MIN_BATCH if use_dot is None else use_dot
    block = triton.next_power_of_2(batch)
    return (max(block, 16), True) if use_dot else (block, False)


@functools.lru_cache(maxsize=512)
def pick_config(batch: int, k: int, widths: tuple[int, ...], gate_up: bool,
                device: torch.device, use_dot: bool | None = None, *, weight_bytes: int) -> WinaKernelConfig:
    """Launch parameters for a batch and shapes (cached: decode calls it every step): on CUDA, the
    measured best for this GPU and shape where benchmarks/wina_tune_gpu.py tuned it
    (`tuned_configs_path`), else a heuristic. They only change speed, never results beyond fp32
    summation order. Triton compiles once per distinct (BLOCK_B, BLOCK_K, BLOCK_N, warps, stages,
    flags), and BLOCK_B is bucketed to powers of two. `use_dot` forces the tl.dot path on or off
    (None: from DOT_MIN_BATCH; a forced path never takes a tuned config)."""
    if device.type == "cuda" and use_dot is None:
        tuned = load_tuned_configs(tuned_configs_path(torch.cuda.get_device_name(device)))
        config = tuned.get(tuning_key(gate_up, _tile(batch)[0], k, widths, weight_bytes))
        if config is not None:
            return config
    return heuristic_config(batch, k, widths, gate_up, device, use_dot)


def heuristic_config(batch: int, k: int, widths: tuple[int, ...], gate_up: bool,
                     device: torch.device, use_dot: bool | None = None) -> WinaKernelConfig:
    """`pick_config` where no tuned configuration exists: first guesses from the shapes."""
    block_b, use_dot = _tile(batch, use_dot)
    widest = triton.next_power_of_2(max(widths))
    tiles = 2 if gate_up else 1  # gate_up holds two weight tiles and two accumulators
    if device.type != "cuda":
        # The interpreter runs each op once per program with numpy: fewer, larger programs win.
        return WinaKernelConfig(block_k=min(128, max(16, triton.next_power_of_2(k))),
                                block_n=min(128, max(16, widest)))
    # 64 fp16 columns = one 128-byte line per kept weight row.
    block_n = min(64, max(16, widest))
    num_warps = 4
    if use_dot:
        block_k = 64 // tiles
    else:  # broadcast product tile of BLOCK_B * BLOCK_K * BLOCK_N fp32 values per weight tile
        block_k = max(16, min(128, 8192 // (block_b * block_n * tiles)))
        if block_b * block_k * block_n * tiles > 8192:
            num_warps = 8  # spread the larger product tiles over more registers
    n_programs = sum(triton.cdiv(w, block_n) for w in widths)
    k_chunks = triton.cdiv(k, block_k)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split_k = 1
    # Split K until there are two waves of programs, keeping at least 4 chunks per split.
    while n_programs * split_k < 2 * sms and k_chunks // (split_k * 2) >= 4:
        split_k *= 2
    return WinaKernelConfig(block_k=block_k, block_n=block_n, split_k=split_k, num_warps=num_warps,
                            use_dot=use_dot)


def _check_inputs(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor,
                  segments: Sequence[int], bias: torch.Tensor | None) -> tuple[int, int, list[int]]:
    """Shape, dtype and device checks shared by the sparse and dense paths -> (B, K, widths)."""
    widths = [int(w) for w in segments]
    if x.dim() != 2 or weight_t.dim() != 2:
        raise ValueError(f"x must be [B, K] and weight_t [K, N]; got {tuple(x.shape)} and {tuple(weight_t.shape)}")
    batch, k = x.shape
    if k < 1:
        raise ValueError(f"x must have at least one input channel; got {tuple(x.shape)}")
    if not 1 <= len(widths) <= MAX_SEGMENTS or min(widths) < 1:
        raise ValueError(f"segments must be 1..{MAX_SEGMENTS} positive widths; got {widths}")
    if weight_t.shape != (k, sum(widths)):
        raise ValueError(f"weight_t must be [K={k}, N={sum(widths)}]; got {tuple(weight_t.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES or weight_t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x and weight_t must be float32/bfloat16/float16; got {x.dtype}, {weight_t.dtype}")
    if col_norms.shape != (len(widths), k) or col_norms.dtype != torch.float32:
        raise ValueError(f"col_norms must be float32 [G={len(widths)}, K={k}]; "
                         f"got {col_norms.dtype} {tuple(col_norms.shape)}")
    if thresholds.shape != (batch, len(widths)) or thresholds.dtype != torch.float32:
        raise ValueError(f"thresholds must be float32 [B={batch}, G={len(widths)}]; "
                         f"got {thresholds.dtype} {tuple(thresholds.shape)}")
    if bias is not None and bias.shape != (sum(widths),):
        raise ValueError(f"bias must be [N={sum(widths)}]; got {tuple(bias.shape)}")
    tensors = [x, weight_t, col_norms, thresholds] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    return batch, k, widths


def _gate_up_half(weight_t: torch.Tensor) -> int:
    """I of a fused [K, 2I] gate|up weight (checked)."""
    half = weight_t.shape[-1] // 2
    if weight_t.dim() != 2 or 2 * half != weight_t.shape[1]:
        raise ValueError(f"weight_t must be [K, 2I] (gate then up); got {tuple(weight_t.shape)}")
    return half


def _check_sparse_launch(x: torch.Tensor, weight_t: torch.Tensor, batch: int) -> None:
    """What every sparse launch (tile kernels and gather path) needs of its tensors."""
    if batch > MAX_SPARSE_BATCH:
        raise ValueError(f"the sparse kernel handles at most {MAX_SPARSE_BATCH} rows; got {batch} "
                         "(use wina_linear_triton, which takes the dense path above the crossover)")
    if not INTERPRETED and x.device.type != "cuda":
        raise ValueError("the compiled Triton kernel needs CUDA tensors; set TRITON_INTERPRET=1 before "
                         "importing kernels.wina_triton to run it on CPU in Triton's interpreter")
    if not weight_t.is_contiguous():
        raise ValueError("weight_t must be contiguous (row k = input channel k)")
    if x.numel() >= _MAX_ELEMENTS or weight_t.numel() >= _MAX_ELEMENTS:
        raise ValueError("tensors of 2**31 or more elements are not supported (int32 offsets)")


def _check_powers_of_two(config, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two; got {value}")


def _check_tile_config(config: WinaKernelConfig, use_dot: bool) -> None:
    _check_powers_of_two(config, ("block_k", "block_n"))
    if use_dot and min(config.block_k, config.block_n) < 16:
        raise ValueError(f"tl.dot needs block_k and block_n >= 16; got {config}")
    if config.split_k < 1:
        raise ValueError(f"split_k must be >= 1; got {config.split_k}")
    if config.num_stages is not None and config.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1; got {config.num_stages}")


def _launch(kernel, x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor,
            thresholds: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, kept: torch.Tensor,
            grid_n: int, k: int, shape_args: tuple[int, ...], config: WinaKernelConfig,
            tile: tuple[int, bool], k_per_split: int, split_k: int) -> None:
    """The launch both kernels share: same argument order after their shape arguments."""
    partials = split_k > 1
    block_b, use_dot = tile
    pipelining = {} if config.num_stages is None else {"num_stages": config.num_stages}
    kernel[(grid_n, split_k)](
        x, weight_t, col_norms, thresholds, bias if bias is not None else x, y, kept,
        x.shape[0], k, *shape_args,
        x.stride(0), x.stride(1),
        weight_t.stride(0),
        col_norms.stride(0), col_norms.stride(1),
        thresholds.stride(0), thresholds.stride(1),
        y.stride(0) if partials else 0, y.stride(1) if partials else y.stride(0),
        kept.stride(0), kept.stride(1),
        k_per_split,
        HAS_BIAS=bias is not None,
        PARTIALS=partials,
        BLOCK_B=block_b,
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        USE_DOT=use_dot,
        # Triton 3.9's interpreter miscomputes bf16 tl.dot; there the fp32 dot of the same values
        # (16-bit products are exact in fp32) gives the same result.
        DOT_NATIVE=x.dtype == weight_t.dtype and x.dtype != torch.float32 and not INTERPRETED,
        num_warps=config.num_warps,
        **pipelining,
    )


def _sum_partials(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, swiglu: bool,
                  kept_parts: torch.Tensor | None = None, block_n: int = 1024,
                  unroll: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[splits, B, W] fp32 partials -> ([B, N] in `dtype` (N = W, or W / 2 with swiglu), and with
    kept_parts [splits, B, G] int32 their sums [B, G], else None), one launch. `block_n` and
    `unroll` change the speed only (the partials are added in split order whatever they are)."""
    splits, batch, width = partials.shape
    n = width // 2 if swiglu else width
    y = torch.empty(batch, n, dtype=dtype, device=partials.device)
    kept = None
    groups = 1
    if kept_parts is not None:
        groups = kept_parts.shape[2]
        kept = torch.empty(batch, groups, dtype=torch.int32, device=partials.device)
    block_n = min(block_n, triton.next_power_of_2(n))
    _sum_partials_kernel[(batch, triton.cdiv(n, block_n))](
        partials, bias if bias is not None else partials, y,
        kept_parts if kept_parts is not None else partials, kept if kept is not None else y, splits, n, groups,
        partials.stride(0), partials.stride(1), y.stride(0), 0 if kept_parts is None else kept_parts.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=swiglu, COUNT_KEPT=kept_parts is not None, BLOCK_N=block_n,
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_S=min(128, triton.next_power_of_2(splits)), UNROLL=unroll,
        num_warps=max(1, min(4, block_n // 64)))
    return y, kept


def _split(k: int, config: WinaKernelConfig) -> tuple[int, int]:
    """-> (channels per split, a multiple of block_k; number of splits, none of them empty)."""
    chunks = triton.cdiv(k, config.block_k)
    k_per_split = triton.cdiv(chunks, min(config.split_k, chunks)) * config.block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def wina_linear_sparse(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    bias: torch.Tensor | None = None,
    *,
    config: WinaKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse kernel at any batch size up to MAX_SPARSE_BATCH (`wina_linear_triton` semantics).
    `config` overrides the block-size heuristic (tests and tuning)."""
    batch, k, widths = _check_inputs(x, weight_t, col_norms, thresholds, segments, bias)
    if batch == 0:  # nothing to launch
        return wina_linear_dense(x, weight_t, col_norms, thresholds, segments, bias)
    config = config or pick_config(batch, k, tuple(widths), False, x.device, weight_bytes=weight_t.element_size())
    tile = _tile(batch, config.use_dot)
    _check_tile_config(config, tile[1])
    _check_sparse_launch(x, weight_t, batch)
    n = sum(widths)
    k_per_split, split_k = _split(k, config)
    grid_n = sum(triton.cdiv(w, config.block_n) for w in widths)
    if split_k == 1:
        y = torch.empty(batch, n, dtype=weight_t.dtype, device=x.device)
        kept = torch.empty(batch, len(widths), dtype=torch.int32, device=x.device)
    else:
        y = torch.empty(split_k, batch, n, dtype=torch.float32, device=x.device)
        kept = torch.zeros(batch, len(widths), dtype=torch.int32, device=x.device)
    padded = widths + [0] * (MAX_SEGMENTS - len(widths))
    _launch(_wina_linear_kernel, x, weight_t, col_norms, thresholds, bias, y, kept, grid_n, k,
            tuple(padded), config, tile, k_per_split, split_k)
    if split_k > 1:
        y, _ = _sum_partials(y, bias, weight_t.dtype, swiglu=False)
    return y, kept


def wina_gate_up_sparse(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: WinaKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused SwiGLU sparse kernel at any batch size up to MAX_SPARSE_BATCH
    (`wina_gate_up_triton` semantics). `config` overrides the block-size heuristic."""
    half = _gate_up_half(weight_t)
    batch, k, widths = _check_inputs(x, weight_t, col_norms, thresholds, (half, half), bias)
    if batch == 0:  # nothing to launch
        return wina_gate_up_dense(x, weight_t, col_norms, thresholds, bias)
    config = config or pick_config(batch, k, tuple(widths), True, x.device, weight_bytes=weight_t.element_size())
    tile = _tile(batch, config.use_dot)
    _check_tile_config(config, tile[1])
    _check_sparse_launch(x, weight_t, batch)
    k_per_split, split_k = _split(k, config)
    if split_k == 1:
        y = torch.empty(batch, half, dtype=weight_t.dtype, device=x.device)
        kept = torch.empty(batch, 2, dtype=torch.int32, device=x.device)
    else:
        y = torch.empty(split_k, batch, 2 * half, dtype=torch.float32, device=x.device)
        kept = torch.zeros(batch, 2, dtype=torch.int32, device=x.device)
    _launch(_wina_gate_up_kernel, x, weight_t, col_norms, thresholds, bias, y, kept,
            triton.cdiv(half, config.block_n), k, (half,), config, tile, k_per_split, split_k)
    if split_k > 1:
        y, _ = _sum_partials(y, bias, weight_t.dtype, swiglu=True)
    return y, kept


@dataclass(frozen=True)
class GatherConfig:
    """Launch parameters of the gather path. `chunk` fixes the summation order (see the kernels'
    section), so it must come from the shape alone, never from the batch; the others only change
    speed."""

    chunk: int  # input channels per compaction chunk, i.e. per partial sum (a power of two)
    block_n: int  # output columns per GEMV program (a power of two)
    unroll: int = 8  # kept rows loaded per GEMV loop step
    num_warps: int = 4
    reduce_block_n: int = 256  # output columns per program of the final sum
    reduce_unroll: int = 16  # partials loaded per step of the final sum
    fused: bool = False  # each GEMV program compacts its own chunk (two launches instead of three)
    loop_stages: int | None = None  # software pipelining of the GEMV's kept-row loop (None: none)


def gather_config(batch: int, k: int, widths: Sequence[int], device: torch.device) -> GatherConfig:
    """A first guess from the shapes: chunks of 128 channels on large layers and 64 on small ones
    (short lists per program, few partials to add); 16-byte weight loads (8 columns per thread, fewer
    from batch 16 to keep <= 64 accumulators per thread); as many warps per program as leave two
    waves of programs; final-sum blocks small enough for two waves too; the compaction fused into
    the GEMV at batch 1 and 2, where that measured faster on an H100 (Llama-3-8B's MLP, 50%: 3-9%;
    at batch 4 and 8 3-24% slower: each column block compacts its chunk again, for every row). The
    kept-row loop is not pipelined: 3 stages measured 5-9% slower at batch 1 and 2 on an H100 and
    ~14% faster at batch 8, but the compiled batch-invariance test has not yet passed with them (its
    one run had a laned final sum too, which broke it; RESULTS.md)."""
    widest = triton.next_power_of_2(max(widths))
    if device.type != "cuda":  # the interpreter runs each op once per program: few, large programs
        return GatherConfig(chunk=256, block_n=widest)
    block_b = _gather_block_b(batch)
    chunk = 128 if k >= 4096 else 64
    columns_per_thread = max(2, min(8, 64 // block_b))
    num_warps = 4
    while num_warps > 1 and 32 * columns_per_thread * num_warps > widest:
        num_warps //= 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    chunks = triton.cdiv(k, chunk)

    def programs(block_n: int) -> int:
        return chunks * sum(triton.cdiv(w, block_n) for w in widths)

    while num_warps > 1 and programs(32 * columns_per_thread * num_warps) < 2 * sms:
        num_warps //= 2
    reduce_block_n = 256
    while reduce_block_n > 64 and batch * triton.cdiv(sum(widths), reduce_block_n) < 2 * sms:
        reduce_block_n //= 2
    return GatherConfig(chunk=chunk, block_n=min(widest, 32 * columns_per_thread * num_warps), num_warps=num_warps,
                        reduce_block_n=reduce_block_n, fused=batch <= 2)


def _gather_block_b(batch: int) -> int:
    return triton.next_power_of_2(batch)


def gather_launches(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor,
                     widths: list[int], bias: torch.Tensor | None, config: GatherConfig | None,
                     swiglu: bool) -> list[Callable[[], tuple[torch.Tensor, torch.Tensor] | None]]:
    """The gather path's launches in order (compaction unless fused, GEMV over the kept rows, chunk
    sum), each a callable over buffers allocated here once, so that a benchmark can time each alone
    (benchmarks/wina_kernel_gpu.py); no input checks beyond the launch's. The last one returns
    (y [B, N], kept [B, G])."""
    batch, k = x.shape
    config = config or gather_config(batch, k, widths, x.device)
    _check_powers_of_two(config, ("chunk", "block_n", "unroll", "reduce_block_n", "reduce_unroll"))
    _check_sparse_launch(x, weight_t, batch)
    block_b = _gather_block_b(batch)
    groups, n = len(widths), sum(widths)
    chunks = triton.cdiv(k, config.chunk)
    grid_n = sum(triton.cdiv(w, config.block_n) for w in widths)
    device = x.device
    lists = grid_n if config.fused else groups  # fused: one private list per program
    index = torch.empty(lists, chunks, config.chunk, dtype=torch.int32, device=device)
    xm = torch.empty(lists, chunks, config.chunk, block_b, dtype=torch.float32, device=device)
    count = torch.empty(groups, chunks, dtype=torch.int32, device=device)
    kept_part = torch.empty(chunks, batch, groups, dtype=torch.int32, device=device)
    partials = torch.empty(chunks, batch, n, dtype=torch.float32, device=device)
    strides = (x.stride(0), x.stride(1), col_norms.stride(0), col_norms.stride(1),
               thresholds.stride(0), thresholds.stride(1))

    def compact() -> None:
        _wina_compact_kernel[(chunks, groups)](
            x, col_norms, thresholds, index, xm, count, kept_part, batch, k, chunks, groups, *strides,
            BLOCK_B=block_b, CHUNK=config.chunk)

    def gemv() -> None:
        _wina_gather_kernel[(grid_n, chunks)](
            weight_t, x, col_norms, thresholds, index, xm, count, kept_part, partials, batch, k, chunks, groups,
            *widths, *[0] * (MAX_SEGMENTS - groups), weight_t.stride(0), *strides,
            BLOCK_B=block_b, CHUNK=config.chunk, BLOCK_N=config.block_n, UNROLL=config.unroll,
            EVEN_N=all(w % config.block_n == 0 for w in widths), FUSED=config.fused, LOOP_STAGES=config.loop_stages,
            num_warps=config.num_warps)

    def chunk_sum() -> tuple[torch.Tensor, torch.Tensor]:
        return _sum_partials(partials, bias, weight_t.dtype, swiglu, kept_parts=kept_part,
                             block_n=config.reduce_block_n, unroll=config.reduce_unroll)

    return [gemv, chunk_sum] if config.fused else [compact, gemv, chunk_sum]


def _gather(x: torch.Tensor, weight_t: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor,
            widths: list[int], bias: torch.Tensor | None, config: GatherConfig | None,
            swiglu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather path, its launches one after the other -> (y [B, N], kept [B, G])."""
    *steps, chunk_sum = gather_launches(x, weight_t, col_norms, thresholds, widths, bias, config, swiglu)
    for step in steps:
        step()
    return chunk_sum()


def wina_linear_gather(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    bias: torch.Tensor | None = None,
    *,
    config: GatherConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`wina_linear_sparse` through the gather path (same semantics, up to MAX_SPARSE_BATCH rows)."""
    batch, _, widths = _check_inputs(x, weight_t, col_norms, thresholds, segments, bias)
    if batch == 0:
        return wina_linear_dense(x, weight_t, col_norms, thresholds, segments, bias)
    return _gather(x, weight_t, col_norms, thresholds, widths, bias, config, swiglu=False)


def wina_gate_up_gather(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GatherConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`wina_gate_up_sparse` through the gather path (same semantics, up to MAX_SPARSE_BATCH rows)."""
    half = _gate_up_half(weight_t)
    batch, _, widths = _check_inputs(x, weight_t, col_norms, thresholds, (half, half), bias)
    if batch == 0:
        return wina_gate_up_dense(x, weight_t, col_norms, thresholds, bias)
    return _gather(x, weight_t, col_norms, thresholds, widths, bias, config, swiglu=True)


# ----------------------------------------------------------------------------------------------
# Dense path and wrappers
# ----------------------------------------------------------------------------------------------


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[B, 2I] gate|up in the weight dtype -> silu(gate) * up [B, I], computed in fp32."""
    gate, up = gate_up.float().chunk(2, dim=1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def wina_linear_dense(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The large-batch path: mask x per row and segment in torch, then one dense matmul per segment
    (cuBLAS on CUDA, accumulating in fp32). Same semantics as the sparse kernel, any batch size."""
    _check_inputs(x, weight_t, col_norms, thresholds, segments, bias)
    mask = wina_mask(x, col_norms, thresholds)  # [B, G, K]
    native = x.dtype == weight_t.dtype
    compute_dtype = weight_t.dtype if native else torch.float32
    outputs = []
    start = 0
    for g, width in enumerate(segments):
        w_g = weight_t[:, start:start + width]  # [K, N_g]
        w_g = w_g if native else w_g.float()
        x_g = (x * mask[:, g]).to(compute_dtype)  # [B, K]
        if bias is None:
            outputs.append(x_g @ w_g)
        else:
            outputs.append(torch.addmm(bias[start:start + width].to(compute_dtype), x_g, w_g))
        start += width
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return y.to(weight_t.dtype), mask.sum(dim=-1, dtype=torch.int32)


def wina_gate_up_dense(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The large-batch path of the fused SwiGLU: `wina_linear_dense` on (I, I), then silu(gate) * up."""
    half = _gate_up_half(weight_t)
    gate_up, kept = wina_linear_dense(x, weight_t, col_norms, thresholds, (half, half), bias)
    return _swiglu(gate_up), kept


def wina_linear_triton(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    bias: torch.Tensor | None = None,
    *,
    crossover_batch: int = DENSE_CROSSOVER_BATCH,
    path: SparsePath = "tile",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WINA sparse linear (semantics of `wina_linear_reference`).

    x [B, K] fp32/bf16/fp16; weight_t [K, N] contiguous; col_norms [G, K] float32; thresholds
    [B, G] float32; segments: G (1..3) output widths summing to N; bias [N] or None
    -> (y [B, N] in weight_t's dtype, fp32 accumulation; kept [B, G] int32).
    Batches up to `crossover_batch` (<= MAX_SPARSE_BATCH) run `path` (the tile kernel or the
    gather path), larger ones the dense path."""
    _check_wrapper_args(crossover_batch, path)
    if x.dim() == 2 and x.shape[0] > crossover_batch:
        return wina_linear_dense(x, weight_t, col_norms, thresholds, segments, bias)
    sparse = wina_linear_gather if path == "gather" else wina_linear_sparse
    return sparse(x, weight_t, col_norms, thresholds, segments, bias)


def wina_gate_up_triton(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    crossover_batch: int = DENSE_CROSSOVER_BATCH,
    path: SparsePath = "tile",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SwiGLU input half (semantics of `wina_gate_up_reference`): weight_t [K, 2I] holds gate
    then up columns, col_norms [2, K], thresholds [B, 2] -> (silu(gate) * up [B, I] in weight_t's
    dtype, kept [B, 2] int32). x is read once; gate and up keep their own masks."""
    _check_wrapper_args(crossover_batch, path)
    if x.dim() == 2 and x.shape[0] > crossover_batch:
        return wina_gate_up_dense(x, weight_t, col_norms, thresholds, bias)
    sparse = wina_gate_up_gather if path == "gather" else wina_gate_up_sparse
    return sparse(x, weight_t, col_norms, thresholds, bias)


def _check_wrapper_args(crossover_batch: int, path: str) -> None:
    if not 0 <= crossover_batch <= MAX_SPARSE_BATCH:
        raise ValueError(f"crossover_batch must be in 0..{MAX_SPARSE_BATCH}; got {crossover_batch}")
    if path not in SPARSE_PATHS:
        raise ValueError(f"unknown sparse path {path!r}; expected one of {SPARSE_PATHS}")
