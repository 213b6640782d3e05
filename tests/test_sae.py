"""Sparse autoencoders: the SAELens v6 layout (ours and the real `sae-lens` package, both ways), pre-6.0
configs, refusing an SAE made for another model, encode against a reference, and TopK / BatchTopK +
AuxK training on a tiny problem (loss falls, decoder rows stay unit-norm, same weights for the same seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.calibration.sae import (
    SaeTrainingConfig,
    TopKTrainer,
    export_sae,
    load_initial_weights,
    train_sae,
)
from server.interventions.sae import (
    FINGERPRINT_KEY,
    SaeConfig,
    SaeFormatError,
    SparseAutoencoder,
    check_model,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAE = PROJECT_ROOT / "server" / "default_profiles" / "smollm2-135m-instruct" / "sae-l15-resid-8k"
D_IN, D_SAE = 48, 96


def _random_sae(architecture: str, seed: int = 0, **metadata) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    cfg = SaeConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=8 if architecture == "topk" else None,
                    hook_name="blocks.3.hook_resid_post", model_name="tiny-model", apply_b_dec_to_input=True,
                    context_size=128, extra_metadata=dict(metadata))
    threshold = torch.rand(D_SAE, generator=g) * 0.5 if architecture == "jumprelu" else None
    return SparseAutoencoder(cfg, torch.randn(D_IN, D_SAE, generator=g) / D_IN ** 0.5, torch.randn(D_SAE, generator=g) * 0.1,
                             torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_IN, generator=g) * 0.1, threshold,
                             name="tiny")


def _reference_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Written out per architecture, independently of SparseAutoencoder.activation."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.cfg.architecture == "standard":
        return torch.clamp(pre, min=0)
    if sae.cfg.architecture == "jumprelu":
        return torch.where((pre > sae.threshold) & (pre > 0), pre, torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[row, j]))[:sae.cfg.k]
        for j in order:
            out[row, j] = max(float(pre[row, j]), 0.0)
    return out


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_encode_matches_reference(architecture):
    sae = _random_sae(architecture)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1))
    z = sae.encode(x)
    torch.testing.assert_close(z, _reference_encode(sae, x), atol=1e-5, rtol=1e-5)  # float32 matmul order
    if architecture == "topk":
        assert int((z > 0).sum(-1).max()) <= 8
    torch.testing.assert_close(sae.decode(z), z @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_our_format_round_trip(tmp_path, architecture):
    sae = _random_sae(architecture, **{FINGERPRINT_KEY: "abc123", "figures": {"ev": 0.9}})
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-model" and cfg["metadata"][FINGERPRINT_KEY] == "abc123"
    back = SparseAutoencoder.load(tmp_path / "sae")
    assert back.cfg == sae.cfg and back.layer == 3
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(back, name), getattr(sae, name), atol=0, rtol=0)  # float32 file


def test_pre_6_config_loads(tmp_path):
    """SAELens < 6: flat config with hook_point, activation_fn_str / activation_fn_kwargs.k."""
    sae = _random_sae("topk")
    save_file({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "model_name": "tiny-model", "hook_point": "blocks.3.hook_resid_post",
        "hook_point_layer": 3, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8},
        "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "torch.float32",
        "context_size": 128, "device": "cpu"}))
    old = SparseAutoencoder.load(tmp_path)
    assert old.cfg.architecture == "topk" and old.cfg.k == 8 and old.layer == 3 and old.cfg.model_name == "tiny-model"
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(old.encode(x), sae.encode(x))


def test_unusable_files_refused(tmp_path):
    with pytest.raises(SaeFormatError, match="not an SAE directory"):
        SparseAutoencoder.load(tmp_path)
    sae = _random_sae("topk")
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN + 1}))
    with pytest.raises(SaeFormatError, match="W_enc has shape"):
        SparseAutoencoder.load(tmp_path / "sae")


def test_sae_for_another_model_refused():
    sae = _random_sae("topk", **{FINGERPRINT_KEY: "model-a"})
    check_model(sae, D_IN, "model-a", num_layers=4)  # its own model: accepted
    with pytest.raises(SaeFormatError, match=f"d_in={D_IN}.*hidden size is 576"):
        check_model(sae, 576, "model-a")
    with pytest.raises(SaeFormatError, match="fingerprint model-a.*model-b"):
        check_model(sae, D_IN, "model-b")
    with pytest.raises(SaeFormatError, match="layer 3"):
        check_model(sae, D_IN, "model-a", num_layers=2)
    check_model(_random_sae("topk"), D_IN, "model-b")  # no recorded fingerprint: d_in is all we can check


# --- the real sae-lens package (test-only dependency) ----------------------------------------------

def _sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens is a test-only dependency (pip install sae-lens --no-deps ...)")


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_sae_lens_reads_ours(tmp_path, architecture):
    sae_lens = _sae_lens()
    ours = _random_sae(architecture, **{FINGERPRINT_KEY: "abc123"})
    ours.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae", device="cpu")
    assert theirs.cfg.architecture() == architecture
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "tiny-model"
    x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_we_read_sae_lens(tmp_path, architecture):
    sae_lens = _sae_lens()
    config_class = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
                    "jumprelu": sae_lens.JumpReLUSAEConfig}[architecture]
    sae_class = {"standard": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE, "jumprelu": sae_lens.JumpReLUSAE}[architecture]
    extra = {"k": 8} if architecture == "topk" else {}
    cfg = config_class(d_in=D_IN, d_sae=D_SAE, **extra)
    cfg.metadata.model_name = "tiny-model"
    cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    theirs = sae_class(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in theirs.parameters():  # their init leaves biases at 0: make every tensor count
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (0.1 if parameter.ndim == 1 else 0))
    theirs.save_model(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae")
    assert ours.cfg.architecture == architecture and ours.layer == 3 and ours.cfg.model_name == "tiny-model"
    x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), atol=1e-4, rtol=1e-4)


# --- training ---------------------------------------------------------------------------------------

def _sparse_data(n: int, seed: int = 0) -> torch.Tensor:  # n tokens over one fixed set of directions per seed
    """Tokens made of 3 of 32 fixed directions with positive weights, plus noise and an offset:
    a TopK SAE with k >= 3 can explain most of its variance."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, D_IN, generator=g)
    idx = torch.stack([torch.randperm(32, generator=g)[:3] for _ in range(n)])  # [n, 3]
    weights = torch.rand(n, 3, generator=g) * 3 + 0.5
    x = (weights.unsqueeze(-1) * directions[idx]).sum(1) + 0.05 * torch.randn(n, D_IN, generator=g) + 2.0
    return x.half()  # the activation cache is float16


def _tiny_config(**overrides) -> SaeTrainingConfig:
    return SaeTrainingConfig(**{"layer": 3, "width": 64, "k": 4, "train_tokens": 300 * 128, "batch_size": 128,
                                "lr": 3e-3, "warmup_steps": 10, "dead_window_tokens": 2000, "checkpoint_every": 100,
                                **overrides})


@pytest.mark.parametrize("batch_topk", [False, True])
def test_sparse_encoder_gradient_matches_dense_autograd(batch_topk):
    """The sparse backward (only selected latents) equals autograd through a dense TopK (or
    BatchTopK) SAE."""
    g = torch.Generator().manual_seed(0)
    trainer = TopKTrainer(D_IN, D_SAE, k=6, aux_k=10, generator=g, batch_topk=batch_topk)
    with torch.no_grad():
        trainer.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        trainer.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.1)
    x = torch.randn(32, D_IN, generator=g)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    x_hat, _, aux = trainer(x, dead)
    ((x_hat - x).pow(2).sum(-1).mean() + aux / 32).backward()
    sparse_grads = [p.grad.clone() for p in (trainer.W_enc_t, trainer.b_enc, trainer.W_dec, trainer.b_dec)]

    W_enc_t, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in
                                    (trainer.W_enc_t, trainer.b_enc, trainer.W_dec, trainer.b_dec))
    pre = (x - b_dec) @ W_enc_t.t() + b_enc
    if batch_topk:  # the batch's 6 * 32 largest, wherever they are
        top = pre.reshape(-1).topk(6 * 32)
        z = torch.zeros_like(pre).reshape(-1).scatter(0, top.indices, top.values.relu()).reshape(pre.shape)
    else:
        top = pre.topk(6, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat_ref = z @ W_dec + b_dec
    error = (x - x_hat_ref).detach()
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    top_aux = pre_dead.topk(10, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, top_aux.indices, top_aux.values.relu())
    aux_ref = (z_aux @ W_dec - error).pow(2).sum(-1).mean()
    ((x_hat_ref - x).pow(2).sum(-1).mean() + aux_ref / 32).backward()
    for ours, ref in zip(sparse_grads, (W_enc_t.grad, b_enc.grad, W_dec.grad, b_dec.grad)):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # float32 sums in another order


def test_tiny_sae_trains(tmp_path):
    data = _sparse_data(4096 + 512)
    acts, heldout = data[:4096], data[4096:].float()
    config = _tiny_config()
    trainer, scale, log = train_sae(acts, config, tmp_path / "ckpt.pt")
    history = [entry["explained_variance"] for entry in log["history"]]
    assert history[-1] > history[0] + 0.2 and history[-1] > 0.7, history
    torch.testing.assert_close(trainer.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)

    sae = export_sae(trainer, scale, config.layer, config, "tiny-model", 64, {FINGERPRINT_KEY: "abc"})
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)  # unit rows in model units
    x_hat = sae.decode(sae.encode(heldout))
    explained = 1 - (heldout - x_hat).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum()
    assert explained > 0.7, float(explained)  # held-out tokens, through the exported (unit-folded) weights
    sae.save(tmp_path / "sae")
    assert SparseAutoencoder.load(tmp_path / "sae").cfg.extra_metadata[FINGERPRINT_KEY] == "abc"


def test_batch_selection_is_the_batchs_largest_entries():
    """_select_batch and batch_topk_threshold equal a plain top-k over the whole batch, also when
    one token holds more of the batch's largest entries than its 4 k candidates (the fallbacks)."""
    trainer = TopKTrainer(D_IN, D_SAE, k=3, aux_k=0, generator=torch.Generator().manual_seed(0), batch_topk=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, D_IN, generator=g)
    x[7] *= 50  # token 7's entries dominate the batch: it takes more than 12 of the 120 slots
    pre = trainer.pre_activation(x)
    for scores in (pre, torch.randn(40, D_SAE, generator=g)):
        rows, cols = trainer._select_batch(scores)
        expected = scores.reshape(-1).topk(3 * 40).indices.sort().values
        assert torch.equal(rows, rows.sort().values)  # tokens in order, for embedding_bag's offsets
        assert torch.equal((rows * D_SAE + cols).sort().values, expected)
    assert int((rows == 7).sum()) <= 12 < int((pre.reshape(-1).topk(120).indices // D_SAE == 7).sum())
    threshold = trainer.batch_topk_threshold(x, chunk=16)
    assert threshold == float(pre.reshape(-1).topk(3 * 40).values[-1])


def test_batch_topk_sae_trains_and_saves_as_jumprelu(tmp_path):
    data = _sparse_data(4096 + 512)
    acts, heldout = data[:4096], data[4096:].float()
    config = _tiny_config(architecture="batchtopk", dtype="float32")  # float16 would move latents across the jump
    trainer, scale, log = train_sae(acts, config)
    assert log["history"][-1]["explained_variance"] > 0.7, log["history"]
    sae = export_sae(trainer, scale, config.layer, config, "tiny-model", 64, {}, log["threshold"])
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.k is None
    z = sae.encode(heldout)
    explained = 1 - (heldout - sae.decode(z)).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum()
    assert explained > 0.7, float(explained)
    l0 = (z > 0).sum(-1).float()
    assert 0.7 * config.k < float(l0.mean()) < 1.3 * config.k and float(l0.std()) > 0  # k on average, not each
    sae.save(tmp_path / "sae")
    torch.testing.assert_close(SparseAutoencoder.load(tmp_path / "sae").encode(heldout), z, atol=0, rtol=0)
    with pytest.raises(ValueError, match="threshold"):
        export_sae(trainer, scale, config.layer, config, "tiny-model", 64, {})


def test_fine_tune_starts_from_the_initial_sae():
    """load_initial_weights moves each decoder row's norm into the encoder (the reconstruction is
    unchanged) and train_sae(initial=...) starts where that SAE left off, not from a random init."""
    relu_sae = _random_sae("standard")  # decoder rows of norm about 7, not 1
    assert float((relu_sae.W_dec.norm(dim=1) - 1).abs().min()) > 1
    trainer = TopKTrainer(D_IN, D_SAE, k=4, aux_k=0, generator=torch.Generator().manual_seed(0))
    scale = 1.7
    load_initial_weights(trainer, relu_sae, scale)
    torch.testing.assert_close(trainer.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the trainer's units are x / scale
        ours = (trainer.pre_activation(x / scale).relu() @ trainer.W_dec + trainer.b_dec) * scale
    torch.testing.assert_close(ours, relu_sae.decode(relu_sae.encode(x)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="96"):
        load_initial_weights(TopKTrainer(D_IN, 2 * D_SAE, 4, 0, torch.Generator()), relu_sae, scale)

    acts = _sparse_data(4096)
    config = _tiny_config(dtype="float32")
    trained, trained_scale, trained_log = train_sae(acts, config)
    initial = export_sae(trained, trained_scale, config.layer, config, "tiny-model", 64, {})
    short = _tiny_config(dtype="float32", train_tokens=20 * 128, lr=1e-5, warmup_steps=1)
    _, _, tuned_log = train_sae(acts, short, initial=initial)
    _, _, fresh_log = train_sae(acts, short)
    started = tuned_log["history"][0]["explained_variance"]  # the first 50 steps' window (all 20 here)
    assert started > trained_log["history"][-1]["explained_variance"] - 0.02, (started, trained_log["history"][-1])
    assert started > fresh_log["history"][0]["explained_variance"] + 0.2
    # no training step: a TopK SAE becomes a BatchTopK one with the same weights and a fitted threshold
    converted, converted_scale, converted_log = train_sae(acts, _tiny_config(architecture="batchtopk", train_tokens=0),
                                                          initial=initial)
    assert converted_log["history"] == [] and converted_log["final_dead_fraction"] is None
    jump = export_sae(converted, converted_scale, config.layer, _tiny_config(architecture="batchtopk"), "tiny-model",
                      64, {}, converted_log["threshold"])
    torch.testing.assert_close(jump.W_dec, initial.W_dec)
    l0 = float((jump.encode(acts[:1024].float()) > 0).sum(-1).float().mean())
    assert 0.8 * config.k < l0 < 1.2 * config.k, l0

def test_training_is_deterministic_and_resumes(tmp_path):
    acts = _sparse_data(2048)
    config = _tiny_config(train_tokens=120 * 128, checkpoint_every=60)
    first, _, _ = train_sae(acts, config)
    second, _, _ = train_sae(acts, config)
    torch.testing.assert_close(first.W_dec, second.W_dec, atol=0, rtol=0)
    other, _, _ = train_sae(acts, _tiny_config(train_tokens=120 * 128, seed=1))
    assert not torch.equal(first.W_dec, other.W_dec)
    # stop after 60 steps (a checkpoint), then resume to 120: the same weights as one straight run
    train_sae(acts, _tiny_config(train_tokens=60 * 128, checkpoint_every=60, decay_fraction=0.0), tmp_path / "c.pt")
    straight, _, _ = train_sae(acts, _tiny_config(train_tokens=120 * 128, decay_fraction=0.0))
    resumed, _, _ = train_sae(acts, _tiny_config(train_tokens=120 * 128, decay_fraction=0.0), tmp_path / "c.pt",
                              resume=True)
    torch.testing.assert_close(resumed.W_dec, straight.W_dec, atol=0, rtol=0)


@pytest.mark.skipif(not DEFAULT_SAE.is_dir(), reason="the default SAE has not been trained yet")
def test_default_sae_fits_default_model():
    from server.runtime import load_model
    from server.settings import ServerSettings

    sae = SparseAutoencoder.load(DEFAULT_SAE)
    loaded = load_model(ServerSettings(max_model_len=64, wina_profile="none", log_level="warning"))
    check_model(sae, loaded.model.config.hidden_size, loaded.fingerprint, len(loaded.model.layers))
    assert sae.cfg.architecture == "jumprelu" and sae.layer == 15 and sae.cfg.d_sae == 8192
    assert sae.cfg.extra_metadata[FINGERPRINT_KEY] == loaded.fingerprint
    # the residual after layer 15 of a real prompt is reconstructed with most of its variance
    ids = torch.tensor([loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog because it was late "
                                                "for the meeting at the old library downtown.")])
    h = loaded.model.residual_stream(ids, 15)[0, 1:].float()  # position 0 (attention sink) left out
    h_hat = sae.decode(sae.encode(h))
    explained = 1 - (h - h_hat).pow(2).sum() / (h - h.mean(0)).pow(2).sum()
    assert explained > 0.5, float(explained)


def test_calibrate_sae_command_writes_a_loadable_sae(tmp_path, monkeypatch):
    """`neuronserve calibrate sae` end to end on the default model, at toy sizes: corpus (with the
    model's own samples), cached activations, training, evaluation of the 16-bit weights, SAELens
    layout on disk. BatchTopK, the path with the most to carry (threshold) from training to disk."""
    import argparse

    from server.calibration.sae import add_arguments, run

    monkeypatch.setenv("NEURONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "sae"
    args = parser.parse_args(["--layer", "3", "--width", "256", "--k", "4", "--architecture", "batchtopk",
                              "--corpus-tokens", "4000", "--corpus-shares", "wikitext2-valid=0.5,pile-extraction=0.4",
                              "--sample-prompts", "2", "--sample-tokens", "24", "--sequence-length", "64",
                              "--tokens", "4096", "--batch-size", "256", "--eval-sequences", "2", "--out", str(out)])
    assert run(args) == 0
    sae = SparseAutoencoder.load(out)
    assert sae.layer == 3 and sae.cfg.d_sae == 256
    corpus = {c["source"]: c["tokens"] for c in sae.cfg.extra_metadata["neuronserve_training"]["corpus"]}
    assert set(corpus) == {"wikitext2-valid", "pile-extraction", "model-samples"}
    assert corpus["wikitext2-valid"] == 2000 // 64 * 64 and corpus["pile-extraction"] == 1600 // 64 * 64
    assert sae.cfg.architecture == "jumprelu"
    figures = sae.cfg.extra_metadata["neuronserve_eval"]
    assert figures["tokens"] == 2 * 63 and 0 < figures["l0"] and figures["ce_zero"] > figures["ce_orig"]
    assert sae.cfg.extra_metadata["neuronserve_training"]["threshold_normalised"] > 0
    assert bool((sae.threshold == sae.threshold[0]).all()) and float(sae.threshold[0]) > 0

    # fine-tune it as TopK (same corpus and activations, from the cache); a width it lacks is refused
    tuned = tmp_path / "sae-tuned"
    common = ["--layer", "3", "--k", "4", "--corpus-tokens", "4000", "--corpus-shares",
              "wikitext2-valid=0.5,pile-extraction=0.4", "--sample-prompts", "2", "--sample-tokens", "24",
              "--sequence-length", "64", "--tokens", "1024", "--batch-size", "256", "--eval-sequences", "1",
              "--init-from", str(out)]
    assert run(parser.parse_args(common + ["--width", "128", "--out", str(tuned)])) == 2
    assert run(parser.parse_args(common + ["--width", "256", "--out", str(tuned)])) == 0
    recipe = SparseAutoencoder.load(tuned).cfg.extra_metadata["neuronserve_training"]["recipe"]
    assert recipe.startswith("TopK") and "fine-tuned from sae " in recipe


def test_corpus_shares_parse_and_refuse():
    import argparse

    from server.calibration.sae import CORPUS_SOURCES, parse_corpus_shares

    assert parse_corpus_shares("wikitext2-valid=0.5, gnu-info=0.25") == {"wikitext2-valid": 0.5, "gnu-info": 0.25}
    for bad, says in (("wiki=0.5", "wikitext2-valid"), ("tweets=half", "not a number"), ("tweets", "SOURCE=SHARE"),
                      ("tweets=0.7,rtp=0.4", "at most 1"), ("rtp=-0.1", "between 0 and 1"), ("", "at least one")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_corpus_shares(bad)
    assert len(set(CORPUS_SOURCES)) == len(CORPUS_SOURCES)


def test_every_corpus_source_reads_and_packs():
    """Each named source has a reader; a source gives its share of the corpus in whole sequences, or
    nothing when this machine lacks its text (the OS manuals, say), never another source's text."""
    from transformers import PreTrainedTokenizerFast

    from server.calibration.data import default_data_dir
    from server.calibration.sae import (
        CORPUS_SOURCES,
        CorpusConfig,
        build_corpus,
        gnu_info_texts,
        package_doc_texts,
    )

    if not (default_data_dir() / "wikitext2").is_dir():
        pytest.skip("needs ../shared/data")
    from server.runtime import load_model
    from server.settings import ServerSettings

    tokenizer = load_model(ServerSettings(max_model_len=64, wina_profile="none", log_level="warning")).tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    length, per_source = 32, 4 * 32
    config = CorpusConfig(corpus_tokens=per_source * len(CORPUS_SOURCES), sequence_length=length, sample_prompts=0,
                          shares={name: 1 / len(CORPUS_SOURCES) for name in CORPUS_SOURCES})
    sequences, sources, described = build_corpus(None, tokenizer, config)
    optional = {"gnu-info": bool(gnu_info_texts()), "package-docs": bool(package_doc_texts())}
    assert [d["source"] for d in described] == list(CORPUS_SOURCES)  # a missing source is listed with 0 tokens
    assert [d["tokens"] for d in described] == [per_source if optional.get(d["source"], True) else 0 for d in described]
    assert sorted(sources) == sorted(d["source"] for d in described for _ in range(d["sequences"]))
    assert all(len(s) == length for s in sequences)
