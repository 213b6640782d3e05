"""The per-row controls of one engine step (DESIGN.md): one object describing every row of the
batch, built once per step and read by the forward pass and the sampler.

For now it carries sampling parameters and logit biases; sparsity and interventions join it as
their issues land. Every field is None when no row of the batch uses it, so a batch that asks for
nothing does no extra work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from server.engine.request import SamplingParams


@dataclass
class BatchControls:
    batch_size: int
    all_greedy: bool
    temperature: torch.Tensor | None  # [B] float32; 0 marks a greedy row
    top_k: torch.Tensor | None  # [B] long, 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float32; None when no row uses it
    min_p: torch.Tensor | None  # [B] float32; None when no row uses it
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    presence: torch.Tensor | None  # [B] float32, with frequency and repetition: None if unused
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids masked to -inf (min_tokens)
    generators: list[torch.Generator | None]
    max_logprobs: int | None  # the most top-N any row asks for; None when no row wants logprobs

    @classmethod
    def build(cls, params: Seq[SamplingParams], generators: list[torch.Generator | None],
              banned_per_row: Seq[Seq[int]], device: torch.device) -> "BatchControls":
        B = len(params)

        def column(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        all_greedy = all(p.greedy for p in params)
        sampling = [p for p in params if not p.greedy]
        bias_rows, bias_ids, bias_vals = [], [], []
        for row, p in enumerate(params):
            for token_id, value in p.logit_bias:
                bias_rows.append(row)
                bias_ids.append(token_id)
                bias_vals.append(value)
        ban_rows = [row for row, ids in enumerate(banned_per_row) for _ in ids]
        ban_ids = [t for ids in banned_per_row for t in ids]
        penalised = any(p.uses_penalties for p in params)
        wants_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            batch_size=B,
            all_greedy=all_greedy,
            temperature=None if all_greedy else column([p.temperature for p in params]),
            top_k=column([p.top_k for p in params], torch.long) if any(p.top_k > 0 for p in sampling) else None,
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in sampling) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in sampling) else None,
            logit_bias=(column(bias_rows, torch.long), column(bias_ids, torch.long), column(bias_vals))
            if bias_rows else None,
            presence=column([p.presence_penalty for p in params]) if penalised else None,
            frequency=column([p.frequency_penalty for p in params]) if penalised else None,
            repetition=column([p.repetition_penalty for p in params]) if penalised else None,
            banned=(column(ban_rows, torch.long), column(ban_ids, torch.long)) if ban_rows else None,
            generators=generators,
            max_logprobs=max(wants_logprobs) if wants_logprobs else None,
        )
