#!/usr/bin/env python3
"""Does steering steer? SAE-latent add, SAE-latent clamp and a difference-in-means concept vector,
concept by concept, on prompts that are not about the concept (issue 4, part 6).

For each concept in ``benchmarks/concepts/`` (``<concept>.pos.txt`` texts about it, ``<concept>.neg.txt``
matched sentences without it, and its words in ``concepts.json``):

1. **SAE feature.** Every latent of the SAE (at layer L) is scored by its mean activation on the
   concept's texts minus the matched texts (positions >= 1, as everywhere); the top ``--candidates``
   are then judged by their top-activating tokens on the calibration corpus (Alpaca instructions and
   answers + WikiText-2 *validation*, ``--corpus-tokens`` tokens in 128-token windows): the share of
   a latent's ``--top-contexts`` strongest activations whose token, with two tokens either side, holds
   one of the concept's words. The candidate with the highest share is the concept's feature (ties:
   the higher contrast). Every candidate, its share and its top contexts are in the JSON.
2. **Concept vector.** Difference in means of the residual stream after layer L (the SAE's layer)
   over the same texts (``server/calibration/vector.py``, what ``neuronserve calibrate vector`` runs).
3. **Generation.** ``--prompts`` neutral chat prompts, ``--max-tokens`` new tokens each, through
   ``OfflineGenerator`` (the real engine: continuous batching, ``--batch-size`` rows at a time, per-row
   interventions through the registry, as a request's ``interventions`` field would ask). Sampled:
   temperature ``--temperature``, top-p ``--top-p``, seed = ``--seed`` + prompt index, so every
   method and strength draws the same random numbers for a prompt (paired comparisons).
   Strengths are given as multiples r of the median residual-stream norm at layer L (positions >= 1,
   on the corpus) and each method adds a vector of norm r * median along its direction:
   * add: ``{"sae": ID, "feature": f, "strength": r * median / ||W_dec[f]||}``
   * clamp: ``{"sae": ID, "feature": f, "clamp": r * median / ||W_dec[f]||}`` (the latent set to that
     value at every position but 0; where it is off, the same change as add)
   * vector: ``{"vector": NAME, "strength": r * median / ||v||}``
   All at every position, prompt included (the request default, ``--positions all``), or with
   ``--positions generated`` only at the generated tokens (the spec's ``positions`` field: prefill
   steps sit out, so the first new token is sampled unsteered). The unsteered generations are made
   once and are every concept's baseline.
4. **Measures**, each generation re-read by the unsteered model (prompt + generation, one forward):
   * feature activation: the concept feature's mean activation over the generated tokens;
   * word rate: the share of generations whose text contains one of the concept's words;
   * fluency: perplexity of the generated tokens under the unsteered model (token-weighted over a
     cell's generations; lower is more fluent, but a degenerate loop also scores low: look at the
     texts in the JSON).

Writes ``steering_eval.{json,txt,png}`` (and the draft RESULTS section ``steering_eval.md`` by hand)
to ``--out``. Default sizes: 10 concepts x 4 strengths x 3 methods x 8 prompts x 32 tokens (+ 8
unsteered), batch 8.

    python benchmarks/steering_eval.py [--sae DIR] [--concepts weddings dogs ...]
        [--strengths 0.0625 0.125 0.25 0.5] [--prompts 8] [--max-tokens 32] [--positions {all,generated}]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_common import describe_machine, fmt, format_table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from server.calibration.data import alpaca_texts, default_data_dir, wikitext_valid_text  # noqa: E402
from server.calibration.vector import (  # noqa: E402
    VectorCalibrationConfig,
    difference_in_means,
    read_texts,
)
from server.engine.offline import OfflineGenerator  # noqa: E402
from server.engine.request import SamplingParams  # noqa: E402
from server.interventions.registry import InterventionRegistry  # noqa: E402
from server.interventions.sae import SparseAutoencoder  # noqa: E402
from server.interventions.vectors import SteeringVector  # noqa: E402
from server.model.edits import ResidualRecorder  # noqa: E402
from server.runtime import load_model  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

DEFAULT_SAE = PROJECT_ROOT / "server" / "default_profiles" / "smollm2-135m-instruct" / "sae-l15-resid-8k"
DEFAULT_CONCEPTS = PROJECT_ROOT / "benchmarks" / "concepts"
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "results"
METHODS = ("add", "clamp", "vector")
MAX_MODEL_LEN = 256  # a chat prompt (~40 tokens) and the generation fit with room to spare
MASSIVE = 10.0  # tokens whose residual norm is over 10x the median (attention sinks) are left out

# Open requests about nothing in particular: none names a concept, each leaves room to drift.
NEUTRAL_PROMPTS = (
    "Tell me about your favorite hobby.",
    "Write a short story about a man who finds an old key.",
    "What should I do this weekend?",
    "Describe your ideal morning.",
    "Give me three tips for staying productive.",
    "Write a short poem about friendship.",
    "Explain how to fix a squeaky door.",
    "What is the best way to learn a new language?",
    "Tell me something interesting.",
    "Write a letter to a friend you have not seen in years.",
    "How can I get better at remembering names?",
    "Describe a walk through a small town.",
)


@dataclass
class EvalConfig:
    sae: Path = DEFAULT_SAE
    concepts_dir: Path = DEFAULT_CONCEPTS
    concepts: tuple[str, ...] = ()  # () = every concept in concepts.json
    strengths: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5)  # x median residual norm at the SAE's layer
    methods: tuple[str, ...] = METHODS
    positions: str = "all"  # the steer entries' `positions`: "all" (prompt too) or "generated"
    prompts: int = 8
    max_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8
    corpus_tokens: int = 32768
    corpus_window: int = 128
    candidates: int = 8
    top_contexts: int = 20
    data_dir: Path = field(default_factory=default_data_dir)


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def concept_pattern(words: list[str]) -> re.Pattern:
    """A generation is on-topic when its text matches one of these (word starts, any case)."""
    return re.compile(r"\b(?:" + "|".join(words) + ")", re.IGNORECASE)


def load_concepts(config: EvalConfig) -> dict[str, dict[str, Any]]:
    words = json.loads((config.concepts_dir / "concepts.json").read_text())
    names = config.concepts or tuple(k for k in words if not k.startswith("_"))
    concepts = {}
    for name in names:
        pos, neg = config.concepts_dir / f"{name}.pos.txt", config.concepts_dir / f"{name}.neg.txt"
        concepts[name] = {"positive": read_texts(pos), "negative": read_texts(neg), "pattern": concept_pattern(words[name]),
                          "words": words[name], "files": [str(pos.relative_to(PROJECT_ROOT)),
                                                          str(neg.relative_to(PROJECT_ROOT))]}
    return concepts


# ---- the calibration corpus and each latent's top activations ----------------------------------

def corpus_windows(tokenizer, config: EvalConfig) -> list[list[int]]:
    """Alpaca texts (joined with EOS) and WikiText-2 validation text, half each, in windows."""
    rng = random.Random(config.seed)
    W, half = config.corpus_window, config.corpus_tokens // 2
    eos = tokenizer.eos_token_id
    texts = alpaca_texts(config.data_dir)
    rng.shuffle(texts)
    alpaca: list[int] = []
    for text in texts:
        alpaca.extend(tokenizer.encode(text) + [eos])
        if len(alpaca) >= half:
            break
    wiki = tokenizer.encode(wikitext_valid_text(config.data_dir))
    offsets = sorted(rng.sample(range(0, len(wiki) - W, W), half // W))
    return ([alpaca[i:i + W] for i in range(0, half - W + 1, W)] + [wiki[o:o + W] for o in offsets])


@torch.inference_mode()
def top_activations(model, sae: SparseAutoencoder, windows: list[list[int]], config: EvalConfig) -> dict:
    """Running top-k of every latent over the corpus (positions >= 1, massive-norm tokens out).
    -> values [k, d_sae], (window, position) of each, the median residual norm, firing rates."""
    k, F = config.top_contexts, sae.cfg.d_sae
    best_values = torch.full((k, F), -1.0)
    best_where = torch.zeros((k, F), dtype=torch.long)  # window * W + position
    fired = torch.zeros(F)
    norms = []
    W = config.corpus_window
    for start in tqdm(range(0, len(windows), config.batch_size), desc="corpus top activations", unit="batch"):
        batch = windows[start:start + config.batch_size]
        h = model.residual_stream(torch.tensor(batch), sae.layer)[:, 1:]  # [B, W-1, hidden]
        B = h.shape[0]
        n = h.norm(dim=-1)  # [B, W-1]
        norms.append(n.flatten())
        z = sae.encode(h.reshape(-1, h.shape[-1]))  # [B*(W-1), F]
        median = float(torch.cat(norms).median())
        z[(n.flatten() > MASSIVE * median)] = 0.0
        fired += (z > 0).sum(0)
        where = (torch.arange(B).view(B, 1) + start) * W + torch.arange(1, W).view(1, W - 1)  # [B, W-1]
        values = torch.cat([best_values, z])  # [k + B*(W-1), F]
        top, index = values.topk(k, dim=0)
        candidates = torch.cat([best_where, where.flatten().view(-1, 1).expand(-1, F)])
        best_values, best_where = top, candidates.gather(0, index)
    total = sum(len(w) - 1 for w in windows)
    return {"values": best_values, "where": best_where, "median_norm": float(torch.cat(norms).median()),
            "firing_rate": fired / total}


def _context(tokenizer, windows, where: int, W: int) -> tuple[str, str]:
    """-> (the activating token with two tokens either side, as text; the same, marked)."""
    window, pos = divmod(int(where), W)
    ids = windows[window]
    left, tok, right = ids[max(0, pos - 2):pos], ids[pos:pos + 1], ids[pos + 1:pos + 3]
    plain = tokenizer.decode(left + tok + right)
    marked = tokenizer.decode(left) + "[[" + tokenizer.decode(tok) + "]]" + tokenizer.decode(right)
    return plain, marked


@torch.inference_mode()
def contrast_scores(model, sae: SparseAutoencoder, positive: list[str], negative: list[str], tokenizer) -> torch.Tensor:
    """Mean latent activation on the concept's texts minus on the matched ones: [d_sae]."""
    def mean_latents(texts):
        per_text = []
        for text in texts:
            h = model.residual_stream(torch.tensor([tokenizer.encode(text)]), sae.layer)[0, 1:]  # [T-1, hidden]
            per_text.append(sae.encode(h).mean(0))
        return torch.stack(per_text).mean(0)
    return mean_latents(positive) - mean_latents(negative)


def select_feature(name: str, concept: dict, scores: torch.Tensor, tops: dict, windows, tokenizer,
                   config: EvalConfig) -> dict:
    candidates = []
    for f in scores.topk(config.candidates).indices.tolist():
        contexts = []
        hits = 0
        for value, where in zip(tops["values"][:, f].tolist(), tops["where"][:, f].tolist()):
            if value <= 0:
                break
            plain, marked = _context(tokenizer, windows, where, config.corpus_window)
            hit = bool(concept["pattern"].search(plain))
            hits += hit
            contexts.append({"activation": round(value, 2), "context": marked, "concept_word": hit})
        candidates.append({"feature": f, "contrast": round(float(scores[f]), 3),
                           "top_context_hit_share": round(hits / config.top_contexts, 3),
                           "firing_rate": round(float(tops["firing_rate"][f]), 5), "top_contexts": contexts})
    chosen = max(candidates, key=lambda c: (c["top_context_hit_share"], c["contrast"]))
    return {"feature": chosen["feature"], "top_context_hit_share": chosen["top_context_hit_share"],
            "contrast": chosen["contrast"], "candidates": candidates}


# ---- re-reading generations with the unsteered model --------------------------------------------

@torch.inference_mode()
def reread(model, sae: SparseAutoencoder, prompts: list[list[int]], generations: list[list[int]],
           features: list[int], batch_size: int) -> list[dict]:
    """Per generation: summed NLL and count of its generated tokens under the unsteered model, and the
    mean activation of each of `features` over the generated tokens."""
    out = []
    cache = model.new_cache(batch_size)  # reused: every row rewrites positions 0..T-1 before reading them
    for start in range(0, len(prompts), batch_size):
        rows = list(zip(prompts[start:start + batch_size], generations[start:start + batch_size]))
        seqs = [p + g for p, g in rows]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])  # right-padded: causal, so harmless
        B = ids.shape[0]
        recorder = ResidualRecorder(sae.layer)
        logits = model(ids, torch.arange(B), torch.zeros(B, dtype=torch.long), cache,
                       all_logits=True, edits=recorder)  # [B, T, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, (p, g) in enumerate(rows):
            if not g:
                out.append({"nll": 0.0, "tokens": 0, "activation": [0.0] * len(features)})
                continue
            span = torch.arange(len(p), len(p) + len(g))  # generated positions
            nll = -logprobs[b, span - 1, torch.tensor(g)].sum()
            z = sae.encode(recorder.recorded[b, span])[:, features]  # [len(g), n_features]
            out.append({"nll": float(nll), "tokens": len(g), "activation": z.mean(0).tolist()})
    return out


# ---- the run -------------------------------------------------------------------------------------

def run(config: EvalConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    loaded = load_model(ServerSettings(wina_profile="none", load_interventions=False, max_model_len=MAX_MODEL_LEN,
                                       log_level="warning"))
    model, tokenizer = loaded.model, loaded.tokenizer
    sae = SparseAutoencoder.load(config.sae)
    concepts = load_concepts(config)
    started = time.monotonic()

    windows = corpus_windows(tokenizer, config)
    tops = top_activations(model, sae, windows, config)
    median_norm = tops["median_norm"]
    decoder_norms = sae.W_dec.norm(dim=-1)

    registry = InterventionRegistry(model, loaded.fingerprint, loaded.name)
    registry.add_sae(sae)
    selections, vectors = {}, {}
    for name, concept in tqdm(concepts.items(), desc="features and vectors"):
        scores = contrast_scores(model, sae, concept["positive"], concept["negative"], tokenizer)
        selections[name] = select_feature(name, concept, scores, tops, windows, tokenizer, config)
        direction, counts, quality = difference_in_means(model, tokenizer, concept["positive"], concept["negative"],
                                                         VectorCalibrationConfig(layer=sae.layer))
        vec = SteeringVector(f"concept-{name}", (sae.layer,), direction.unsqueeze(0))
        registry.add_vector(vec)
        w = sae.W_dec[selections[name]["feature"]]
        vectors[name] = {"norm": quality["norm"], "relative_norm": quality["relative_norm"],
                         "cosine_with_feature_decoder": round(float(torch.nn.functional.cosine_similarity(
                             direction, w, dim=0)), 4), "separation": quality["in_sample_separation_accuracy"]}

    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                              add_generation_prompt=True), add_special_tokens=False)
               for p in NEUTRAL_PROMPTS[:config.prompts]]
    params = [SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
                             seed=config.seed + i) for i in range(len(prompts))]
    generator = OfflineGenerator(loaded, registry, max_batch_size=config.batch_size)
    features = [selections[name]["feature"] for name in concepts]

    def measure(entries: list[list[dict] | None], label: str) -> list[dict]:
        n = len(entries)
        gens = generator.generate(prompts * (n // len(prompts)), params * (n // len(prompts)), entries, progress=label)
        scores = reread(model, sae, prompts * (n // len(prompts)), [g.token_ids for g in gens], features,
                        config.batch_size)
        return [{"text": g.text, "tokens": len(g.token_ids), **s} for g, s in zip(gens, scores)]

    def summarise(rows: list[dict], name: str) -> dict:
        index = list(concepts).index(name)
        tokens = sum(r["tokens"] for r in rows)
        return {
            "word_rate": sum(bool(concepts[name]["pattern"].search(r["text"])) for r in rows) / len(rows),
            "feature_activation": sum(r["activation"][index] * r["tokens"] for r in rows) / max(tokens, 1),
            "perplexity": math.exp(sum(r["nll"] for r in rows) / max(tokens, 1)),
            "mean_tokens": tokens / len(rows),
        }

    baseline_rows = measure([None] * len(prompts), "unsteered")
    cells = []
    for name in concepts:
        f = selections[name]["feature"]
        entries, keys = [], []
        for method in config.methods:
            for r in config.strengths:
                added = r * median_norm
                if method == "add":
                    spec = {"type": "steer", "sae": sae.name, "feature": f, "strength": added / float(decoder_norms[f])}
                elif method == "clamp":
                    spec = {"type": "steer", "sae": sae.name, "feature": f, "clamp": added / float(decoder_norms[f])}
                else:
                    spec = {"type": "steer", "vector": f"concept-{name}", "strength": added / vectors[name]["norm"]}
                spec["positions"] = config.positions
                keys.append((method, r, spec))
                entries.extend([[spec]] * len(prompts))
        rows = measure(entries, f"{name}")
        for i, (method, r, spec) in enumerate(keys):
            chunk = rows[i * len(prompts):(i + 1) * len(prompts)]
            cells.append({"concept": name, "method": method, "strength_rel": r, "added_norm": r * median_norm,
                          "spec": spec, **summarise(chunk, name),
                          "generations": [{"text": c["text"], "tokens": c["tokens"]} for c in chunk]})
    baseline = {name: summarise(baseline_rows, name) for name in concepts}
    return {
        "model": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(model.dtype),
        "sae": {"path": str(config.sae), "name": sae.name, "layer": sae.layer, "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k, "architecture": sae.cfg.architecture,
                "decoder_norm_range": [round(float(decoder_norms.min()), 4), round(float(decoder_norms.max()), 4)]},
        "median_residual_norm": median_norm, "corpus": {"windows": len(windows), "window": config.corpus_window,
                                                         "tokens": sum(map(len, windows)),
                                                         "sources": "alpaca (AlpacaEval + seed tasks), "
                                                         "wikitext2/wiki.valid.tokens"},
        "prompts": list(NEUTRAL_PROMPTS[:config.prompts]),
        "concepts": {name: {"words": c["words"], "files": c["files"], "feature": selections[name],
                            "vector": vectors[name]} for name, c in concepts.items()},
        "baseline": {"per_concept": baseline, "generations": [{"text": r["text"], "tokens": r["tokens"]}
                                                              for r in baseline_rows]},
        "cells": cells,
        "seconds": round(time.monotonic() - started, 1),
    }


# ---- reporting -----------------------------------------------------------------------------------

def aggregate(report: dict, config: EvalConfig) -> dict:
    """Per method and strength, over concepts: mean word rate, mean feature activation, geometric
    mean perplexity; and per concept and method the best cell that keeps perplexity within 2x the
    unsteered one."""
    concepts = list(report["concepts"])
    base = report["baseline"]["per_concept"]
    base_ppl = next(iter(base.values()))["perplexity"]
    table = []
    for method in config.methods:
        for r in config.strengths:
            cells = [c for c in report["cells"] if c["method"] == method and c["strength_rel"] == r]
            table.append({"method": method, "strength_rel": r,
                          "word_rate": sum(c["word_rate"] for c in cells) / len(cells),
                          "feature_activation": sum(c["feature_activation"] for c in cells) / len(cells),
                          "perplexity": math.exp(sum(math.log(c["perplexity"]) for c in cells) / len(cells))})
    best = {}
    for name in concepts:
        for method in config.methods:
            cells = [c for c in report["cells"] if c["concept"] == name and c["method"] == method]
            fluent = [c for c in cells if c["perplexity"] <= 2 * base_ppl]
            pick = max(fluent, key=lambda c: (c["word_rate"], -c["perplexity"])) if fluent else None
            best[f"{name}/{method}"] = None if pick is None else {
                "strength_rel": pick["strength_rel"], "word_rate": pick["word_rate"],
                "perplexity": pick["perplexity"], "feature_activation": pick["feature_activation"]}
    return {"by_method_strength": table, "best_fluent": best, "baseline_perplexity": base_ppl,
            "baseline_word_rate": sum(b["word_rate"] for b in base.values()) / len(base),
            "baseline_feature_activation": sum(b["feature_activation"] for b in base.values()) / len(base)}


def render(report: dict, config: EvalConfig) -> str:
    agg = report["aggregate"]
    lines = [f"steering eval: {report['model']} ({report['dtype']}), SAE {report['sae']['name']} "
             f"(layer {report['sae']['layer']}, {report['sae']['architecture']} d_sae={report['sae']['d_sae']} "
             f"k={report['sae']['k']}), median residual norm {report['median_residual_norm']:.1f}",
             f"{len(report['concepts'])} concepts x {len(config.strengths)} strengths x {len(config.methods)} methods "
             f"x {config.prompts} prompts x {config.max_tokens} tokens; sampled T={config.temperature} "
             f"top_p={config.top_p} seed {config.seed}+prompt; batch {config.batch_size}; "
             f"steered positions: {config.positions}", ""]
    lines.append("Concept features (picked by top-activating corpus tokens; share of the top "
                 f"{config.top_contexts} contexts holding a concept word) and concept vectors:")
    rows = []
    for name, c in report["concepts"].items():
        sel = c["feature"]
        top = [t["context"] for t in next(x for x in sel["candidates"] if x["feature"] == sel["feature"])["top_contexts"][:3]]
        rows.append([name, str(sel["feature"]), fmt(sel["top_context_hit_share"], 2), fmt(sel["contrast"], 2),
                     fmt(c["vector"]["relative_norm"], 3), fmt(c["vector"]["cosine_with_feature_decoder"], 2),
                     " | ".join(t.replace("\n", " ") for t in top)[:90]])
    lines.append(format_table(["concept", "feature", "hit share", "contrast", "vec |v|/med", "cos(v,W_dec)",
                               "top contexts"], rows))
    lines += ["", f"Unsteered: word rate {agg['baseline_word_rate']:.3f} (mean over concepts), feature activation "
              f"{agg['baseline_feature_activation']:.2f}, perplexity {agg['baseline_perplexity']:.2f}", ""]
    lines.append("Mean over concepts (perplexity: geometric mean), strength r = added norm / median residual norm:")
    lines.append(format_table(["method", "r", "word rate", "feature act", "perplexity"],
                              [[t["method"], fmt(t["strength_rel"], 3), fmt(t["word_rate"], 3),
                                fmt(t["feature_activation"], 2), fmt(t["perplexity"], 2)]
                               for t in agg["by_method_strength"]]))
    lines += ["", "Per concept: word rate / perplexity at each strength"]
    headers = ["concept", "method"] + [f"r={r}" for r in config.strengths] + ["best fluent (ppl<=2x)"]
    rows = []
    for name in report["concepts"]:
        base = report["baseline"]["per_concept"][name]
        rows.append([name, "none", *[f"{base['word_rate']:.2f}/{base['perplexity']:.1f}"] * len(config.strengths), ""])
        for method in config.methods:
            cells = {c["strength_rel"]: c for c in report["cells"] if c["concept"] == name and c["method"] == method}
            best = agg["best_fluent"][f"{name}/{method}"]
            rows.append([name, method, *[f"{cells[r]['word_rate']:.2f}/{cells[r]['perplexity']:.1f}"
                                         for r in config.strengths],
                         "-" if best is None else f"{best['word_rate']:.2f} at r={best['strength_rel']}"])
    lines.append(format_table(headers, rows))
    return "\n".join(lines)


def plot(report: dict, config: EvalConfig, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = report["aggregate"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("word_rate", "share of generations with concept words", "baseline_word_rate", False),
              ("feature_activation", "concept feature activation (re-read unsteered)", "baseline_feature_activation", False),
              ("perplexity", "perplexity of the generation (unsteered model)", "baseline_perplexity", True)]
    for ax, (key, title, base_key, log) in zip(axes, panels):
        for method, marker in zip(config.methods, "osd"):
            rows = [t for t in agg["by_method_strength"] if t["method"] == method]
            ax.plot([t["strength_rel"] for t in rows], [t[key] for t in rows], marker=marker, label=method)
        ax.axhline(agg[base_key], color="grey", linestyle="--", label="unsteered")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("strength r (added norm / median residual norm)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Steering {report['model']} at layer {report['sae']['layer']}: SAE add vs clamp vs "
                 f"diff-in-means vector, mean over {len(report['concepts'])} concepts", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EvalConfig()
    parser.add_argument("--sae", type=Path, default=defaults.sae, help="SAE directory (SAELens layout).")
    parser.add_argument("--concepts", nargs="*", default=[], help="Concepts to run (default: all in concepts.json).")
    parser.add_argument("--concepts-dir", type=Path, default=defaults.concepts_dir)
    parser.add_argument("--strengths", type=float, nargs="+", default=list(defaults.strengths))
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods), choices=METHODS)
    parser.add_argument("--prompts", type=int, default=defaults.prompts, choices=range(1, len(NEUTRAL_PROMPTS) + 1),
                        metavar=f"1..{len(NEUTRAL_PROMPTS)}")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--positions", default=defaults.positions, choices=("all", "generated"),
                        help="Steer every position, prompt included (default), or only the generated tokens.")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--corpus-tokens", type=int, default=defaults.corpus_tokens)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="steering_eval", help="Output file stem.")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON",
                        help="Draw the PNG of an earlier run's JSON (beside it) and stop; nothing is rerun.")
    args = parser.parse_args(argv)
    if args.plot_only:
        report = json.loads(args.plot_only.read_text())
        plot(report, EvalConfig(methods=tuple(report["config"]["methods"])), args.plot_only.with_suffix(".png"))
        print(f"wrote {args.plot_only.with_suffix('.png')}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(sae=args.sae, concepts_dir=args.concepts_dir, concepts=tuple(args.concepts),
                        strengths=tuple(args.strengths), methods=tuple(args.methods), positions=args.positions,
                        prompts=args.prompts,
                        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        batch_size=args.batch_size, corpus_tokens=args.corpus_tokens, candidates=args.candidates,
                        **({"data_dir": args.data_dir} if args.data_dir else {}))
    started = _now_utc()
    report = run(config)
    report["aggregate"] = aggregate(report, config)
    report = {"command": shlex.join([sys.executable, *sys.argv]), "started_utc": started, "finished_utc": _now_utc(),
              "machine": describe_machine(), "config": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in asdict(config).items()}, **report}
    text = render(report, config)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.txt").write_text(text + "\n")
    plot(report, config, args.out / f"{args.name}.png")
    print(text)
    print(f"\nwrote {args.out / args.name}.{{json,txt,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
