"""Memorization calibration (issue 6): the record generator, the scores on a planted case, the weight
masks' per-row selection, and one real calibration run on the default model."""

from __future__ import annotations

import argparse

import pytest
import torch

from server.calibration.memorization import (SetStats, add_arguments, choose_neurons, neuron_scores, run,
                                             spared_neurons, synthetic_records, weight_mask_indices, write_records)
from server.interventions.memorization import MemorizationProfile
from server.profiles import load_profile


def test_records_are_deterministic_and_distinct_across_seeds():
    a, b = synthetic_records(25, seed=3), synthetic_records(25, seed=3)
    assert a == b
    other = synthetic_records(25, seed=4)
    assert {r["suffix"] for r in a}.isdisjoint({r["suffix"] for r in other})
    assert len({r["prefix"] for r in a}) == 25  # each prefix names one record
    assert {r["kind"] for r in a} == {"address", "account", "apikey", "identity", "password"}


def _planted_stats(layers=2, intermediate=64, planted=(1, 17), digit_neuron=(1, 5), massive=(0, 9)):
    """Memorized suffixes light up `planted`; a digit-handling neuron fires on memorized AND unseen
    records of the same format; a massive neuron fires hugely on everything."""
    g = torch.Generator().manual_seed(0)

    def stats(tokens, boost):
        acts = torch.rand(tokens, layers, intermediate, generator=g, dtype=torch.float64) * 0.1
        for (l, j), value in boost.items():
            acts[:, l, j] += value
        s = SetStats.zeros(layers, intermediate)
        s.sum_abs += acts.abs().sum(0)
        s.sum_sq += (acts ** 2).sum(0)
        s.tokens = s.targets = tokens
        s.effect += acts.sum(0) * 0.01  # zeroing an active neuron raises the loss a little
        return s

    mem = stats(200, {planted: 1.0, digit_neuron: 1.0, massive: 50.0})
    unseen = stats(200, {digit_neuron: 1.0, massive: 50.0})
    ref = stats(400, {massive: 50.0})
    mem.effect[planted] += 5.0  # recall depends on it
    return {"memorized": mem, "unseen": unseen, "reference": ref}, planted, digit_neuron, massive


@pytest.mark.parametrize("score", ["contrast", "attribution"])
def test_contrast_scores_pick_the_planted_neuron(score):
    stats, planted, digit, massive = _planted_stats()
    norms = torch.ones(2, 64)
    scores = neuron_scores(stats, norms, score)
    spared, _ = spared_neurons(stats, norms, spare_fraction=0.0, massive_factor=20.0)
    assert spared[massive] and not spared[planted]
    chosen = choose_neurons(scores, spared, ratio=1 / 64, allocation="global", layer_cap=64.0)
    assert chosen.sum() == 2  # the budget: ratio x layers x neurons
    assert chosen[planted]
    assert not chosen[digit] and not chosen[massive]


def test_activation_baseline_also_picks_the_format_neuron():
    """Why the contrast with unseen records matters: against ordinary text, the digit neuron looks
    as memorized as the planted one."""
    stats, planted, digit, _ = _planted_stats()
    scores = neuron_scores(stats, torch.ones(2, 64), "activation")
    top = scores[1].topk(2).indices.tolist()
    assert set(top) == {planted[1], digit[1]}


def test_uniform_allocation_takes_ratio_per_layer_and_skips_spared():
    scores = torch.arange(2 * 100, dtype=torch.float64).reshape(2, 100)
    spared = torch.zeros(2, 100, dtype=torch.bool)
    spared[0, 99] = True
    chosen = choose_neurons(scores, spared, ratio=0.03, allocation="uniform")
    assert chosen.sum(1).tolist() == [3, 3]
    assert chosen[0, 96:99].all() and not chosen[0, 99]
    assert chosen[1, 97:].all()


def test_weight_masks_are_the_per_row_top_fraction():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(6, 50, generator=g) for _ in range(2)]
    norm_mem = torch.rand(2, 50, generator=g) + 0.5
    norm_ref = torch.zeros(2, 50)  # memorized always beats reference: the mask is exactly the top k
    layer, row, col = weight_mask_indices(weights, norm_mem, norm_ref, ratio=0.1)
    assert layer.numel() == 2 * 6 * 5
    for l in range(2):
        expected = (weights[l].abs() * norm_mem[l]).topk(5, dim=1).indices
        for r in range(6):
            got = col[(layer == l) & (row == r)].long()
            assert set(got.tolist()) == set(expected[r].tolist())
    # where the reference scores higher, the weight stays
    norm_ref = norm_mem.clone()
    norm_ref[0, :] = 10.0
    layer, _, _ = weight_mask_indices(weights, norm_mem, norm_ref, ratio=0.1)
    assert (layer == 0).sum() == 0 and (layer == 1).sum() == 0  # ties do not beat the reference
    # spared columns are never chosen
    spared = torch.zeros(2, 50, dtype=torch.bool)
    spared[:, :25] = True
    layer, row, col = weight_mask_indices(weights, norm_mem, torch.zeros(2, 50), ratio=0.1, spared=spared)
    assert (col >= 25).all()


def test_calibration_run_writes_a_loadable_profile(tmp_path):
    records = tmp_path / "leaked.jsonl"
    write_records(records, synthetic_records(4, seed=0))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--memorized", str(records), "--ratio", "0.01", "--granularity", "both",
                              "--reference-sequences", "2", "--batch-size", "4", "--out", str(tmp_path / "p")])
    assert run(args) == 0
    paths = sorted((tmp_path / "p").glob("memorization-*.safetensors"))
    assert [p.name for p in paths] == ["memorization-neuron-attribution-logodds-0.01.safetensors",
                                       "memorization-weight-0.01-spared.safetensors"]
    for path in paths:
        raw = load_profile(path)
        profile = MemorizationProfile.from_profile(raw)
        profile.check_model(30, 1536)
        assert raw.header["parameters"]["ratio"] == 0.01
        assert raw.header["data"]["memorized_records"] == 4
        quality = raw.header["quality"]
        assert {"calibration_records_before", "calibration_records_after"} <= set(quality)
        assert profile.pruned_count > 0
    neuron = MemorizationProfile.from_profile(load_profile(paths[0]))
    assert neuron.granularity == "neuron"
    # global allocation keeps the total budget: round(0.01 * 1536) per layer on average
    assert neuron.pruned_count == 15 * 30
