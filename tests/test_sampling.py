"""server.engine.sampling.greedy: numpy's argmax on the CPU must pick what torch.argmax picks."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling import greedy


@pytest.mark.parametrize("rows", [1, 8])
def test_greedy_is_torch_argmax(rows):
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 49152, generator=g)
    logits[0, 7] = logits[0, 9000] = logits[0].max() + 1  # a tie: the first index wins
    if rows > 1:
        logits[1, 123] = float("nan")  # NaN counts as the largest value
        logits[2] = float("-inf")
        logits[2, 40000] = 0.0
    want = logits.argmax(dim=-1)
    got = greedy(logits)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert got[0] == 7
    strided = torch.randn(49152, rows, generator=g).t()  # not contiguous
    assert torch.equal(greedy(strided), strided.argmax(dim=-1))
    half = logits.half()  # not the numpy path
    assert torch.equal(greedy(half), half.argmax(dim=-1))
