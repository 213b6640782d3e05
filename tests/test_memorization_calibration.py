"""Memorization calibration (issue 6): the record generator, the scores on a planted case, the retain
cost and the layer restriction, the weight masks' per-row selection, and real calibration runs on
the default model."""

from __future__ import annotations

import argparse

import pytest
import torch

from server.calibration.memorization import (
    MemorizationCalibrationConfig,
    SetStats,
    SubspaceMoments,
    _batch_records,
    ablation_costs,
    add_arguments,
    calibration_side_bar,
    calibration_side_pick,
    choose_neurons,
    choose_verified_neurons,
    collect_stats,
    format_layers,
    neuron_scores,
    parse_layers,
    reference_loss,
    retain_adjusted,
    retain_cost,
    run,
    spared_neurons,
    subspace_bases,
    synthetic_records,
    weight_mask_indices,
    write_records,
)
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


def _retain_case():
    """Layer 1: neuron 17 carries recall best but ordinary text uses it heavily (by every retain
    measure); neuron 30 carries recall a little less and ordinary text hardly uses it."""
    layers, intermediate = 2, 64
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(layers, intermediate, generator=g, dtype=torch.float64) * 0.1
    scores[1, 17], scores[1, 30] = 5.0, 4.0
    ref = SetStats.zeros(layers, intermediate)
    ref.tokens = ref.targets = 100
    base = torch.rand(layers, intermediate, generator=g, dtype=torch.float64) + 0.5
    ref.sum_abs += base * 100
    ref.effect += base  # small positive first-order effects everywhere
    ref.effect_sq += base ** 2 * 100
    ref.sum_abs[1, 17] *= 20
    ref.effect[1, 17] *= 20
    ref.effect_sq[1, 17] *= 400
    return scores, {"reference": ref}, torch.zeros(layers, intermediate, dtype=torch.bool)


@pytest.mark.parametrize("measure", ["effect", "taylor", "activation"])
@pytest.mark.parametrize("form", ["difference", "ratio"])
def test_retain_weight_trades_recall_against_ordinary_text(measure, form):
    scores, stats, spared = _retain_case()
    cost = retain_cost(stats, torch.ones(2, 64), measure)
    assert cost[1, 17] > 10 * cost[1, 30]
    # weight 0 is the score as it was: the same tensor, the same choice
    assert retain_adjusted(scores, cost, 0.0, form) is scores
    default = choose_neurons(retain_adjusted(scores, cost, 0.0, form), spared, 1 / 64, "global", 1.0)
    assert default.equal(choose_neurons(scores, spared, 1 / 64, "global", 1.0))
    assert default[1, 17] and not default[1, 30]
    chosen = choose_neurons(retain_adjusted(scores, cost, 1.0, form), spared, 1 / 64, "global", 1.0)
    assert chosen.sum() == default.sum() == 2  # same budget; one neuron per layer (layer cap 1 x ratio)
    assert chosen[1, 30] and not chosen[1, 17]


def test_retain_adjusted_rejects_what_it_does_not_know():
    scores, stats, _ = _retain_case()
    cost = retain_cost(stats, torch.ones(2, 64), "effect")
    with pytest.raises(ValueError):
        retain_adjusted(scores, cost, -1.0)
    with pytest.raises(ValueError):
        retain_adjusted(scores, cost, 1.0, "product")
    with pytest.raises(ValueError):
        retain_cost(stats, torch.ones(2, 64), "weight")


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_candidate_layers_restrict_the_choice(allocation):
    scores = torch.arange(3 * 100, dtype=torch.float64).reshape(3, 100).flip(0)  # layer 0 scores highest
    spared = torch.zeros(3, 100, dtype=torch.bool)
    everywhere = choose_neurons(scores, spared, 0.03, allocation, layer_cap=4.0)
    assert everywhere[0].sum() == 3
    chosen = choose_neurons(scores, spared, 0.03, allocation, layer_cap=4.0, candidate_layers=(1, 2))
    assert chosen[0].sum() == 0
    if allocation == "global":
        assert chosen.sum() == everywhere.sum() == 9  # the budget is ratio x all layers' neurons
    else:
        assert chosen.sum(1).tolist() == [0, 3, 3]
        assert chosen[1:].equal(everywhere[1:])
    assert choose_neurons(scores, spared, 0.03, allocation, 4.0, candidate_layers=None).equal(everywhere)


def test_global_budget_is_rounded_over_all_layers():
    """A ratio below one neuron per layer still means ratio x all neurons, not one per layer."""
    scores = torch.arange(30 * 100, dtype=torch.float64).reshape(30, 100)
    spared = torch.zeros(30, 100, dtype=torch.bool)
    assert choose_neurons(scores, spared, 0.002, "global", layer_cap=4.0).sum() == 6
    assert choose_neurons(scores, spared, 0.0115, "global", layer_cap=4.0).sum() == 34  # not 30 x 1
    assert choose_neurons(scores, spared, 0.002, "uniform").sum() == 30  # uniform: one per layer at least


def test_layer_specs():
    assert parse_layers("all") is None
    assert parse_layers("10-29", 30) == tuple(range(10, 30))
    assert parse_layers("0-2, 5,7-8") == (0, 1, 2, 5, 7, 8)
    assert format_layers(parse_layers("0-2,5,7-8")) == "0-2,5,7-8"
    assert format_layers(None) == "all"
    for bad in ("10-30", "5-3", "x", "-1"):
        with pytest.raises(ValueError):
            parse_layers(bad, 30)


def test_collected_effects_match_per_position_gradients():
    """effect and effect_sq against autograd on a mask of ones per position (a second route to
    the same numbers), on a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).float().eval()
    records = [([3, 4, 5], [6, 7, 8, 9]), ([10, 11], [12, 13, 14])]
    stats = collect_stats(model, {"memorized": records}, pad_id=0, batch_size=2, layers=2, intermediate=24,
                          record_objective="nll")["memorized"]
    ids, select, targets = _batch_records(records, 0)
    masks = [torch.ones(*ids.shape, 24, requires_grad=True) for _ in range(2)]
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: (a[0] * masks[i],))
               for i, layer in enumerate(model.model.layers)]
    try:
        logits = model(input_ids=ids).logits[select]
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    per_position = torch.stack([m.grad.flatten(0, 1) for m in masks]).double()  # [layers, B*T, intermediate]
    # float32 forward and backward: agreement to float32 rounding of sums of ~10 terms
    torch.testing.assert_close(stats.effect, -per_position.sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.effect_sq, per_position.pow(2).sum(1), rtol=1e-4, atol=1e-9)
    assert stats.effect_sq.sum() > 0
    # without per-position effects (every retain measure but taylor) the rest is the same, effect_sq 0
    lean = collect_stats(model, {"memorized": records}, pad_id=0, batch_size=2, layers=2, intermediate=24,
                         record_objective="nll", per_position_effects=False)["memorized"]
    torch.testing.assert_close(lean.effect, stats.effect, atol=0, rtol=0)
    torch.testing.assert_close(lean.sum_abs, stats.sum_abs, atol=0, rtol=0)
    assert lean.effect_sq.abs().sum() == 0


def test_verified_choice_replaces_the_neurons_that_cost_too_much():
    scores = torch.arange(2 * 50, dtype=torch.float64).reshape(2, 50).flip(1)  # neuron 0 of each layer best
    spared = torch.zeros(2, 50, dtype=torch.bool)
    costly = {(0, 0), (1, 0), (1, 2)}
    asked = []

    def cost_of(neurons):
        asked.append(list(neurons))
        return [0.5 if n in costly else 0.0 for n in neurons]

    config = MemorizationCalibrationConfig(allocation="uniform", verify_cost=0.1)
    measured: dict = {}
    chosen, spared_now = choose_verified_neurons(scores, spared, 0.06, config, cost_of, measured)
    assert chosen.sum(1).tolist() == [3, 3]  # the budget is kept
    assert not any(chosen[n] for n in costly)
    assert chosen[0, :4].tolist() == [False, True, True, True]
    assert chosen[1, :6].tolist() == [False, True, False, True, True, False]
    assert spared_now.sum() == 3 and not spared.any()  # the caller's mask is not changed
    # each neuron is measured once; a second choice reuses the measurements
    flat = [n for call in asked for n in call]
    assert len(flat) == len(set(flat))
    assert all([n for _, n in call] == sorted(n for _, n in call) for call in asked)  # best score first
    calls = len(asked)
    again, _ = choose_verified_neurons(scores, spared, 0.06, config, cost_of, measured)
    assert len(asked) == calls
    assert again.equal(chosen)  # the neurons refused before are refused again without a new measurement
    larger, _ = choose_verified_neurons(scores, spared, 0.1, config, cost_of, measured)  # a later, larger ratio
    assert larger.sum(1).tolist() == [5, 5] and not any(larger[n] for n in costly)


def test_a_refused_neuron_lets_only_the_next_in_line_in():
    """Global allocation on per-layer z-scores: refusing a layer's outlier must not re-standardise
    the layer and push the other chosen neurons out (the joint check has already zeroed them)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 40, generator=g, dtype=torch.float64)
    scores[0, 0] = 50.0  # an outlier whose removal would shift layer 0's mean and spread
    spared = torch.zeros(3, 40, dtype=torch.bool)
    config = MemorizationCalibrationConfig(allocation="global", verify_cost=0.1)
    plain = choose_neurons(scores, spared, 0.1, "global")
    chosen, _ = choose_verified_neurons(scores, spared, 0.1, config,
                                        lambda neurons: [0.5 if n == (0, 0) else 0.0 for n in neurons], {})
    assert plain[0, 0] and not chosen[0, 0]
    assert chosen.sum() == plain.sum()
    assert (chosen & plain).sum() == plain.sum() - 1  # everyone else stays; one newcomer


def _tiny_llama(seed: int):
    """-> (a random 3-layer Llama in float32, three 12-token pieces of its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float().eval(), [torch.randint(0, 40, (12,)).tolist() for _ in range(3)]


def _loss_without(model, pieces, removed) -> float:
    """Reference loss of an offline-pruned copy: the listed neurons' down_proj columns zeroed."""
    from transformers import LlamaForCausalLM

    pruned = LlamaForCausalLM(model.config).float().eval()
    pruned.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, neuron in removed:
            pruned.model.layers[layer].mlp.down_proj.weight[:, neuron] = 0.0
    return reference_loss(pruned, pieces, 2)


def test_ablation_costs_are_the_measured_loss_rise():
    """A neuron's cost equals the reference loss of a copy with its down_proj column zeroed, minus
    the plain loss; the weights are restored afterwards."""
    model, pieces = _tiny_llama(0)
    before = [p.detach().clone() for p in model.parameters()]
    neurons = [(0, 3), (1, 7), (2, 11)]  # a run resumed at each layer, the first one included
    costs = ablation_costs(model, pieces, 2, neurons)
    assert all(a.equal(b) for a, b in zip(before, model.parameters()))
    base = reference_loss(model, pieces, 2)
    for neuron, cost in zip(neurons, costs):
        assert cost == pytest.approx(_loss_without(model, pieces, [neuron]) - base, abs=1e-6)
        assert cost != 0.0


def test_joint_check_measures_each_neuron_on_top_of_the_accepted_ones():
    """--verify-mode joint: walking the neurons in order, each cost is the loss rise of zeroing it
    with the earlier zeroed ones (given `zeroed`, and those at most the threshold) already zeroed;
    the weights are restored afterwards."""
    model, pieces = _tiny_llama(1)
    before = [p.detach().clone() for p in model.parameters()]
    zeroed, neurons = [(1, 0)], [(2, 5), (0, 3), (1, 7), (2, 11), (0, 20), (1, 9)]
    single = ablation_costs(model, pieces, 2, neurons)
    threshold = sorted(single)[len(single) // 2]
    costs = ablation_costs(model, pieces, 2, neurons, threshold, zeroed)
    assert all(a.equal(b) for a, b in zip(before, model.parameters()))
    accepted = list(zeroed)
    for neuron, cost in zip(neurons, costs):
        expected = _loss_without(model, pieces, accepted + [neuron]) - _loss_without(model, pieces, accepted)
        assert cost == pytest.approx(expected, abs=1e-6)
        if cost <= threshold:
            accepted.append(neuron)
    assert len(zeroed) < len(accepted) < len(zeroed) + len(neurons)  # some passed, some were refused
    assert costs != pytest.approx(single, abs=1e-6)  # the removals interact


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


def _run_calibration(tmp_path, records: int, *options: str) -> None:
    """`neuronserve calibrate memorization` on the default model with `records` synthetic records,
    small reference text, profiles to tmp_path / "p"."""
    path = tmp_path / "leaked.jsonl"
    write_records(path, synthetic_records(records, seed=0))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--memorized", str(path), "--ratio", "0.01", *options, "--reference-sequences",
                                  "2", "--batch-size", "4", "--out", str(tmp_path / "p")])) == 0


def test_calibration_run_writes_a_loadable_profile(tmp_path):
    _run_calibration(tmp_path, 4, "--granularity", "both", "--retain-weight", "0", "4", "--retain-measure", "taylor")
    paths = sorted((tmp_path / "p").glob("memorization-*.safetensors"))
    # the default (retain weight 0) keeps the name profiles had before the option existed
    assert [p.name for p in paths] == ["memorization-neuron-attribution-logodds-0.01.safetensors",
                                       "memorization-neuron-attribution-logodds-taylor4-0.01.safetensors",
                                       "memorization-weight-0.01-spared.safetensors"]
    retained = load_profile(paths.pop(1))
    assert retained.header["parameters"]["retain_weight"] == 4.0
    assert retained.header["parameters"]["retain_measure"] == "taylor"
    for path in paths:
        raw = load_profile(path)
        profile = MemorizationProfile.from_profile(raw)
        profile.check_model(30, 1536)
        assert raw.header["parameters"]["ratio"] == 0.01
        assert raw.header["data"]["memorized_records"] == 4
        quality = raw.header["quality"]
        assert {"calibration_records_before", "calibration_records_after"} <= set(quality)
        assert profile.pruned_count > 0
    neuron_raw = load_profile(paths[0])
    neuron = MemorizationProfile.from_profile(neuron_raw)
    assert neuron.granularity == "neuron"
    assert neuron_raw.header["parameters"]["retain_weight"] == 0.0
    assert neuron_raw.header["parameters"]["layers"] == "all"
    # global allocation keeps the total budget: round(0.01 * 30 * 1536) = 461
    assert neuron.pruned_count == 461
    # a strong retain cost moves the choice away from the neurons ordinary text uses
    other = MemorizationProfile.from_profile(retained)
    assert other.pruned_count == 461
    assert (other.pruned_neurons & neuron.pruned_neurons).sum() < 461


def test_subspace_bases_weigh_memorized_energy_against_ordinary_text():
    """Two planted directions carry the memorized suffixes' energy: e0 four times as much as e1,
    but ordinary text varies 100 times more along e0. The subspace comes first along e1 (what
    removing it costs ordinary text counts), then e0; smaller ranks are the larger's first columns."""
    n = 12
    cov = torch.eye(n, dtype=torch.float64)
    cov[0, 0] = 100.0
    second = 0.01 * torch.eye(n, dtype=torch.float64)
    second[0, 0], second[1, 1] = 40.0, 10.0
    moments = SubspaceMoments(torch.zeros(1, n, dtype=torch.float64), cov[None], second[None], 100, 100)
    bases = subspace_bases(moments, (1, 2), ridge=0.0)
    assert bases[1].shape == (1, n, 1) and bases[2].shape == (1, n, 2)
    assert abs(float(bases[1][0, 1, 0])) > 0.999
    assert abs(float(bases[2][0, 0, 1])) > 0.999
    torch.testing.assert_close(bases[2][0].T @ bases[2][0], torch.eye(2))
    torch.testing.assert_close(bases[2][..., :1].abs(), bases[1].abs())


def test_calibration_run_writes_subspace_profiles(tmp_path):
    """--granularity subspace: one profile per rank, with its basis, the reference mean, the
    calibration-side figures, and a rank-r edit that changes the records' predictions."""
    _run_calibration(tmp_path, 4, "--granularity", "subspace", "--rank", "2", "8", "--subspace-sequences", "4")
    paths = sorted((tmp_path / "p").glob("memorization-*.safetensors"))
    assert [p.name for p in paths] == ["memorization-subspace-r2.safetensors", "memorization-subspace-r8.safetensors"]
    for path, rank in zip(paths, (2, 8)):
        raw = load_profile(path)
        profile = MemorizationProfile.from_profile(raw)
        profile.check_model(30, 1536)
        assert profile.granularity == "subspace" and tuple(profile.basis.shape) == (30, 1536, rank)
        assert profile.pruned_count == 30 * rank
        assert raw.header["parameters"]["rank"] == rank
        assert raw.header["data"]["report"]["subspace_text"]["pieces"] == 4
        quality = raw.header["quality"]
        assert quality["calibration_records_after"] != quality["calibration_records_before"]
        torch.testing.assert_close(profile.basis[3].T @ profile.basis[3], torch.eye(rank), atol=1e-4, rtol=0)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bad = parser.parse_args(["--memorized", str(tmp_path / "leaked.jsonl"), "--granularity", "subspace",
                             "--rank", "0", "--out", str(tmp_path / "q")])
    assert run(bad) == 2


def test_calibration_run_keeps_to_the_named_layers(tmp_path):
    _run_calibration(tmp_path, 2, "--granularity", "neuron", "--layers", "10-29")
    [path] = (tmp_path / "p").glob("memorization-*.safetensors")
    assert path.name == "memorization-neuron-attribution-logodds-layers10-29-0.01.safetensors"
    raw = load_profile(path)
    assert raw.header["parameters"]["layers"] == "10-29"
    per_layer = MemorizationProfile.from_profile(raw).pruned_neurons.sum(1)
    assert per_layer[:10].sum() == 0
    assert per_layer.sum() == 461  # the global budget stays ratio x all neurons
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bad = parser.parse_args(["--memorized", str(tmp_path / "leaked.jsonl"), "--layers", "12-10",
                             "--granularity", "neuron", "--out", str(tmp_path / "q")])
    assert run(bad) == 2  # not a range (checked before the model loads)


def test_the_cost_check_can_read_fewer_pieces_than_the_scores(tmp_path):
    """--verify-sequences below --reference-sequences: the check runs on the first scoring pieces
    only (the check costs per piece and per neuron; the scores read all pieces in one pass)."""
    _run_calibration(tmp_path, 2, "--granularity", "neuron", "--ratio", "0.0002", "--verify-cost", "1",
                     "--verify-sequences", "1")
    [path] = (tmp_path / "p").glob("memorization-*.safetensors")
    report = load_profile(path).header["data"]["report"]
    assert report["verify_text"]["pieces"] == 1
    assert report["sets"]["reference"]["tokens"] > 64  # the scores read both pieces


def test_the_cost_check_on_a_reference_file_reads_the_same_pieces(tmp_path):
    """With --reference FILE the check also reads the first --verify-sequences pieces (here fewer
    than the scores' two), never the held-out ones."""
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(f"The river {i} runs past the old mill and into the lake by the town."
                                   for i in range(200)))
    _run_calibration(tmp_path, 2, "--granularity", "neuron", "--ratio", "0.0002", "--verify-cost", "1",
                     "--verify-sequences", "1", "--reference", str(reference))
    [path] = (tmp_path / "p").glob("memorization-*.safetensors")
    header = load_profile(path).header
    assert header["data"]["report"]["verify_text"]["pieces"] == 1
    assert header["data"]["reference"] == str(reference)


def test_calibration_run_verifies_the_chosen_neurons(tmp_path):
    _run_calibration(tmp_path, 2, "--granularity", "neuron", "--ratio", "0.0002", "--verify-cost", "0",
                     "--verify-sequences", "3")
    [path] = (tmp_path / "p").glob("memorization-*.safetensors")
    assert path.name == "memorization-neuron-attribution-logodds-verified0-0.0002.safetensors"
    raw = load_profile(path)
    assert raw.header["parameters"]["verify_cost"] == 0.0
    # the check ran on the 2 scoring pieces and one more
    assert raw.header["parameters"]["verify_sequences"] == 3
    assert raw.header["data"]["report"]["verify_text"]["pieces"] == 3
    # at 0 nats every neuron whose removal raises the reference loss at all is refused and replaced
    refused = raw.header["parameters"]["refused_for_cost"]
    assert refused and all(r["cost_nats"] > 0 for r in refused)
    pruned = MemorizationProfile.from_profile(raw).pruned_neurons
    assert not any(pruned[r["layer"], r["neuron"]] for r in refused)
    assert MemorizationProfile.from_profile(raw).pruned_count == 9  # round(0.0002 x 30 x 1536)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bad = parser.parse_args(["--memorized", str(tmp_path / "leaked.jsonl"), "--verify-cost", "-1",
                             "--out", str(tmp_path / "q")])
    assert run(bad) == 2
    bad = parser.parse_args(["--memorized", str(tmp_path / "leaked.jsonl"), "--verify-cost", "0.001",
                             "--verify-sequences", "0", "--out", str(tmp_path / "q")])
    assert run(bad) == 2


def test_calibration_run_checks_jointly(tmp_path):
    _run_calibration(tmp_path, 2, "--granularity", "neuron", "--ratio", "0.0002", "--verify-cost", "0",
                     "--verify-mode", "joint", "--verify-sequences", "2", "--retain-weight", "0", "4")
    paths = sorted((tmp_path / "p").glob("memorization-*.safetensors"))
    assert [p.name for p in paths] == [
        "memorization-neuron-attribution-logodds-effect4-verified-joint0-0.0002.safetensors",
        "memorization-neuron-attribution-logodds-verified-joint0-0.0002.safetensors"]
    masks = []
    for path in paths:
        raw = load_profile(path)
        assert raw.header["parameters"]["verify_mode"] == "joint"
        refused = raw.header["parameters"]["refused_for_cost"]
        assert refused and all(r["cost_nats"] > 0 for r in refused)
        profile = MemorizationProfile.from_profile(raw)
        assert not any(profile.pruned_neurons[r["layer"], r["neuron"]] for r in refused)
        assert profile.pruned_count == 9
        # each accepted neuron's rise on top of the earlier ones was <= 0, so the whole mask's is too
        assert raw.header["parameters"]["verify_text_mask_cost_nats"] <= 1e-5
        masks.append(profile.pruned_neurons)
    assert not masks[0].equal(masks[1])


def test_more_reference_pieces_start_with_the_fewer(tmp_path):
    """The cost check's text extends the scoring text: the first k of a larger draw are the same k
    pieces, and none of them is a held-out piece."""
    from server.calibration.memorization import _default_data_dir, reference_pieces
    from server.model.loader import load_checkpoint
    from server.settings import default_cache_dir

    data_dir = _default_data_dir()
    if not (data_dir / "wikitext2").is_dir():
        pytest.skip(f"no reference data under {data_dir}")
    tokenizer = load_checkpoint("default", default_cache_dir()).tokenizer
    few, held_few = reference_pieces(tokenizer, data_dir, 4, 32, 0, heldout=2)
    many, _ = reference_pieces(tokenizer, data_dir, 10, 32, 0, heldout=2)
    assert many[:4] == few and len(many) == 10 and len({tuple(p) for p in many}) == 10
    assert all(len(p) == 32 for p in many)
    assert not {tuple(p) for p in held_few} & {tuple(p) for p in many}


def _quality(extracted_after: float, ppl_after: float) -> dict:
    return {"calibration_records_before": {"exact_extraction": 0.8, "heldout_reference_ppl": 50.0},
            "calibration_records_after": {"exact_extraction": extracted_after, "heldout_reference_ppl": ppl_after}}


def test_calibration_side_pick_follows_the_documented_rule():
    rows = [("small", _quality(0.40, 50.5)),   # cut 50%
            ("middle", _quality(0.06, 51.0)),  # cut 92.5%, +2%
            ("large", _quality(0.00, 52.0))]   # cut 100%, +4%
    # the lowest validation perplexity among those cutting >= 90%, not the largest cut
    assert calibration_side_pick(rows, min_cut=0.9).startswith("middle (cut -92%, validation perplexity +2.0%")
    assert calibration_side_pick(rows, min_cut=0.95).startswith("large (cut -100%")
    # none reaches the bar: the largest cut, and it says so
    assert calibration_side_pick(rows[:1], min_cut=0.9) == "small (cut -50%, validation perplexity +1.0%; none reached a 90% cut)"
    nothing_extracted = {"calibration_records_before": {"exact_extraction": 0.0, "heldout_reference_ppl": 50.0},
                         "calibration_records_after": {"exact_extraction": 0.0, "heldout_reference_ppl": 50.0}}
    assert calibration_side_pick([("x", nothing_extracted)], min_cut=0.9) is None
    assert calibration_side_pick([], min_cut=0.9) is None


def test_calibration_side_bar_is_lower_with_more_calibration_records():
    rows = [("0.6%", _quality(0.10, 50.5)),   # cut 87.5%, +1%
            ("0.8%", _quality(0.07, 51.5))]   # cut 91.25%, +3%
    assert calibration_side_bar(60) == 0.9 and calibration_side_bar(119) == 0.9
    assert calibration_side_bar(120) == 0.85 and calibration_side_bar(500) == 0.85
    assert calibration_side_pick(rows, min_cut=calibration_side_bar(60)).startswith("0.8%")
    assert calibration_side_pick(rows, min_cut=calibration_side_bar(120)).startswith("0.6%")
