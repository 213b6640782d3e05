"""Plain-torch reference for WINA sparse linear layers: the oracle every kernel is tested against.

A linear layer `y = x W^T` keeps input channel i of row b when its WINA score
`|x[b, i]| * ||W[:, i]||_2` is above the row's threshold; the other channels are skipped, so the
weight rows of `W^T` they would multiply need not be read. TEAL's criterion is the same with every
column norm set to 1.

Fused projections (q/k/v, gate/up) share one input but keep their own masks: the output columns
are split into `segments`, and segment g has its own column norms `col_norms[g]` (the norms of that
projection's weight) and its own per-row threshold `thresholds[:, g]`.

A threshold of 0 keeps every channel whose input is not exactly 0, which is the dense product:
skipping a zero input changes nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def column_norms(weight: torch.Tensor, segments: Sequence[int]) -> torch.Tensor:
    """weight: [N, K] (out, in), its rows split into `segments` -> float32 [G, K]: for segment g
    and input channel i, the L2 norm of that projection's column i."""
    return torch.stack([part.float().norm(dim=0) for part in weight.split(list(segments), dim=0)])


def wina_mask(x: torch.Tensor, col_norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """x: [B, K]; col_norms: [G, K] float32; thresholds: [B, G] float32 -> bool [B, G, K]."""
    scores = x.float().abs().unsqueeze(1) * col_norms.unsqueeze(0)  # [B, G, K]
    return scores > thresholds.unsqueeze(-1)


def wina_linear_reference(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    segments: Sequence[int],
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, K]; weight_t: [K, N] (the transposed weight, one row per input channel);
    col_norms: [G, K] float32; thresholds: [B, G] float32; segments: G output widths summing to N;
    bias: [N] or None.

    -> (y [B, N] in weight_t's dtype, accumulated in float32; kept [B, G] int32, the number of
    input channels each row kept for each segment).
    """
    B, K = x.shape
    assert weight_t.shape[0] == K and sum(segments) == weight_t.shape[1], "shape mismatch"
    assert col_norms.shape == (len(segments), K) and thresholds.shape == (B, len(segments))
    mask = wina_mask(x, col_norms, thresholds)  # [B, G, K]
    xf = x.float()
    outputs = []
    for g, w_g in enumerate(weight_t.split(list(segments), dim=1)):  # w_g: [K, N_g]
        outputs.append((xf * mask[:, g]) @ w_g.float())  # [B, N_g]
    y = torch.cat(outputs, dim=1)
    if bias is not None:
        y = y + bias.float()
    return y.to(weight_t.dtype), mask.sum(dim=-1, dtype=torch.int32)


def wina_gate_up_reference(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    col_norms: torch.Tensor,
    thresholds: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused SwiGLU input half: weight_t [K, 2I] holds gate then up columns (two segments of I).
    -> (silu(gate) * up [B, I] in weight_t's dtype, kept [B, 2] int32)."""
    half = weight_t.shape[1] // 2
    assert 2 * half == weight_t.shape[1], "gate and up must have the same width"
    gate_up, kept = wina_linear_reference(x, weight_t, col_norms, thresholds, (half, half), bias)
    gate, up = gate_up.float().split(half, dim=1)
    return (F.silu(gate) * up).to(weight_t.dtype), kept


def thresholds_for_topk(x: torch.Tensor, col_norms: torch.Tensor, keep: int) -> torch.Tensor:
    """The per-row thresholds [B, G] that keep exactly `keep` channels per segment when scores are
    distinct: the (keep+1)-th largest score, or -1 (keep all, zeros included) when keep == K.
    Tests use it where they need an exact count; serving uses calibrated thresholds instead."""
    B, K = x.shape
    assert 0 <= keep <= K
    scores = x.float().abs().unsqueeze(1) * col_norms.unsqueeze(0)  # [B, G, K]
    if keep == K:
        return torch.full(scores.shape[:2], -1.0, device=x.device)
    return scores.sort(dim=-1, descending=True).values[..., keep].contiguous()
