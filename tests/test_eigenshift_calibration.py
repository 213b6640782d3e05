"""EigenShift calibration: the scorer, the component scoring, a tiny end-to-end calibration, and the
per-row correction against the paper's offline head edit."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("profanity_check", reason="the toxicity scorer needs alt-profanity-check")

from conftest import SHARED_DATA

from server.calibration.eigenshift import (
    ContrastSet,
    HeadSVD,
    add_arguments,
    component_scores,
    make_profile,
    position_matched,
    run,
)
from server.interventions.eigenshift import EigenShiftProfile
from server.interventions.vectors import SteeringVector
from server.profiles import load_profile
from server.runtime import load_model
from server.settings import ServerSettings
from server.toxicity import ToxicityScorer, load_scorer, most_toxic_words


@pytest.fixture(scope="module")
def scorer() -> ToxicityScorer:
    return load_scorer()


@pytest.fixture(scope="module")
def loaded():
    return load_model(ServerSettings(model="default", wina_profile="none", max_model_len=256, dtype="float32"))


def test_scorer_flags_profanity_not_neutral_text(scorer):
    assert isinstance(scorer, ToxicityScorer)
    assert "alt-profanity-check" in scorer.name
    toxic = ["you are a fucking idiot", "shut up, you stupid bitch", "this is bullshit"]
    neutral = ["the weather is nice today", "I made pasta for my family", "the train leaves at noon"]
    scores = scorer.score(toxic + neutral)
    assert all(s >= scorer.threshold for s in scores[:3]), scores
    assert all(s < scorer.threshold for s in scores[3:]), scores


def test_most_toxic_word_is_the_profanity(scorer):
    text = "well I think that guy is a total asshole, honestly"
    (word,) = most_toxic_words(scorer, [text])
    assert text[word.start:word.end].startswith("asshole")


def test_component_scoring_sign_invariance():
    """Flipping the sign of a singular vector pair (u_i, v_i) leaves W unchanged. The fixed scorings
    rank the same components; the published signed delta ranks the flipped one differently."""
    gen = torch.Generator().manual_seed(0)
    hidden, n = 16, 200
    V = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen)).Q
    toxic = torch.randn(n, hidden, generator=gen)
    toxic = toxic + 3.0 * V[:, 2]  # toxic states sit far out along component 2 ...
    toxic = toxic - 2.0 * V[:, 5]  # ... and in the negative direction of component 5
    contrast = ContrastSet(toxic, torch.randn(n, hidden, generator=gen), torch.full((n,), 1.0 / n))
    flipped = V.clone()
    flipped[:, 5] = -flipped[:, 5]
    for scoring in ("matched-abs", "matched-std"):
        a = component_scores(contrast.stats(V), scoring)
        b = component_scores(contrast.stats(flipped), scoring)
        torch.testing.assert_close(a, b)  # identical up to float rounding
        assert set(a.topk(2).indices.tolist()) == {2, 5}
    signed, signed_flipped = (component_scores(contrast.stats(m), "paper") for m in (V, flipped))
    assert signed.topk(2).indices.tolist() != signed_flipped.topk(2).indices.tolist()
    assert 5 not in signed.topk(2).indices.tolist()  # the signed ranking misses the negative one


def test_position_matching_reweights_nontoxic_states():
    h = torch.eye(4)
    toxic = [(h[0], ("rtp", 5)), (h[0], ("rtp", 5)), (h[1], ("rtp", 7))]
    nontoxic = [(h[2], ("rtp", 0)), (h[3], ("rtp", 5)), (h[3], ("rtp", 5)), (h[2], ("rtp", 7))]
    matched = position_matched(toxic, nontoxic)
    # position 0 has no toxic state: dropped; position 5 carries 2/3 of the weight, 7 one third
    assert matched.nontoxic.shape[0] == 3
    torch.testing.assert_close(matched.nontoxic_weight, torch.tensor([1 / 3, 1 / 3, 1 / 3]))


def test_correction_equals_edited_head(loaded):
    """Scale mode: logits - correction(h, alpha) == h @ edited_head(alpha)^T, in float32."""
    model = loaded.model
    svd = HeadSVD.of(model)
    ranked = torch.tensor([570, 3, 100, 575, 0, 250])
    profile = make_profile(svd, ranked, 6, 0.0, "t")
    h = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    head = model.head.weight.float()
    for alpha in (0.0, 0.3, 1.0):
        ours = h @ head.T - profile.correction(h, torch.full((5,), alpha))
        paper = h @ profile.edited_head(head, alpha).T
        # float32 matmuls of length 576 with logits of magnitude ~30: rounding differences ~1e-5
        torch.testing.assert_close(ours, paper, atol=1e-4, rtol=1e-5)
    # alpha = 1: exactly no change
    assert torch.equal(profile.correction(h, torch.ones(5)), torch.zeros(5, model.config.vocab_size))


def test_gated_profile_leaves_in_range_rows_alone(loaded):
    svd = HeadSVD.of(loaded.model)
    gen = torch.Generator().manual_seed(2)
    nontoxic = torch.randn(50, loaded.model.config.hidden_size, generator=gen)
    contrast = ContrastSet(nontoxic[:10] + 5 * svd.V[:, 7], nontoxic, torch.full((50,), 1 / 50))
    delta = contrast.stats(svd.V)["delta"]
    profile = make_profile(svd, torch.tensor([7]), 1, 0.0, "g", "gated", contrast, delta, 0.9)
    inside = svd.V[:, 7] * float(profile.upper[0] - 1.0) if torch.isfinite(profile.upper[0]) else None
    assert inside is not None, "the toxic side of component 7 is the high side"
    assert torch.count_nonzero(profile.correction(inside.unsqueeze(0), torch.zeros(1))) == 0
    outside = svd.V[:, 7] * float(profile.upper[0] + 4.0)
    assert profile.correction(outside.unsqueeze(0), torch.zeros(1)).abs().max() > 0


def test_tiny_calibration_writes_a_loadable_profile(tmp_path, loaded):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--fit-prompts", "12", "--offensive-per-class", "0", "--sweep-prompts", "2",
                              "--sweep-samples", "1", "--ks", "2", "--alphas", "0", "--gate-quantiles", "0.9",
                              "--ppl-tokens", "256", "--steer-strengths", "0.5", "1", "--out", str(tmp_path / "out"),
                              "--variants-out", str(tmp_path / "variants"), "--data-dir", str(SHARED_DATA)])
    assert run(args) == 0
    path = tmp_path / "out" / "eigenshift-toxicity.safetensors"
    profile = load_profile(path)
    profile.check_model(loaded.fingerprint, loaded.name)
    es = EigenShiftProfile.from_profile(profile)
    es.check_model(loaded.model.config.vocab_size, loaded.model.config.hidden_size)
    assert es.k == 2 and es.mode in ("scale", "gated")
    header = profile.header
    assert header["data"]["scorer"].startswith("alt-profanity-check")
    assert header["quality"]["sweep"][0]["scoring"] == "none"
    assert header["quality"]["chosen"]["k"] == 2
    assert (tmp_path / "variants" / "eigenshift-toxicity-paper.safetensors").exists()
    # the steering vector ships beside the profile, with the strength its own sweep chose
    vector_profile = load_profile(tmp_path / "out" / "vector-toxicity.safetensors")
    vector_profile.check_model(loaded.fingerprint, loaded.name)
    vector = SteeringVector.from_profile(vector_profile)
    assert vector.name == "toxicity" and vector.layers == (15,)
    steering = vector_profile.header["quality"]
    assert [t["strength"] for t in steering["trials"]] == [-0.0, -0.5, -1.0]
    assert vector_profile.header["parameters"]["strength"] == steering["chosen"]["strength"] in (-0.5, -1.0)
