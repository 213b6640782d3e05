"""`neuronserve calibrate eigenshift`: which components of the output matrix toxic generations use.

Procedure (EigenShift, "Redefining Experts", 2025, with the fixes issue 5 asks for):
1. SVD of the head, `W = U S V^T` (W [vocab, hidden] float32; for SmolLM2 the tied embedding).
2. Continue the *fit* part of the RealToxicityPrompts calibration prompts greedily (20 tokens) and
   label each continuation with a toxicity scorer (server/toxicity.py). Keep the final hidden
   state (the head's input) that emitted each generated token, and the residual stream at a middle
   layer (for the difference-in-means steering baseline).
3. Score every component i by its projection `v_i . h` (V's columns: `h @ V`, i.e. `V^T h`; the
   published reconstruct.py multiplies by V without the transpose, which mixes components):
   - "paper" (as published): signed `mean_toxic - mean_nontoxic`, toxic h at the position that
     emitted the continuation's most toxic word, non-toxic h at the first generated token;
   - "matched-signed": the same, non-toxic h taken at the positions toxic ones come from
     (every non-toxic position weighted so its position histogram matches the toxic one: the
     paper's contrast is mostly "mid-continuation vs first token");
   - "matched-abs": |delta| (singular vectors have arbitrary signs, a signed ranking picks an
     arbitrary half);
   - "matched-std": |delta| / pooled standard deviation (Cohen's d: components with a large
     spread no longer win on scale alone);
   - "matched-std-offensive": the same with more data, teacher-forced offensive vs neutral tweets
     (Davidson et al.), the hidden state that emits the most toxic word vs position-matched ones.
   Keep the top k. "gated" mode adds a one-sided range per kept component, the `gate_quantile` of
   non-toxic projections on the toxic side: the correction only acts beyond it.
4. Sweep (scoring, mode, k, alpha) on the *sweep* part of the prompts (never the held-out part):
   toxicity rate of sampled continuations, and perplexity on WikiText-2 validation text. The
   default is the least toxic setting whose perplexity rises by at most `max_ppl_increase`.
5. A difference-in-means steering vector at `steer_layer` (mean toxic residual minus the
   position-matched non-toxic mean, from the same fit emissions), subtracted; its strength chosen
   on the same sweep by the same rule. Written beside the profile as `vector-toxicity`: on our
   default model it is what halves toxicity, where the head's components do not (RESULTS.md).

Prompt split (fixed, no seed, so the benchmark reads the same one): line index % 5 == 0 is held
out for benchmarks/eigenshift_eval.py, == 1 is the sweep part, the rest is the fit part.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from server.calibration.data import (
    default_data_dir,
    rtp_calibration_lines,
    tweet_rows,
    wikitext_valid_text,
)
from server.interventions.eigenshift import EigenShiftProfile, save_eigenshift_profile
from server.interventions.vectors import SteeringVector, save_vector_profile
from server.model.llama import LlamaDecoder
from server.toxicity import ToxicityScorer, load_scorer, most_toxic_words

logger = logging.getLogger(__name__)

SPLIT_MODULUS = 5
PARTS = {"heldout": (0,), "sweep": (1,), "fit": (2, 3, 4)}
CLASSES = ("toxic", "nontoxic")
SCORINGS = ("paper", "matched-signed", "matched-abs", "matched-std", "matched-std-offensive")
PROFILE_NAME = "toxicity"


# ----------------------------------------------------------------------------------------- data

def rtp_prompts(data_dir: Path, part: str, limit: int | None = None) -> dict[str, list[tuple[int, str]]]:
    """-> {"toxic"|"nontoxic": [(line index, prompt text)]} of one part of the split."""
    keep = PARTS[part]
    found: dict[str, list[tuple[int, str]]] = {}
    for cls in CLASSES:
        items = [(i, item["prompt"]["text"]) for i, item in enumerate(rtp_calibration_lines(data_dir, cls))
                 if i % SPLIT_MODULUS in keep]
        found[cls] = items[:limit] if limit is not None else items
    return found


def describe_split(prompts: dict[str, list[tuple[int, str]]], part: str) -> dict:
    return {"source": "rtp/{toxic,nontoxic}.calib.jsonl (DecodingTrust RealToxicityPrompts subsets)",
            "part": part, "rule": f"line index % {SPLIT_MODULUS} in {list(PARTS[part])}",
            "counts": {cls: len(items) for cls, items in prompts.items()}}


_TWEET_NOISE = re.compile(r"(RT\s+)?@\w+:?|https?://\S+|&\w+;|#")


def offensive_texts(data_dir: Path, per_class: int, seed: int) -> dict[str, list[str]]:
    """Davidson et al. tweets: class 1 (offensive language) and 2 (neither), cleaned of retweet
    markers, mentions, links and HTML entities; a seeded sample of `per_class` each."""
    import random

    rows: dict[str, list[str]] = {"toxic": [], "nontoxic": []}
    for row in tweet_rows(data_dir):
        text = " ".join(_TWEET_NOISE.sub(" ", row["tweet"]).split())
        if len(text.split()) < 4:
            continue
        if row["class"] == "1":
            rows["toxic"].append(text)
        elif row["class"] == "2":
            rows["nontoxic"].append(text)
    rng = random.Random(seed)
    return {cls: rng.sample(texts, min(per_class, len(texts))) for cls, texts in rows.items()}


def wikitext_sequences(tokenizer, text: str, tokens: int, length: int) -> torch.Tensor:
    """The first `tokens` tokens of a WikiText split as [tokens // length, length] sequences."""
    ids = tokenizer(text[: tokens * 12]).input_ids  # ~4 characters a token: 12 leaves headroom
    if len(ids) < tokens:
        raise ValueError(f"only {len(ids)} tokens of WikiText, {tokens} asked for")
    n = tokens // length
    return torch.tensor(ids[: n * length]).view(n, length)


# ------------------------------------------------------------------------------ forward edits

@dataclass(frozen=True)
class RowEdit:
    """One intervention applied to every row of a generation or perplexity run."""

    label: str = "none"
    profile: EigenShiftProfile | None = None
    alpha: float = 1.0
    vector: SteeringVector | None = None
    strength: float = 0.0
    logit_bias: torch.Tensor | None = None  # [vocab] float32, added last (as SamplingParams.logit_bias)

    @property
    def changes_trunk(self) -> bool:
        """True when the hidden states differ from the unmodified model's (steering)."""
        return self.vector is not None and self.strength != 0.0


class _Edits:
    """ForwardEdits (server/model/edits.py) that applies a RowEdit to all rows and records the
    residual stream after `record_layer` and the final hidden state (the head's input)."""

    def __init__(self, edit: RowEdit, record_layer: int | None = None) -> None:
        self.edit = edit
        self.record_layer = record_layer
        self.residual_seen: torch.Tensor | None = None  # [B, (T,) hidden], before any steering
        self.hidden: torch.Tensor | None = None  # [B, (T,) hidden]
        self.raw_logits: torch.Tensor | None = None  # [B, (T,) vocab], before correction and bias

    def neurons(self, layer: int):
        return None

    def residual(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if layer == self.record_layer:
            self.residual_seen = h.float()
        e = self.edit
        if e.changes_trunk and layer in e.vector.layers:
            direction = e.vector.directions[e.vector.layers.index(layer)]  # [hidden]
            h = h + e.strength * direction.to(h.dtype)
        return h

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.hidden, self.raw_logits = hidden.float(), logits
        return apply_logit_edit(self.edit, self.hidden, logits)


def apply_logit_edit(edit: RowEdit, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """hidden [B, (T,) hidden], logits [B, (T,) vocab] -> corrected logits."""
    if edit.profile is not None and edit.alpha != 1.0:
        alpha = torch.full((hidden.shape[0],), edit.alpha, device=hidden.device)
        logits = logits - edit.profile.correction(hidden, alpha)
    if edit.logit_bias is not None:
        logits = logits + edit.logit_bias
    return logits


# --------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    samples: int = 1  # continuations per prompt
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    batch_rows: int = 32  # rows decoded together


@dataclass
class Generation:
    prompt: int  # index into the prompts given
    token_ids: list[int]
    text: str
    raw_logprobs: list[float]  # each generated token's log-prob under the logits before the edit
    hidden: torch.Tensor | None = None  # [n, hidden]: the final hidden state that emitted token j
    residual: torch.Tensor | None = None  # [n, hidden]: residual after record_layer at that position


def _sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [R, vocab] -> token ids [R] (greedy, or temperature + nucleus sampling)."""
    if config.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p  # keeps the token that crosses top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalises
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: LlamaDecoder, tokenizer, prompts: list[list[int]], config: GenerationConfig,
             edit: RowEdit = RowEdit(), record: bool = False, record_layer: int | None = None,
             desc: str = "generate", progress: bool = True) -> list[Generation]:
    """Continue every prompt `config.samples` times. Prompts of similar length are batched; each
    batch prefills its prompts once (right-padded: a padded key is overwritten by the time a
    query could see it), copies their KV slots to the samples' rows, and decodes them together.
    Deterministic for config.seed. Returns prompt-major, sample-minor."""
    stop_ids = set(tokenizer.all_special_ids)
    per_batch = max(1, config.batch_rows // config.samples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[Generation]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts) * config.samples, desc=desc, disable=not progress, leave=False)
    for batch_index, start in enumerate(range(0, len(order), per_batch)):
        chosen = order[start:start + per_batch]
        P, n = len(chosen), config.samples
        lengths = torch.tensor([len(prompts[i]) for i in chosen])
        T = int(lengths.max())
        if T + config.max_new_tokens > model.max_model_len:
            raise ValueError(f"prompt of {T} tokens + {config.max_new_tokens} new is past max_model_len "
                             f"{model.max_model_len}")
        tokens = torch.zeros(P, T, dtype=torch.long)
        for row, i in enumerate(chosen):
            tokens[row, : len(prompts[i])] = torch.tensor(prompts[i])
        cache = model.new_cache(P * n)
        edits = _Edits(edit, record_layer)
        logits = model(tokens.to(model.device), (torch.arange(P) * n).to(model.device),
                       torch.zeros(P, dtype=torch.long, device=model.device), cache, all_logits=True,
                       edits=edits)  # [P, T, vocab]
        last = lengths - 1
        pick = (torch.arange(P), last)
        rows = torch.arange(P).repeat_interleave(n)  # [R]: each row's prompt in the batch
        for layer_cache in (cache.keys, cache.values):  # every sample starts from its prompt's cache
            layer_cache.copy_(layer_cache[:, (rows * n).to(layer_cache.device)])
        step_logits = logits[pick][rows]  # [R, vocab]
        raw = edits.raw_logits[pick][rows]
        hidden_steps = [edits.hidden[pick][rows].cpu()] if record else []
        resid_steps = ([edits.residual_seen[pick][rows].cpu()] if record and record_layer is not None else [])
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + batch_index)
        R = P * n
        out_tokens = torch.zeros(R, config.max_new_tokens, dtype=torch.long)
        out_logprobs = torch.zeros(R, config.max_new_tokens)
        positions = lengths[rows].clone()  # [R]
        for step in range(config.max_new_tokens):
            chosen_tokens = _sample(step_logits.float().cpu(), config, generator)  # [R]
            out_tokens[:, step] = chosen_tokens
            out_logprobs[:, step] = torch.log_softmax(raw.float().cpu(), -1).gather(
                -1, chosen_tokens.unsqueeze(-1)).squeeze(-1)
            if step + 1 == config.max_new_tokens:
                break
            edits = _Edits(edit, record_layer)
            step_logits = model(chosen_tokens.view(R, 1).to(model.device), torch.arange(R, device=model.device),
                                positions.to(model.device), cache, edits=edits)  # [R, vocab]
            raw = edits.raw_logits
            positions += 1
            if record:
                hidden_steps.append(edits.hidden.cpu())
                if record_layer is not None:
                    resid_steps.append(edits.residual_seen[:, -1].cpu())
        hidden_all = torch.stack(hidden_steps, 1) if record else None  # [R, steps, hidden]
        resid_all = torch.stack(resid_steps, 1) if resid_steps else None
        for r in range(R):
            ids = out_tokens[r].tolist()
            stop = next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))
            ids = ids[:stop]
            results[chosen[r // n]].append(Generation(
                chosen[r // n], ids, tokenizer.decode(ids, skip_special_tokens=True),
                out_logprobs[r, :stop].tolist(),
                hidden_all[r, :stop].clone() if hidden_all is not None else None,
                resid_all[r, :stop].clone() if resid_all is not None else None))
        bar.update(R)
    bar.close()
    return [g for per_prompt in results for g in per_prompt]


def token_of_char(tokenizer, token_ids: list[int], char: int) -> int:
    """Index of the generated token whose decoded text first reaches past character `char` of the
    decoded continuation (the token that emitted the character)."""
    for j in range(len(token_ids)):
        if len(tokenizer.decode(token_ids[: j + 1], skip_special_tokens=True)) > char:
            return j
    return len(token_ids) - 1


# ----------------------------------------------------------------------------- measurements

@dataclass
class ToxicityResult:
    rate: float  # share of continuations the scorer flags
    expected_max: float  # mean over prompts of the highest score among its samples
    fluency_ppl: float | None  # perplexity of the continuations under the unmodified model
    continuations: int
    prompts: int
    flagged_per_prompt: list[int] = field(default_factory=list)  # flagged samples of each prompt, in order

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def toxicity_of(generations: list[Generation], scorer: ToxicityScorer, samples: int) -> ToxicityResult:
    scores = scorer.score([g.text for g in generations])
    flagged = [s >= scorer.threshold for s in scores]
    per_prompt = [max(scores[i:i + samples]) for i in range(0, len(scores), samples)]
    logprobs = [lp for g in generations for lp in g.raw_logprobs]
    fluency = math.exp(-sum(logprobs) / len(logprobs)) if logprobs else None
    return ToxicityResult(sum(flagged) / len(flagged), sum(per_prompt) / len(per_prompt), fluency,
                          len(generations), len(per_prompt),
                          [sum(flagged[i:i + samples]) for i in range(0, len(flagged), samples)])


@torch.inference_mode()
def final_hidden(model: LlamaDecoder, sequences: torch.Tensor, edit: RowEdit = RowEdit(), batch: int = 4,
                 desc: str = "hidden states", progress: bool = True) -> torch.Tensor:
    """sequences [N, L] -> final hidden states [N, L, hidden] (float32) under `edit`'s trunk."""
    out = []
    N = sequences.shape[0]
    for start in tqdm(range(0, N, batch), desc=desc, disable=not progress, leave=False):
        chunk = sequences[start:start + batch].to(model.device)
        edits = _Edits(RowEdit(vector=edit.vector, strength=edit.strength))
        model(chunk, torch.arange(chunk.shape[0], device=model.device),
              torch.zeros(chunk.shape[0], dtype=torch.long, device=model.device),
              model.new_cache(chunk.shape[0]), all_logits=True, edits=edits)
        out.append(edits.hidden.cpu())
    return torch.cat(out)


@torch.inference_mode()
def _head_logits(model: LlamaDecoder, hidden: torch.Tensor, sequences: torch.Tensor, edit: RowEdit, chunk: int):
    """Yield (logits [m, vocab] float32, targets [m]) for tokens 1..L-1 of hidden [N, L, hidden]
    (final hidden states) and sequences [N, L], `chunk` positions at a time, under the head with
    `edit`'s logit correction and bias (the trunk is whatever made `hidden`)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [M, hidden]
    targets = sequences[:, 1:].reshape(-1)
    for start in range(0, h.shape[0], chunk):
        rows = h[start:start + chunk].to(model.device)
        logits = model.head.forward(rows.to(model.head.weight.dtype)).float()  # [m, vocab]
        yield apply_logit_edit(edit, rows, logits), targets[start:start + chunk].to(model.device)


def perplexity_from_hidden(model: LlamaDecoder, hidden: torch.Tensor, sequences: torch.Tensor,
                           edit: RowEdit = RowEdit(), chunk: int = 512) -> float:
    """hidden [N, L, hidden] (final hidden states), sequences [N, L] -> perplexity of tokens 1..L-1
    under the head with `edit`'s logit correction and bias (the trunk is whatever made `hidden`)."""
    total = sum(float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
                for logits, targets in _head_logits(model, hidden, sequences, edit, chunk))
    return math.exp(total / (sequences.shape[0] * (sequences.shape[1] - 1)))


def token_nll_from_hidden(model: LlamaDecoder, hidden: torch.Tensor, sequences: torch.Tensor,
                          edit: RowEdit = RowEdit(), chunk: int = 512) -> torch.Tensor:
    """The same tokens' NLL one by one: -> [N, L - 1] float32 (on the CPU)."""
    return torch.cat([torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu()
                      for logits, targets in _head_logits(model, hidden, sequences, edit, chunk)]
                     ).view(sequences.shape[0], -1)


# ------------------------------------------------------------------------------ decomposition

@dataclass
class HeadSVD:
    U: torch.Tensor  # [vocab, hidden]
    S: torch.Tensor  # [hidden], descending
    V: torch.Tensor  # [hidden, hidden], columns are right singular vectors

    @classmethod
    def of(cls, model: LlamaDecoder) -> HeadSVD:
        W = model.head.weight.detach().float().cpu()  # [vocab, hidden]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return cls(U, S, Vh.T.contiguous())


@dataclass
class ContrastSet:
    """Hidden states of toxic and non-toxic emissions, with the weights that position-match them."""

    toxic: torch.Tensor  # [n_t, hidden]
    nontoxic: torch.Tensor  # [n_n, hidden]
    nontoxic_weight: torch.Tensor  # [n_n], sums to 1

    def stats(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-component projection means and spreads. V: [hidden, K]."""
        pt, pn = self.toxic @ V, self.nontoxic @ V  # [n_t, K], [n_n, K]
        w = self.nontoxic_weight.unsqueeze(1)
        mean_t, mean_n = pt.mean(0), (w * pn).sum(0)
        var_t = pt.var(0, unbiased=True) if pt.shape[0] > 1 else torch.zeros_like(mean_t)
        var_n = (w * (pn - mean_n) ** 2).sum(0)
        return {"delta": mean_t - mean_n, "pooled_std": ((var_t + var_n) / 2).sqrt().clamp_min(1e-8),
                "mean_toxic": mean_t, "mean_nontoxic": mean_n}


def position_matched(toxic: list[tuple[torch.Tensor, tuple]], nontoxic: list[tuple[torch.Tensor, tuple]]) -> ContrastSet:
    """Each item: (hidden [hidden], cell key such as (source, position)). Non-toxic items in a cell
    get the weight that gives the cell the toxic share of it; cells without toxic items get 0."""
    from collections import Counter

    t_count = Counter(key for _, key in toxic)
    n_count = Counter(key for _, key in nontoxic)
    kept = [(h, key) for h, key in nontoxic if t_count[key] > 0]
    if not kept:
        raise ValueError("no non-toxic hidden state shares a position with a toxic one")
    weight = torch.tensor([t_count[key] / n_count[key] for _, key in kept], dtype=torch.float64)
    return ContrastSet(torch.stack([h for h, _ in toxic]), torch.stack([h for h, _ in kept]),
                       (weight / weight.sum()).float())


def component_scores(stats: dict[str, torch.Tensor], scoring: str) -> torch.Tensor:
    """Higher = more toxic-specific. "paper" and "matched-signed" keep the sign of delta, so they
    depend on the arbitrary sign of each singular vector; the others do not."""
    if scoring in ("paper", "matched-signed"):
        return stats["delta"]
    if scoring == "matched-abs":
        return stats["delta"].abs()
    if scoring.startswith("matched-std"):
        return stats["delta"].abs() / stats["pooled_std"]
    raise ValueError(f"unknown scoring {scoring!r}; known: {SCORINGS}")


def make_profile(svd: HeadSVD, ranked: torch.Tensor, k: int, alpha: float, name: str, mode: str = "scale",
                 contrast: ContrastSet | None = None, delta: torch.Tensor | None = None,
                 gate_quantile: float = 0.9) -> EigenShiftProfile:
    """The top-k of `ranked` (component indices, best first). Gated mode: a one-sided range, open
    on the non-toxic side, ending at the `gate_quantile` of (position-matched) non-toxic projections
    on the toxic side (the side delta points to)."""
    idx = ranked[:k]
    lower = upper = None
    if mode == "gated":
        if contrast is None or delta is None:
            raise ValueError("gated mode needs the contrast set and delta")
        proj = contrast.nontoxic @ svd.V[:, idx]  # [n_n, k]
        hi = _weighted_quantile(proj, contrast.nontoxic_weight, gate_quantile)
        lo = _weighted_quantile(proj, contrast.nontoxic_weight, 1.0 - gate_quantile)
        toxic_high = delta[idx] > 0
        inf = torch.full_like(hi, float("inf"))
        upper = torch.where(toxic_high, hi, inf)
        lower = torch.where(toxic_high, -inf, lo)
    return EigenShiftProfile(name, svd.U[:, idx].contiguous(), svd.S[idx].contiguous(), svd.V[:, idx].contiguous(),
                             alpha, mode, lower, upper)


def _weighted_quantile(values: torch.Tensor, weight: torch.Tensor, q: float) -> torch.Tensor:
    """values [n, K], weight [n] (sums to 1) -> [K]."""
    order = values.argsort(0)
    sorted_values = values.gather(0, order)
    cum = weight[order].cumsum(0)  # [n, K]
    index = (cum < q).sum(0).clamp(max=values.shape[0] - 1)
    return sorted_values.gather(0, index.unsqueeze(0)).squeeze(0)


def truncate(profile: EigenShiftProfile, k: int, alpha: float | None = None) -> EigenShiftProfile:
    """The first k components of a profile (profiles keep them best first)."""
    cut = (lambda t: None if t is None else t[:k].contiguous())
    return EigenShiftProfile(profile.name, profile.U[:, :k].contiguous(), profile.S[:k].contiguous(),
                             profile.V[:, :k].contiguous(), profile.default_alpha if alpha is None else alpha,
                             profile.mode, cut(profile.lower), cut(profile.upper), profile.source, profile.metadata)


def top_tokens(tokenizer, svd: HeadSVD, component: int, sign: float, n: int = 8) -> list[str]:
    """The tokens a component pushes up most on its toxic side (sign of delta)."""
    ids = (sign * svd.U[:, component]).topk(n).indices.tolist()
    return [tokenizer.decode([i]) for i in ids]


# ------------------------------------------------------------------------------- calibration

def choose_steering_strength(model: LlamaDecoder, tokenizer, scorer: ToxicityScorer, vector: SteeringVector,
                             base: RowEdit, prompts: list[list[int]], config: GenerationConfig,
                             sequences: torch.Tensor, strengths: tuple[float, ...] | list[float],
                             max_ppl_increase: float) -> dict:
    """The strength for subtracting `vector` on top of `base` (plain, or other edits it stacks
    with): each candidate's toxicity rate on `prompts` (sampled as `config`) and perplexity on
    `sequences` [n, length]; the least toxic candidate whose perplexity is up by at most
    `max_ppl_increase` over the plain model's, else the cheapest. Strength 0 (`base` alone) is
    measured too, for reference. Returns the trials, the chosen one and the rule, as JSON."""
    plain_ppl = perplexity_from_hidden(model, final_hidden(model, sequences), sequences)
    trials = []
    for s in (0.0, *strengths):
        edit = replace(base, label=f"{base.label} + steer -{s}", vector=vector, strength=-s)
        gens = generate(model, tokenizer, prompts, config, edit, desc=f"{base.label}: steering strength -{s}")
        rate = toxicity_of(gens, scorer, config.samples).rate
        ppl = perplexity_from_hidden(model, final_hidden(model, sequences, edit), sequences, edit)
        trials.append({"strength": -s, "toxicity_rate": round(rate, 4), "ppl": round(ppl, 3),
                       "ppl_change": round(ppl / plain_ppl - 1, 4)})
        logger.info("steering trial (%s) %s", base.label, trials[-1])
    allowed = [t for t in trials[1:] if t["ppl_change"] <= max_ppl_increase]
    chosen = (min(allowed, key=lambda t: (t["toxicity_rate"], t["ppl"])) if allowed
              else min(trials[1:], key=lambda t: t["ppl_change"]))
    rule = (f"least toxic strength on {len(prompts)} toxic prompts x {config.samples} samples with perplexity "
            f"({sequences.numel()} WikiText-2 validation tokens, {sequences.shape[1]}-token windows) up by at most "
            f"{max_ppl_increase:.0%} over the plain model's; none within: the cheapest")
    return {"with": base.label, "plain_ppl": round(plain_ppl, 3), "trials": trials, "chosen": chosen, "rule": rule}


@dataclass
class EigenShiftCalibrationConfig:
    max_new_tokens: int = 20
    fit_prompts: int | None = None  # per class, from the fit part (None: all of it)
    offensive_per_class: int = 400  # tweets per class for "matched-std-offensive" (0: skip it)
    # toxic prompts of the sweep part that choose k and alpha (None: all 120), and samples of each:
    # with 80 continuations a setting's rate carries +-4 points and the choice flipped with the
    # thread count; 480 bring it to about +-1.6
    sweep_prompts: int | None = None
    sweep_samples: int = 4
    top_p: float = 0.95
    ks: tuple[int, ...] = (5, 20, 50)
    alphas: tuple[float, ...] = (0.0, 0.5)
    gate_quantiles: tuple[float, ...] = (0.9,)
    ppl_tokens: int = 8192  # WikiText-2 validation tokens for the perplexity proxy
    ppl_length: int = 256
    max_ppl_increase: float = 0.10
    steer_layer: int = 15  # residual layer of the difference-in-means steering vector
    # candidate strengths, in units of the difference in means (1 moves the mean toxic state onto
    # the non-toxic mean); the vector is subtracted
    steer_strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    scorer: str = "alt-profanity-check"
    batch_rows: int = 32
    seed: int = 0
    data_dir: Path = field(default_factory=default_data_dir)


@dataclass
class CalibrationResult:
    profiles: dict[str, EigenShiftProfile]  # scoring -> its top max(ks) components, best first
    default: EigenShiftProfile
    vector: SteeringVector
    report: dict  # everything measured, for the profile header and the log


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in texts]


def _collect_rtp(model, tokenizer, scorer, config) -> tuple[dict, dict]:
    """Greedy continuations of the fit prompts -> labelled emissions and a summary."""
    prompts = rtp_prompts(config.data_dir, "fit", config.fit_prompts)
    texts = prompts["toxic"] + prompts["nontoxic"]
    gens = generate(model, tokenizer, _encode(tokenizer, [t for _, t in texts]),
                    GenerationConfig(config.max_new_tokens, 1, 0.0, 1.0, config.seed, config.batch_rows),
                    record=True, record_layer=config.steer_layer, desc="fit: greedy continuations")
    scores = scorer.score([g.text for g in gens])
    toxic_idx = [i for i, s in enumerate(scores) if s >= scorer.threshold and gens[i].token_ids]
    words = most_toxic_words(scorer, [gens[i].text for i in toxic_idx])
    emissions = {"toxic": [], "nontoxic": [], "toxic_resid": [], "nontoxic_resid": [], "first": []}
    for i, word in zip(toxic_idx, words):
        j = token_of_char(tokenizer, gens[i].token_ids, word.start)
        emissions["toxic"].append((gens[i].hidden[j], ("rtp", j)))
        emissions["toxic_resid"].append((gens[i].residual[j], ("rtp", j)))
    for i, g in enumerate(gens):
        if scores[i] < scorer.threshold and g.token_ids:
            emissions["first"].append((g.hidden[0], ("rtp", 0)))
            for j in range(len(g.token_ids)):
                emissions["nontoxic"].append((g.hidden[j], ("rtp", j)))
                emissions["nontoxic_resid"].append((g.residual[j], ("rtp", j)))
    n_tox_prompts = len(prompts["toxic"])
    summary = {**describe_split(prompts, "fit"), "continuations": len(gens),
               "toxic_continuations": len(toxic_idx),
               "toxic_from_toxic_prompts": sum(1 for i in toxic_idx if i < n_tox_prompts),
               "toxic_word_position_mean": (sum(k[1] for _, k in emissions["toxic"]) / max(1, len(toxic_idx))),
               "examples": [gens[i].text for i in toxic_idx[:5]]}
    return emissions, summary


@torch.inference_mode()
def _collect_offensive(model, tokenizer, scorer, config) -> tuple[dict, dict]:
    """Teacher-forced tweets: the hidden state that emits an offensive tweet's most toxic word,
    and every position of neutral tweets (position-matched later)."""
    texts = offensive_texts(config.data_dir, config.offensive_per_class, config.seed)
    emissions = {"toxic": [], "nontoxic": []}
    words = most_toxic_words(scorer, texts["toxic"])
    neutral_scores = scorer.score(texts["nontoxic"])
    items = [(t, w) for t, w in zip(texts["toxic"], words) if w is not None and w.score >= scorer.threshold]
    items += [(t, None) for t, s in zip(texts["nontoxic"], neutral_scores) if s < scorer.threshold]
    batch = 16
    for start in tqdm(range(0, len(items), batch), desc="fit: offensive tweets", leave=False):
        chunk = items[start:start + batch]
        encoded = [tokenizer(t, return_offsets_mapping=True) for t, _ in chunk]
        ids = [e.input_ids[:96] for e in encoded]
        L = max(map(len, ids))
        tokens = torch.zeros(len(ids), L, dtype=torch.long)
        for r, row in enumerate(ids):
            tokens[r, : len(row)] = torch.tensor(row)
        edits = _Edits(RowEdit())
        model(tokens.to(model.device), torch.arange(len(ids), device=model.device),
              torch.zeros(len(ids), dtype=torch.long, device=model.device), model.new_cache(len(ids)),
              all_logits=True, edits=edits)
        hidden = edits.hidden.cpu()  # [b, L, hidden]; hidden[:, t] emits token t + 1
        for r, ((_, word), enc) in enumerate(zip(chunk, encoded)):
            n = len(ids[r])
            if word is None:
                emissions["nontoxic"].extend((hidden[r, t], ("offensive", t)) for t in range(n - 1))
                continue
            token = next((t for t, (s, e) in enumerate(enc.offset_mapping[:n]) if e > word.start), None)
            if token is not None and token >= 1:
                emissions["toxic"].append((hidden[r, token - 1], ("offensive", token - 1)))
    summary = {"source": "offensive/labeled_data.csv (Davidson et al. tweets; class 1 vs class 2)",
               "tweets_per_class": config.offensive_per_class,
               "toxic_emissions": len(emissions["toxic"]), "nontoxic_tweets_kept": sum(1 for _, w in items if w is None)}
    return emissions, summary


@dataclass
class EigenShiftFit:
    """The fit half of the calibration: what the sweep and the profiles are made from."""

    svd: HeadSVD
    rtp: dict  # the fit prompts' labelled emissions (hidden states and residuals, see _collect_rtp)
    contrasts: dict[str, ContrastSet]  # paper, matched, and with offensive tweets matched-offensive
    data: dict  # what the fit read: summaries, scorer


def fit_contrasts(model: LlamaDecoder, tokenizer, config: EigenShiftCalibrationConfig,
                  scorer: ToxicityScorer) -> EigenShiftFit:
    """SVD of the head, the fit prompts' greedy continuations and (offensive_per_class > 0) the
    teacher-forced tweets, labelled by `scorer`, as the contrast sets each scoring ranks from."""
    svd = HeadSVD.of(model)
    rtp, rtp_summary = _collect_rtp(model, tokenizer, scorer, config)
    if len(rtp["toxic"]) < 2:
        raise RuntimeError(f"only {len(rtp['toxic'])} toxic continuations in the fit part: use more prompts")
    contrasts = {
        "paper": ContrastSet(torch.stack([h for h, _ in rtp["toxic"]]), torch.stack([h for h, _ in rtp["first"]]),
                             torch.full((len(rtp["first"]),), 1.0 / len(rtp["first"]))),
        "matched": position_matched(rtp["toxic"], rtp["nontoxic"]),
    }
    data = {"rtp_fit": rtp_summary, "scorer": scorer.name, "scorer_threshold": scorer.threshold}
    if config.offensive_per_class > 0:
        off, off_summary = _collect_offensive(model, tokenizer, scorer, config)
        contrasts["matched-offensive"] = position_matched(rtp["toxic"] + off["toxic"], rtp["nontoxic"] + off["nontoxic"])
        data["offensive_fit"] = off_summary
    return EigenShiftFit(svd, rtp, contrasts, data)


def calibrate_eigenshift(model: LlamaDecoder, tokenizer, config: EigenShiftCalibrationConfig) -> CalibrationResult:
    torch.manual_seed(config.seed)
    scorer = load_scorer(config.scorer)
    started = time.monotonic()
    fit = fit_contrasts(model, tokenizer, config, scorer)
    svd, rtp, contrasts, data = fit.svd, fit.rtp, fit.contrasts, fit.data
    kmax = max(config.ks)
    profiles: dict[str, EigenShiftProfile] = {}
    steps: dict[str, dict] = {}
    ranked_by: dict[str, torch.Tensor] = {}
    stats_by: dict[str, dict] = {}
    for scoring in SCORINGS:
        contrast_name = ("paper" if scoring == "paper" else
                         "matched-offensive" if scoring.endswith("offensive") else "matched")
        if contrast_name not in contrasts:
            continue
        stats = contrasts[contrast_name].stats(svd.V)
        ranked = component_scores(stats, scoring).argsort(descending=True)
        ranked_by[scoring], stats_by[scoring] = ranked, stats
        profiles[scoring] = make_profile(svd, ranked, kmax, 0.0, f"{PROFILE_NAME}-{scoring}")
        top = ranked[:kmax]
        steps[scoring] = {
            "top_components": top[:20].tolist(),
            "mean_singular_rank_top5": float(top[:5].float().mean()),  # 0 = largest singular value
            "overlap_top5_with_paper": len(set(top[:5].tolist()) & set(ranked_by["paper"][:5].tolist())),
            "overlap_top20_with_paper": len(set(top[:20].tolist()) & set(ranked_by["paper"][:20].tolist())),
            "top_tokens": {int(c): top_tokens(tokenizer, svd, int(c), float(torch.sign(stats["delta"][c])))
                           for c in top[:5]},
        }
    # sign invariance check of the published ranking: top-5 by signed delta vs by |delta|
    paper_abs = stats_by["paper"]["delta"].abs().argsort(descending=True)
    steps["paper"]["overlap_top5_signed_vs_abs"] = len(set(ranked_by["paper"][:5].tolist()) & set(paper_abs[:5].tolist()))

    # ----- sweep on the sweep part (toxic prompts, sampled) and WikiText-2 validation perplexity
    sweep_prompts = rtp_prompts(config.data_dir, "sweep", config.sweep_prompts)["toxic"]
    sweep_ids = _encode(tokenizer, [t for _, t in sweep_prompts])
    gen_config = GenerationConfig(config.max_new_tokens, config.sweep_samples, 1.0, config.top_p, config.seed + 1,
                                  config.batch_rows)
    wiki = wikitext_sequences(tokenizer, wikitext_valid_text(config.data_dir), config.ppl_tokens, config.ppl_length)
    wiki_hidden = final_hidden(model, wiki, desc="sweep: WikiText-2 validation")
    best_std = "matched-std-offensive" if "matched-std-offensive" in profiles else "matched-std"
    settings: list[tuple[str, str, int, float, float | None]] = [("none", "scale", 0, 1.0, None)]
    for scoring in profiles:
        for k in config.ks:
            settings.append((scoring, "scale", k, 0.0, None))
    # the last step's scoring (the most data, position-matched, standardised) with the other alphas
    # and the gated mode
    for k in config.ks:
        for alpha in config.alphas:
            if alpha != 0.0:
                settings.append((best_std, "scale", k, alpha, None))
    for k in config.ks:
        for q in config.gate_quantiles:
            settings.append((best_std, "gated", k, 0.0, q))
    settings = list(dict.fromkeys(settings))
    sweep_rows = []
    for scoring, mode, k, alpha, q in tqdm(settings, desc="sweep: (scoring, mode, k, alpha)"):
        if scoring == "none":
            edit = RowEdit()
        elif mode == "gated":
            contrast_name = "matched-offensive" if scoring.endswith("offensive") else "matched"
            profile = make_profile(svd, ranked_by[scoring], k, alpha, f"{PROFILE_NAME}-{scoring}-gated", "gated",
                                   contrasts[contrast_name], stats_by[scoring]["delta"], q)
            edit = RowEdit(f"{scoring} gated", profile, alpha)
        else:
            edit = RowEdit(scoring, truncate(profiles[scoring], k), alpha)
        gens = generate(model, tokenizer, sweep_ids, gen_config, edit, desc=f"sweep {scoring} {mode} k={k} a={alpha}")
        tox = toxicity_of(gens, scorer, config.sweep_samples)
        ppl = perplexity_from_hidden(model, wiki_hidden, wiki, edit)
        row = {"scoring": scoring, "mode": mode, "k": k, "alpha": alpha, "gate_quantile": q,
               "toxicity_rate": round(tox.rate, 4), "expected_max_toxicity": round(tox.expected_max, 4),
               "fluency_ppl": round(tox.fluency_ppl, 2), "wikitext_valid_ppl": round(ppl, 3)}
        sweep_rows.append(row)
        logger.info("sweep %s", row)
    base = sweep_rows[0]
    for row in sweep_rows:
        row["ppl_change"] = round(row["wikitext_valid_ppl"] / base["wikitext_valid_ppl"] - 1.0, 4)
        row["toxicity_reduction"] = (round(1.0 - row["toxicity_rate"] / base["toxicity_rate"], 4)
                                     if base["toxicity_rate"] > 0 else 0.0)
    allowed = [r for r in sweep_rows[1:] if r["ppl_change"] <= config.max_ppl_increase]
    if allowed:
        chosen = min(allowed, key=lambda r: (r["toxicity_rate"], r["wikitext_valid_ppl"]))
        rule = f"least toxic sweep setting with WikiText-2 validation perplexity up by at most {config.max_ppl_increase:.0%}"
    else:
        chosen = min(sweep_rows[1:], key=lambda r: r["ppl_change"])
        rule = "no setting kept perplexity within the limit: the one that raised it least"
    # the gated variant of the last scoring, its best swept quantile, kept for the benchmark
    gated_rows = [r for r in sweep_rows if r["mode"] == "gated"]
    if gated_rows:
        best_gated = min(gated_rows, key=lambda r: (r["toxicity_rate"], r["wikitext_valid_ppl"]))
        contrast_name = "matched-offensive" if best_std.endswith("offensive") else "matched"
        profiles[f"{best_std}-gated"] = make_profile(
            svd, ranked_by[best_std], kmax, 0.0, f"{PROFILE_NAME}-{best_std}-gated", "gated", contrasts[contrast_name],
            stats_by[best_std]["delta"], best_gated["gate_quantile"])
    if chosen["mode"] == "gated":
        contrast_name = "matched-offensive" if chosen["scoring"].endswith("offensive") else "matched"
        default = make_profile(svd, ranked_by[chosen["scoring"]], chosen["k"], chosen["alpha"], PROFILE_NAME, "gated",
                               contrasts[contrast_name], stats_by[chosen["scoring"]]["delta"], chosen["gate_quantile"])
    else:
        default = make_profile(svd, ranked_by[chosen["scoring"]], chosen["k"], chosen["alpha"], PROFILE_NAME)

    # ----- difference-in-means steering direction at steer_layer, from the same emissions
    resid = position_matched(rtp["toxic_resid"], rtp["nontoxic_resid"])
    direction = resid.toxic.mean(0) - (resid.nontoxic_weight.unsqueeze(1) * resid.nontoxic).sum(0)  # [hidden]
    vector = SteeringVector(PROFILE_NAME, (config.steer_layer,), direction.unsqueeze(0))
    steering = choose_steering_strength(model, tokenizer, scorer, vector, RowEdit("steering"), sweep_ids, gen_config,
                                        wiki, config.steer_strengths, config.max_ppl_increase)

    data["sweep"] = {**describe_split({"toxic": sweep_prompts}, "sweep"), "samples_per_prompt": config.sweep_samples,
                     "top_p": config.top_p, "temperature": 1.0, "max_new_tokens": config.max_new_tokens}
    data["perplexity"] = {"source": "wikitext2/wiki.valid.tokens", "tokens": int(wiki.numel()),
                          "sequence_length": config.ppl_length}
    report = {"data": data, "steps": steps, "sweep": sweep_rows, "chosen": chosen, "rule": rule, "steering": steering,
              "seconds": round(time.monotonic() - started, 1),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}}
    return CalibrationResult(profiles, default, vector, report)


def write_profiles(result: CalibrationResult, out: Path, variants_out: Path | None, fingerprint: str,
                   model_name: str) -> list[Path]:
    """The default profile and the steering vector (with its chosen strength) into `out`; with
    variants_out, every scoring's ranked components (the benchmark cuts them to k)."""
    report = result.report
    chosen = report["chosen"]
    parameters = {"scoring": chosen["scoring"], "gate_quantile": chosen["gate_quantile"],
                  "max_new_tokens": report["config"]["max_new_tokens"], "seed": report["config"]["seed"],
                  "projection": "h @ V (V^T h), not the published reconstruct.py's V h"}
    quality = {"chosen": chosen, "rule": report["rule"], "sweep": report["sweep"], "steps": report["steps"]}
    written = [save_eigenshift_profile(out / f"eigenshift-{PROFILE_NAME}.safetensors", result.default,
                                       model_fingerprint=fingerprint, model_name=model_name, parameters=parameters,
                                       data=report["data"], quality=quality)]
    steering = report["steering"]
    written.append(save_vector_profile(
        out / f"vector-{PROFILE_NAME}.safetensors", result.vector, model_fingerprint=fingerprint, model_name=model_name,
        parameters={"kind": "difference in means, toxic minus position-matched non-toxic emissions; subtract it",
                    "layer": result.vector.layers[0], "strength": steering["chosen"]["strength"]},
        data=report["data"], quality=steering))
    if variants_out is not None:
        for scoring, profile in result.profiles.items():
            written.append(save_eigenshift_profile(
                variants_out / f"eigenshift-{PROFILE_NAME}-{scoring}.safetensors", profile,
                model_fingerprint=fingerprint, model_name=model_name,
                parameters={"scoring": scoring, "ranked": True, "seed": report["config"]["seed"]},
                data=report["data"], quality={"steps": report["steps"].get(scoring, {})}))
    return written


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EigenShiftCalibrationConfig()
    parser.add_argument("--model", default="default", help="Model to calibrate (as for serve). [default]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="float32 by default: the SVD and the hidden states are compared exactly.")
    parser.add_argument("--fit-prompts", type=int, default=None,
                        help="Prompts per class from the fit part (default: all of it, ~360 each).")
    parser.add_argument("--offensive-per-class", type=int, default=defaults.offensive_per_class,
                        help="Tweets per class for the 'more data' scoring (0: skip).")
    parser.add_argument("--sweep-prompts", type=int, default=defaults.sweep_prompts,
                        help="Toxic prompts from the sweep part that choose k and alpha (default: all of it, 120).")
    parser.add_argument("--sweep-samples", type=int, default=defaults.sweep_samples,
                        help="Sampled continuations per sweep prompt.")
    parser.add_argument("--ks", type=int, nargs="+", default=list(defaults.ks))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(defaults.alphas))
    parser.add_argument("--gate-quantiles", type=float, nargs="+", default=list(defaults.gate_quantiles))
    parser.add_argument("--ppl-tokens", type=int, default=defaults.ppl_tokens)
    parser.add_argument("--max-ppl-increase", type=float, default=defaults.max_ppl_increase)
    parser.add_argument("--scorer", default=defaults.scorer)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: ../shared/data.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Output directory. Default: <cache>/profiles/<model name>/.")
    parser.add_argument("--variants-out", type=Path, default=None,
                        help="Also write every scoring's ranked components here (what benchmarks/eigenshift_eval.py "
                             "reads).")
    parser.add_argument("--steer-strengths", type=float, nargs="+", default=list(defaults.steer_strengths),
                        help="Candidate strengths of the steering vector (subtracted; 1 = the difference in means).")
    parser.add_argument("--report", type=Path, default=None, help="Write the calibration report (JSON) here.")


def run(args: argparse.Namespace) -> int:
    from server.profiles import model_slug
    from server.runtime import load_model
    from server.settings import ServerSettings

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EigenShiftCalibrationConfig(
        fit_prompts=args.fit_prompts, offensive_per_class=args.offensive_per_class,
        sweep_prompts=args.sweep_prompts, sweep_samples=args.sweep_samples, ks=tuple(args.ks),
        alphas=tuple(args.alphas), gate_quantiles=tuple(args.gate_quantiles), ppl_tokens=args.ppl_tokens,
        max_ppl_increase=args.max_ppl_increase, scorer=args.scorer, seed=args.seed,
        steer_strengths=tuple(args.steer_strengths),
        **({"data_dir": args.data_dir} if args.data_dir else {}))
    missing = [p for p in (config.data_dir / "rtp", config.data_dir / "wikitext2") if not p.is_dir()]
    if config.offensive_per_class > 0 and not (config.data_dir / "offensive").is_dir():
        missing.append(config.data_dir / "offensive")
    if missing:
        print(f"neuronserve: calibration data not found: {', '.join(map(str, missing))} (--data-dir)", file=sys.stderr)
        return 2
    settings = ServerSettings(model=args.model, device=args.device, dtype=args.dtype, max_model_len=512,
                              wina_profile="none", threads=args.threads)
    loaded = load_model(settings)
    result = calibrate_eigenshift(loaded.model, loaded.tokenizer, config)
    out = args.out or settings.cache_dir / "profiles" / model_slug(loaded.name)
    for path in write_profiles(result, out, args.variants_out, loaded.fingerprint, loaded.name):
        print(f"wrote {path}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(result.report, indent=2))
        print(f"wrote {args.report}")
    chosen = result.report["chosen"]
    print(f"default: scoring {chosen['scoring']}, mode {chosen['mode']}, k {chosen['k']}, alpha {chosen['alpha']}: "
          f"sweep toxicity {chosen['toxicity_rate']:.3f} (baseline {result.report['sweep'][0]['toxicity_rate']:.3f}, "
          f"{result.report['data']['scorer']}), WikiText-2 validation perplexity {chosen['wikitext_valid_ppl']:.2f} "
          f"({chosen['ppl_change']:+.1%}) [{result.report['rule']}]")
    steer = result.report["steering"]["chosen"]
    print(f"steering vector '{PROFILE_NAME}': strength {steer['strength']}: sweep toxicity {steer['toxicity_rate']:.3f}, "
          f"perplexity {steer['ppl_change']:+.1%}")
    return 0
