"""What the forward pass asks of an intervention plan (DESIGN.md, "Per-request control").

The model only knows these three places; `server/interventions/plan.py` implements them for the
rows of an engine step, and calibration code implements them to record activations. Each method
leaves the rows that ask for nothing untouched (same tensor values, no arithmetic on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.dense_cpu import DecodeSubspace


@dataclass(frozen=True, eq=False)
class KernelNeuronEdit:
    """A neuron edit in the form the CPU decode kernel applies inside its one call per layer:
    `act * keep`, then one subspace removed from the rows that ask (kernels/dense_cpu.py)."""
    keep: torch.Tensor | None  # [B, intermediate] float32 0/1 contiguous, or None: all ones
    subspace: DecodeSubspace | None = None


class NeuronEdit(Protocol):
    def hidden(self, act: torch.Tensor) -> torch.Tensor:
        """act: [B, T, intermediate] SwiGLU activations, before down_proj -> the same shape."""

    def output(self, act: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out: [B, T, hidden] down_proj output of `act` -> the same shape."""

    def for_kernel(self) -> KernelNeuronEdit | None:
        """Where the edit is only `act * keep` and at most one subspace removal: that, for the CPU
        decode kernel to apply itself (it gives the numbers `hidden` and `output` give, up to
        float32 summation order); else None."""


class ForwardEdits(Protocol):
    def neurons(self, layer: int) -> NeuronEdit | None:
        """The MLP edit of decoder layer `layer`, or None."""

    def residual(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """h: [B, T, hidden] float32 residual stream after decoder layer `layer`; positions: [B, T]."""

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """hidden: [B, (T,) hidden] final normed hidden state (the head's input); logits: float32
        [B, (T,) vocab] -> the same shape."""


class ResidualRecorder:
    """ForwardEdits that changes nothing and keeps the residual stream after one layer (for
    calibration and evaluation code that needs that layer's activations from a full forward)."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.recorded: torch.Tensor | None = None  # [B, T, hidden] of the last forward

    def neurons(self, layer: int) -> None:
        return None

    def residual(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if layer == self.layer:
            self.recorded = h.detach().clone()
        return h

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits
