"""The figures benchmarks/eigenshift_eval.py reports: per-prompt flag counts and the paired
bootstrap interval of a toxicity reduction."""

from __future__ import annotations

import sys
from pathlib import Path

from server.calibration.eigenshift import Generation, toxicity_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from eigenshift_eval import paired_reduction_interval


class _WordScorer:
    name, threshold = "flags 'bad'", 0.5

    def score(self, texts: list[str]) -> list[float]:
        return [0.9 if "bad" in t else 0.1 for t in texts]


def _generations(texts: list[str]) -> list[Generation]:
    return [Generation(prompt=i // 3, token_ids=[1], text=t, raw_logprobs=[-1.0]) for i, t in enumerate(texts)]


def test_toxicity_counts_flags_per_prompt_in_order():
    texts = ["bad", "ok", "bad", "ok", "ok", "ok", "bad", "bad", "bad"]  # 3 prompts x 3 samples
    result = toxicity_of(_generations(texts), _WordScorer(), samples=3)
    assert result.flagged_per_prompt == [2, 0, 3]
    assert result.rate == 5 / 9
    assert result.prompts == 3 and result.continuations == 9


def test_reduction_interval_is_exact_when_every_prompt_halves():
    assert paired_reduction_interval([2] * 40, [1] * 40) == [50.0, 50.0]
    assert paired_reduction_interval([3, 1, 2] * 10, [0] * 30) == [100.0, 100.0]


def test_reduction_interval_covers_zero_for_a_shuffled_copy():
    base = [0, 1, 0, 2, 0, 0, 1, 3, 0, 1] * 6
    row = base[1:] + base[:1]  # same total, paired with other prompts
    low, high = paired_reduction_interval(base, row)
    assert low < 0 < high
    assert high - low > 20  # 60 prompts with ~8 flags per 10: the interval is wide, not a point


def test_reduction_interval_needs_paired_lists():
    assert paired_reduction_interval([], []) is None
    assert paired_reduction_interval([1, 2], [1]) is None
