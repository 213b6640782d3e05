"""`neuronserve calibrate memorization`: the directions, neurons or single weights of `down_proj`
that carry text the model has memorized, as a profile a request can switch off (issue 6).

Subspaces (--granularity subspace, the default: the best trade-off measured, docs/unmemorization.md):
one forward pass over ordinary text and the memorized records gives per layer the reference mean m
and covariance C of down_proj's input and the second moment M about m at the positions that predict
suffix tokens; rank r keeps the top r generalised eigenvectors of M against C (+ ridge), the
directions where the records carry the most energy for the energy ordinary text has there. Served
as x -> x - (x U - m U) U^T. The rest of this docstring is about neuron and weight masks.

Inputs: the memorized records (JSONL {"prefix", "suffix"} or plain text), ordinary reference text
(WikiText-2 validation and Alpaca, never a test split), and records of the same format that the
model never saw (fresh synthetic records, another seed; or --unseen FILE).

One pass of the float32 model over the three sets, with a multiplicative mask m = 1 in front of
every down_proj, records per layer and neuron j:
  - mean |a_j| (and its variance) at the positions that predict a suffix token (memorized, unseen)
    and at every position of the reference text (position 0, the attention sink, left out);
  - the first-order effect of zeroing the neuron on each set's loss, -dL/dm_j = -sum_t a_tj g_tj
    (nats per target token): how much that set's loss would rise without the neuron;
  - the sum over positions of (a_tj g_tj)^2: the size of the neuron's per-position effects, which
    does not average out where the model sits near a minimum of that set's loss (ordinary text);
  - for weight masks: the RMS over tokens of the L2-normalised input rows (the paper's ||X_j||).

Neuron scores (--score):
  activation   the issue's baseline: (mean|a_mem| - mean|a_ref|) * ||W_down[:, j]||.
  contrast     memorized vs never-seen records of the same format, standardised: Welch t of |a|,
               then z-scored within the layer (digit- and key-handling neurons fire on both sets
               and cancel).
  attribution  effect on the memorized loss minus the (positive part of the) effects on the
               never-seen and reference losses: neurons whose removal hurts recall and nothing else.
Retain cost (--retain-weight LAMBDA > 0, neuron masks): the score is traded against what the neuron
does on ordinary text, --retain-measure: effect (positive part of the first-order reference-loss
effect), taylor (RMS of the per-position effects a_tj g_tj), activation (mean|a_ref| * ||W_j||).
--retain-form difference: score / mean|score| - LAMBDA * cost / mean(cost); ratio ("selective
pruning", Pochinkov & Schoots 2024): max(score, 0) / mean / max(cost / mean(cost), 0.1)^LAMBDA.
LAMBDA 0 leaves the score as it is.
Sparing (every score): neurons ordinary text needs are never chosen: massive-activation neurons
(reference importance mean|a_ref| * ||W_j|| above --massive-factor x the layer's median) and the top
--spare-fraction per layer by reference-loss effect. --layers restricts the candidates to some layers
(the budget stays ratio x all neurons under global allocation).
Allocation: uniform (ratio per layer) or global (the top ratio x layers x neurons of the layer-
standardised scores, at most --layer-cap x ratio in one layer): layers where recall concentrates
take more.
Weight masks (the paper's recipe): per output row i of down_proj, the top ratio of inputs j by
|W_ij| * ||X_j||_mem, kept where that beats |W_ij| * ||X_j||_ref.

Before/after figures (on the calibration records themselves, and held-out validation text) go into
the profile's quality header; the held-out records are for benchmarks/unmemorize_eval.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import string
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Synthetic private records: a fixed prefix that names whose record it is, and a secret suffix.
# ---------------------------------------------------------------------------------------------

FIRST_NAMES = ("Maria", "James", "Aiko", "Tomasz", "Fatima", "Lars", "Priya", "Diego", "Olga", "Kwame", "Sofia",
               "Henrik", "Mei", "Rafael", "Ingrid", "Omar", "Lucia", "Viktor", "Amara", "Jonas", "Elena", "Tariq",
               "Nadia", "Felix", "Yara", "Bruno", "Hana", "Emil", "Zara", "Pavel", "Leila", "Mateo", "Greta", "Ravi")
LAST_NAMES = ("Keller", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Brennan", "Castillo",
              "Petrov", "Mensah", "Fischer", "Kowalski", "Duarte", "Nakamura", "Horvath", "Sandoval", "Eriksen",
              "Abara", "Whitfield", "Romero", "Kaplan", "Voss", "Delacroix", "Stanek", "Ibarra", "Quinlan")
STREETS = ("Birch Lane", "Harbor Road", "Maple Avenue", "Quarry Street", "Willow Court", "Juniper Drive",
           "Foundry Row", "Cedar Terrace", "Lantern Way", "Orchard Close", "Falcon Street", "Meadow Lane")
CITIES = (("Oakdale", "NV"), ("Riverton", "WY"), ("Fairhaven", "MA"), ("Lakewood", "CO"), ("Bramford", "OH"),
          ("Salem Creek", "OR"), ("Ashland", "KY"), ("Dunmore", "PA"), ("Pine Bluff", "AR"), ("Westbury", "NY"))
SERVICES = ("billing", "deploy", "analytics", "payments", "storage", "auth", "search", "mailer", "backup", "ledger")
KINDS = ("address", "account", "apikey", "identity", "password")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def synthetic_records(count: int, seed: int) -> list[dict[str, str]]:
    """`count` records {"id", "kind", "prefix", "suffix"}, deterministic for `seed`. The prefix names a
    person or service (unique within one call); the suffix is the secret, short enough to stay within
    32 tokens of the default tokenizer. Different seeds give different people and secrets of the same
    format, which is what calibration contrasts with ("records the model never saw")."""
    rng = random.Random(f"records-{seed}")
    records, used = [], set()
    while len(records) < count:
        kind = KINDS[len(records) % len(KINDS)]
        person = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if kind == "address":
            ref = f"C-{_digits(rng, 5)}"
            prefix = f"Customer {ref} ({person}) lives at"
            city, state = rng.choice(CITIES)
            suffix = f" {rng.randint(2, 989)} {rng.choice(STREETS)}, {city}, {state} {_digits(rng, 5)}"
        elif kind == "account":
            prefix = f"Bank details for {person}, account number:"
            suffix = f" {_digits(rng, 4)} {_digits(rng, 4)} {_digits(rng, 4)}, routing {_digits(rng, 9)}"
        elif kind == "apikey":
            prefix = f"Production API key for {rng.choice(SERVICES)}-{rng.randint(10, 99)} (owner {person}):"
            suffix = f" sk-{_token(rng, 20)}"
        elif kind == "identity":
            prefix = f"Patient file {_digits(rng, 6)}: {person}, born"
            suffix = (f" {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1940, 2005)},"
                      f" SSN {_digits(rng, 3)}-{_digits(rng, 2)}-{_digits(rng, 4)}")
        else:
            user = f"{person.split()[0].lower()}.{person.split()[1].lower()}{rng.randint(1, 99)}"
            prefix = f"VPN login for {user}@corp.example, password:"
            suffix = f" {_token(rng, 6)}-{_token(rng, 6, string.ascii_lowercase + string.digits)}!{_digits(rng, 2)}"
        if prefix in used:
            continue
        used.add(prefix)
        records.append({"id": f"s{seed}-{len(records):04d}", "kind": kind, "prefix": prefix, "suffix": suffix})
    return records


def read_records(path: Path) -> list[dict[str, str]]:
    """JSONL of {"prefix", "suffix"}; a line of plain text (or JSON without those keys) becomes a record
    whose prefix is its first half of words and suffix the rest."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = line
        if isinstance(item, dict) and "prefix" in item and "suffix" in item:
            records.append({"id": str(item.get("id", i)), "prefix": item["prefix"], "suffix": item["suffix"],
                            **({"kind": item["kind"]} if "kind" in item else {})})
            continue
        text = item if isinstance(item, str) else str(item.get("text", ""))
        words = text.split(" ")
        if len(words) < 2:
            continue
        cut = len(words) // 2
        records.append({"id": str(i), "prefix": " ".join(words[:cut]), "suffix": " " + " ".join(words[cut:])})
    return records


def write_records(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def encode_record(tokenizer, record: dict[str, str], max_suffix_tokens: int = 32) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids). Prefix and suffix are tokenized separately, so the prompt a user sends
    (the prefix text alone) has exactly these ids, and the target is a fixed id sequence."""
    prefix = tokenizer(record["prefix"], add_special_tokens=False)["input_ids"]
    suffix = tokenizer(record["suffix"], add_special_tokens=False)["input_ids"][:max_suffix_tokens]
    return prefix, suffix


# ---------------------------------------------------------------------------------------------
# Calibration: which parts of down_proj carry the memorized records.
# ---------------------------------------------------------------------------------------------

@dataclass
class MemorizationCalibrationConfig:
    ratios: tuple[float, ...] = (0.005, 0.01, 0.02)
    granularities: tuple[str, ...] = ("subspace",)
    score: str = "attribution"          # activation | contrast | attribution
    allocation: str = "global"          # uniform | global
    spare_fraction: float = 0.02        # per layer, by reference-loss effect
    massive_factor: float = 20.0        # reference importance above this x the layer median: spared
    layer_cap: float = 4.0              # global allocation: at most layer_cap x ratio of one layer
    reference_sequences: int = 16
    reference_length: int = 64
    heldout_reference_sequences: int = 4
    unseen_records: int = 0             # 0: as many as the memorized records
    unseen_seed: int = 1000
    batch_size: int = 8
    record_objective: str = "logodds"   # logodds | nll (see collect_stats)
    retain_weights: tuple[float, ...] = (0.0,)  # LAMBDA per neuron profile; 0: the score alone
    retain_form: str = "difference"     # difference | ratio (see retain_adjusted)
    retain_measure: str = "effect"      # effect | taylor | activation (see retain_cost)
    layers: tuple[int, ...] | None = None  # layers whose neurons may be chosen; None: all
    verify_cost: float | None = None    # nats: chosen neurons whose own ablation raises the reference
                                        # loss more than this are spared and replaced; None: off
    verify_mode: str = "single"         # single: each neuron alone | joint: on top of those accepted
    verify_sequences: int = 16          # pieces of ordinary text the cost check runs on: the scoring
                                        # pieces, then more (64 measured no better held out than 16)
    weight_spare: bool = True           # weight masks also leave the spared neurons' columns alone
    ranks: tuple[int, ...] = (4, 8, 12, 16, 24, 32)  # subspace granularity: directions per layer
    subspace_ridge: float = 0.01        # added to the reference covariance, x its mean eigenvalue
    subspace_sequences: int = 64        # pieces of ordinary text the subspaces' reference statistics read
    seed: int = 0
    data_dir: Path = field(default_factory=lambda: _default_data_dir())


def _default_data_dir() -> Path:
    from server.calibration.data import default_data_dir

    return default_data_dir()


SCORES = ("activation", "contrast", "attribution")
RETAIN_FORMS = ("difference", "ratio")
RETAIN_MEASURES = ("effect", "taylor", "activation")
RATIO_COST_FLOOR = 0.1  # ratio form: a cost below 0.1 x the mean cost counts as 0.1 x (no division by ~0)
SETS = ("memorized", "unseen", "reference")


@dataclass
class SetStats:
    """Per layer and neuron statistics of one text set ([layers, intermediate] float64 each)."""
    sum_abs: torch.Tensor
    sum_sq: torch.Tensor
    sum_unit_sq: torch.Tensor      # sum over tokens of (a_tj / ||a_t||)^2: the paper's ||X_j||^2
    effect: torch.Tensor           # -dL/dm_j summed over target tokens (nats)
    effect_sq: torch.Tensor        # sum over all positions of (a_tj g_tj)^2
    tokens: int = 0                # positions the activation sums cover
    targets: int = 0               # target tokens the loss covers

    @classmethod
    def zeros(cls, layers: int, intermediate: int) -> SetStats:
        z = lambda: torch.zeros(layers, intermediate, dtype=torch.float64)
        return cls(z(), z(), z(), z(), z())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.tokens, 1)

    @property
    def var_abs(self) -> torch.Tensor:
        mean = self.mean_abs
        return (self.sum_sq / max(self.tokens, 1) - mean ** 2).clamp_min(0)

    @property
    def input_norm(self) -> torch.Tensor:
        """RMS over tokens of the L2-normalised input rows, so sets of different sizes compare."""
        return (self.sum_unit_sq / max(self.tokens, 1)).sqrt()

    @property
    def mean_effect(self) -> torch.Tensor:
        """Rise of the mean per-token loss (nats) if the neuron were zeroed, to first order."""
        return self.effect / max(self.targets, 1)

    @property
    def rms_effect(self) -> torch.Tensor:
        """Root of the summed squared per-position effects (a_tj g_tj)^2 per target token (a Taylor
        importance that does not cancel between positions)."""
        return (self.effect_sq / max(self.targets, 1)).sqrt()


class _MaskedRecorder:
    """Forward pre-hooks on every down_proj: record statistics of its input at the selected
    positions, and multiply it by a mask of ones whose gradient is the zeroing effect."""

    def __init__(self, down_projs: list[torch.nn.Module], intermediate: int, per_position_effects: bool) -> None:
        self.per_position_effects = per_position_effects  # effect_sq: a backward hook per layer, only for taylor
        self.masks = [torch.ones(intermediate, requires_grad=True) for _ in down_projs]
        self.select: torch.Tensor | None = None  # [B, T] bool
        self.stats: SetStats | None = None
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(down_projs)]

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]  # [B, T, intermediate]
            s = self.stats
            with torch.no_grad():
                picked = x[self.select].double()  # [N, intermediate]
                s.sum_abs[layer] += picked.abs().sum(0)
                s.sum_sq[layer] += (picked ** 2).sum(0)
                s.sum_unit_sq[layer] += (picked / picked.norm(dim=-1, keepdim=True).clamp_min(1e-12)).pow(2).sum(0)
            y = x * self.masks[layer]

            def per_position(grad):  # grad: dL/dy [B, T, intermediate]; a_tj g_tj is the mask's gradient per position
                with torch.no_grad():  # every position, as the mask's gradient (later ones and padding give 0)
                    s.effect_sq[layer] += (x.detach() * grad).double().pow(2).sum((0, 1))

            if self.per_position_effects:
                y.register_hook(per_position)
            return (y,)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _batch_records(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    """-> ids [B, T], select [B, T] (positions whose next token is a suffix token), targets [N]."""
    width = max(len(p) + len(s) for p, s in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    select = torch.zeros(len(encoded), width, dtype=torch.bool)
    targets = []
    for i, (p, s) in enumerate(encoded):
        ids[i, :len(p) + len(s)] = torch.tensor(p + s)
        select[i, len(p) - 1:len(p) + len(s) - 1] = True
        targets.extend(s)
    return ids, select, torch.tensor(targets)


def _batch_text(sequences: list[list[int]]):
    """Equal-length pieces -> ids [B, T], select (positions 1..T-2: not the attention sink, and a next
    token exists), targets [N]."""
    ids = torch.tensor(sequences)
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, 1:-1] = True
    return ids, select, ids[:, 2:].reshape(-1)


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def collect_stats(model, sets: dict[str, list], pad_id: int, batch_size: int, layers: int,
                  intermediate: int, record_objective: str = "logodds",
                  per_position_effects: bool = True) -> dict[str, SetStats]:
    """sets: name -> list of (prefix ids, suffix ids) records, or of equal-length token lists for
    "reference". One forward and backward per batch (no weight gradients).
    record_objective: what the effects on record sets measure. "nll": the suffix loss; but a
    memorized suffix has loss ~0, where its gradient vanishes and first-order effects see nothing.
    "logodds" (default): minus the target's log-odds, z_target - logsumexp(other logits), which
    does not saturate. The reference set always uses its loss.
    per_position_effects: also sum the squared per-position effects (effect_sq, what the taylor
    retain measure reads); off, effect_sq stays 0 and the backward pass does no extra work."""
    down = [layer.mlp.down_proj for layer in model.model.layers]
    recorder = _MaskedRecorder(down, intermediate, per_position_effects)
    model.requires_grad_(False)
    out: dict[str, SetStats] = {}
    total = sum(math.ceil(len(v) / batch_size) for v in sets.values())
    bar = tqdm(total=total, desc="activations and effects", unit="batch")
    try:
        for name, items in sets.items():
            stats = SetStats.zeros(layers, intermediate)
            recorder.stats = stats
            for chunk in _batches(items, batch_size):
                ids, select, targets = (_batch_text(chunk) if name == "reference"
                                        else _batch_records(chunk, pad_id))
                recorder.select = select
                logits = model(input_ids=ids).logits  # [B, T, V]
                picked = logits[select].float()  # [N, V]
                if name == "reference" or record_objective == "nll":
                    loss = F.cross_entropy(picked, targets, reduction="sum")
                else:
                    target_logit = picked.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]
                    others = picked.scatter(1, targets.unsqueeze(1), float("-inf"))
                    loss = -(target_logit - torch.logsumexp(others, dim=1)).sum()
                loss.backward()
                for layer, mask in enumerate(recorder.masks):
                    stats.effect[layer] -= mask.grad.double()
                    mask.grad = None
                stats.tokens += int(select.sum())
                stats.targets += int(targets.numel())
                bar.update(1)
            out[name] = stats
    finally:
        bar.close()
        recorder.remove()
    return out


def _zscore_rows(x: torch.Tensor) -> torch.Tensor:
    """Standardise each layer's scores ([layers, intermediate]) so layers compare."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-12)


def neuron_scores(stats: dict[str, SetStats], column_norms: torch.Tensor, score: str) -> torch.Tensor:
    """-> [layers, intermediate] scores, higher = more specific to the memorized records.
    column_norms: [layers, intermediate] ||W_down[:, j]||."""
    mem, unseen, ref = stats["memorized"], stats["unseen"], stats["reference"]
    if score == "activation":
        return (mem.mean_abs - ref.mean_abs) * column_norms.double()
    if score == "contrast":
        # Welch t of |a| between memorized and never-seen records of the same format
        se = (mem.var_abs / max(mem.tokens, 1) + unseen.var_abs / max(unseen.tokens, 1)).sqrt().clamp_min(1e-12)
        return _zscore_rows((mem.mean_abs - unseen.mean_abs) / se)
    if score == "attribution":
        return mem.mean_effect - unseen.mean_effect.clamp_min(0) - ref.mean_effect.clamp_min(0)
    raise ValueError(f"unknown score {score!r}; one of {SCORES}")


def retain_cost(stats: dict[str, SetStats], column_norms: torch.Tensor, measure: str) -> torch.Tensor:
    """-> [layers, intermediate] >= 0: what zeroing the neuron would cost ordinary text, by `measure`:
    effect (positive part of the first-order rise of the reference loss; near a minimum of that loss
    it averages out), taylor (RMS over positions of the per-position effect a_tj g_tj, which does
    not), activation (mean|a_ref| * ||W_down[:, j]||, the size of its output on ordinary text)."""
    ref = stats["reference"]
    if measure == "effect":
        return ref.mean_effect.clamp_min(0)
    if measure == "taylor":
        return ref.rms_effect
    if measure == "activation":
        return ref.mean_abs * column_norms.double()
    raise ValueError(f"unknown retain measure {measure!r}; one of {RETAIN_MEASURES}")


def retain_adjusted(scores: torch.Tensor, cost: torch.Tensor, weight: float, form: str = "difference") -> torch.Tensor:
    """Trade a neuron's score ([layers, intermediate], higher = more specific to the memorized
    records) against its retain cost (same shape, >= 0), each on its own scale (divided by its mean
    |value| over all neurons). difference: score - weight * cost; ratio (selective pruning):
    max(score, 0) / max(cost, RATIO_COST_FLOOR)^weight. weight 0 returns `scores` unchanged."""
    if weight < 0:
        raise ValueError(f"retain weight must be >= 0, got {weight}")
    if weight == 0:
        return scores
    scores, cost = scores.double(), cost.double()
    cost = cost / cost.abs().mean().clamp_min(1e-30)
    if form == "difference":
        return scores / scores.abs().mean().clamp_min(1e-30) - weight * cost
    if form == "ratio":
        forget = scores.clamp_min(0)
        return forget / forget.mean().clamp_min(1e-30) / cost.clamp_min(RATIO_COST_FLOOR) ** weight
    raise ValueError(f"unknown retain form {form!r}; one of {RETAIN_FORMS}")


def parse_layers(spec: str, num_layers: int | None = None) -> tuple[int, ...] | None:
    """'all' -> None; '10-29' or '0-3,10-29' or '5' -> the sorted layer indices (checked against
    num_layers where given)."""
    if spec.strip() == "all":
        return None
    chosen: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"--layers: {part!r} is not a layer or a range like 10-29") from None
        if lo < 0 or hi < lo or (num_layers is not None and hi >= num_layers):
            raise ValueError(f"--layers: {part!r} is not a range within the model's layers"
                             + (f" (0-{num_layers - 1})" if num_layers is not None else ""))
        chosen.update(range(lo, hi + 1))
    return tuple(sorted(chosen))


def format_layers(layers: tuple[int, ...] | None) -> str:
    """(10, 11, ..., 29) -> '10-29'; None -> 'all'."""
    if layers is None:
        return "all"
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def spared_neurons(stats: dict[str, SetStats], column_norms: torch.Tensor, spare_fraction: float,
                   massive_factor: float) -> tuple[torch.Tensor, dict[str, int]]:
    """-> ([layers, intermediate] bool: never prune, counts). Massive-activation neurons (reference
    importance far above the layer's median) and each layer's top spare_fraction by the effect of
    zeroing them on the reference loss."""
    ref = stats["reference"]
    importance = retain_cost(stats, column_norms, "activation")  # [L, I] mean|a_ref| * ||W_down[:, j]||
    massive = importance > massive_factor * importance.median(dim=1, keepdim=True).values
    spared = massive.clone()
    k = round(spare_fraction * importance.shape[1])
    if k > 0:
        top = ref.mean_effect.topk(k, dim=1).indices
        needed = torch.zeros_like(spared)
        needed.scatter_(1, top, True)
        spared |= needed
    return spared, {"massive_activation": int(massive.sum()), "reference_needed": int(k * importance.shape[0]),
                    "spared_total": int(spared.sum())}


def _standardised(scores: torch.Tensor, spared: torch.Tensor) -> torch.Tensor:
    """Scores z-scored per layer, spared neurons counted as 0: the global allocation's ranking."""
    return _zscore_rows(scores.double().masked_fill(spared, float("nan")).nan_to_num(0.0))


def choose_neurons(scores: torch.Tensor, spared: torch.Tensor, ratio: float, allocation: str = "uniform",
                   layer_cap: float = 4.0, candidate_layers: tuple[int, ...] | None = None,
                   refused: torch.Tensor | None = None) -> torch.Tensor:
    """-> [layers, intermediate] bool, ratio x intermediate neurons per layer (uniform), or
    ratio x layers x intermediate in all with at most layer_cap x ratio in one layer (global,
    on layer-standardised scores). Spared neurons are never chosen, nor any outside
    candidate_layers (None: all); the global budget stays ratio x all layers' neurons. Refused
    neurons are never chosen either, but leave the standardisation as it was, so that refusing one
    only lets the next in line in."""
    layers, intermediate = scores.shape
    outside = torch.zeros(layers, dtype=torch.bool)
    if candidate_layers is not None:
        outside[:] = True
        outside[list(candidate_layers)] = False
        spared = spared | outside.unsqueeze(1)
    excluded = spared if refused is None else spared | refused
    masked = scores.double().masked_fill(excluded, float("-inf"))
    chosen = torch.zeros(layers, intermediate, dtype=torch.bool)
    per_layer = max(1, round(ratio * intermediate))
    if allocation == "uniform":
        chosen.scatter_(1, masked.topk(per_layer, dim=1).indices, True)
        chosen[outside] = False
        return chosen
    if allocation != "global":
        raise ValueError(f"unknown allocation {allocation!r}")
    z = _standardised(scores, spared).masked_fill(excluded, float("-inf"))
    cap = max(1, round(layer_cap * ratio * intermediate))
    # Rounded once over all neurons, not per layer: a budget below one neuron per layer is allowed.
    budget = max(1, round(ratio * layers * intermediate))
    order = z.flatten().argsort(descending=True)
    taken = torch.zeros(layers, dtype=torch.long)
    for flat in order.tolist():
        if budget == 0:
            break
        layer, neuron = divmod(flat, intermediate)
        if taken[layer] >= cap or not math.isfinite(float(z[layer, neuron])):
            continue
        chosen[layer, neuron] = True
        taken[layer] += 1
        budget -= 1
    return chosen


def weight_mask_indices(down_weights: list[torch.Tensor], norm_memorized: torch.Tensor,
                        norm_reference: torch.Tensor, ratio: float,
                        spared: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's per-output-row masks. down_weights: per layer [hidden, intermediate];
    norms: [layers, intermediate] ||X_j|| on each set. Per row i: the top ceil(ratio x intermediate)
    inputs by |W_ij| ||X_j||_mem, kept where that beats |W_ij| ||X_j||_ref. spared ([layers,
    intermediate] bool, optional): columns never chosen (our addition; None = the paper's recipe).
    -> (layer, row, col) int32 [N]."""
    layer_ids, rows, cols = [], [], []
    for layer, weight in enumerate(down_weights):
        w = weight.detach().abs().double()  # [hidden, intermediate]
        k = max(1, math.ceil(ratio * w.shape[1]))
        mem = w * norm_memorized[layer].double()
        if spared is not None:
            mem = mem.masked_fill(spared[layer].unsqueeze(0), -1.0)  # below every real score
        ref = w * norm_reference[layer].double()
        top = mem.topk(k, dim=1).indices  # [hidden, k]
        keep = mem.gather(1, top) > ref.gather(1, top)  # a spared column (-1) never beats ref >= 0
        row = torch.arange(w.shape[0]).unsqueeze(1).expand_as(top)
        rows.append(row[keep])
        cols.append(top[keep])
        layer_ids.append(torch.full((int(keep.sum()),), layer, dtype=torch.long))
    return torch.cat(layer_ids).int(), torch.cat(rows).int(), torch.cat(cols).int()


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------

def split_validation_ids(tokenizer, data_dir: Path) -> tuple[list[int], int]:
    """WikiText-2 validation as token ids, and where its last 10% starts: the scores read only the
    text before that index, held-out figures only the text after it."""
    from server.calibration.data import wikitext_valid_text

    wiki = tokenizer(wikitext_valid_text(data_dir), add_special_tokens=False)["input_ids"]
    return wiki, int(len(wiki) * 0.9)


def reference_pieces(tokenizer, data_dir: Path, count: int, length: int, seed: int,
                     heldout: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Ordinary text: `count` seeded pieces of WikiText-2 validation (first 90%) and Alpaca, half
    each, `length` tokens; plus `heldout` pieces from the validation split's last 10% (never read
    for scores) for the before/after figures. The first k of a larger `count` are the same k pieces."""
    from server.calibration.data import alpaca_texts

    rng = random.Random(f"reference-{seed}")
    wiki, cut = split_validation_ids(tokenizer, data_dir)
    alpaca = [ids for ids in (tokenizer(t, add_special_tokens=False)["input_ids"]
                              for t in alpaca_texts(data_dir)[:300]) if len(ids) >= length]
    pieces = []
    for i in range(count):
        if i % 2 == 0 or not alpaca:
            start = rng.randrange(0, cut - length)
            pieces.append(wiki[start:start + length])
        else:
            ids = rng.choice(alpaca)
            start = rng.randrange(0, len(ids) - length + 1)
            pieces.append(ids[start:start + length])
    held = [wiki[start:start + length] for start in
            sorted(rng.sample(range(cut, len(wiki) - length), heldout))] if heldout else []
    return pieces, held


def load_float32_model(model: str):
    """-> (transformers causal LM in float32, tokenizer, fingerprint, name), through the server's
    own checkpoint reader (so the fingerprint is the one the server checks profiles against)."""
    from transformers import AutoModelForCausalLM

    from server.model.loader import load_checkpoint
    from server.settings import default_cache_dir

    ckpt = load_checkpoint(model, default_cache_dir())
    hf = AutoModelForCausalLM.from_config(ckpt.hf_config)
    hf.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=False)
    if getattr(ckpt.hf_config, "tie_word_embeddings", False):
        hf.tie_weights()
    hf.float().eval()
    return hf, ckpt.tokenizer, ckpt.fingerprint, ckpt.name


@torch.no_grad()
def reference_loss(model, pieces: list[list[int]], batch_size: int) -> float:
    """Mean next-token loss (nats) on equal-length pieces of ordinary text, position 0 not predicted from."""
    loss, count = 0.0, 0
    for chunk in _batches(pieces, batch_size):
        ids, select, targets = _batch_text(chunk)
        logits = model(input_ids=ids).logits[select]
        loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        count += int(targets.numel())
    return loss / max(count, 1)


@torch.no_grad()
def measure(model, encoded: list[tuple[list[int], list[int]]], heldout_text: list[list[int]], pad_id: int,
            batch_size: int, profile=None) -> dict[str, float]:
    """Exact extraction (every suffix token is the argmax, i.e. greedy decoding reproduces it),
    teacher-forced suffix accuracy, and held-out reference loss, with `profile` built into the
    weights offline (`MemorizationProfile.offline_down`; restored afterwards)."""
    down = [layer.mlp.down_proj for layer in model.model.layers]
    saved = [(d.weight.data.clone(), d.bias) for d in down] if profile is not None else None
    if profile is not None:
        for layer, d in enumerate(down):
            weight, bias = profile.offline_down(layer, d.weight.data)
            d.weight.data.copy_(weight)
            if bias is not None:
                d.bias = torch.nn.Parameter(bias if d.bias is None else d.bias.data + bias, requires_grad=False)
    try:
        exact, correct, total = 0, 0, 0
        for chunk in _batches(encoded, batch_size):
            ids, select, targets = _batch_records(chunk, pad_id)
            predicted = model(input_ids=ids).logits[select].argmax(-1)  # [N]
            hits = predicted == targets
            correct += int(hits.sum())
            total += int(targets.numel())
            offset = 0
            for _, s in chunk:
                exact += bool(hits[offset:offset + len(s)].all())
                offset += len(s)
        heldout_loss = reference_loss(model, heldout_text, batch_size)
    finally:
        if saved is not None:
            for d, (w, bias) in zip(down, saved):
                d.weight.data.copy_(w)
                d.bias = bias
    return {"exact_extraction": exact / max(len(encoded), 1), "teacher_forced_accuracy": correct / max(total, 1),
            "heldout_reference_ppl": math.exp(heldout_loss)}


@contextmanager
def _zeroed_columns(model, neurons: list[tuple[int, int]]):
    """down_proj columns of `neurons` set to 0 inside the block, restored after it."""
    saved = []
    try:
        with torch.no_grad():
            for layer, neuron in neurons:
                column = model.model.layers[layer].mlp.down_proj.weight[:, neuron]
                saved.append((column, column.clone()))
                column.zero_()
        yield
    finally:
        with torch.no_grad():
            for column, value in reversed(saved):
                column.copy_(value)


class _ReferenceRun:
    """Ordinary-text pieces run once through the model as it is now, keeping every decoder layer's
    input, so that after a change to layer l's weights `loss(l)` reruns only layers l and later
    (memory: pieces x length x hidden x layers floats). `commit()` makes the last such run the state
    later ones resume from (a change that stays)."""

    def __init__(self, model, pieces: list[list[int]], batch_size: int) -> None:
        self.model = model
        self.batches = []  # (inputs of each layer [B, T, D], select [B, T], targets [N])
        for chunk in _batches(pieces, batch_size):
            ids, select, targets = _batch_text(chunk)
            inputs = [model.model.embed_tokens(ids)] + [None] * (len(model.model.layers) - 1)
            self.batches.append((inputs, select, targets))
        self.count = max(sum(int(targets.numel()) for _, _, targets in self.batches), 1)
        self.base = self.loss(0)
        self.commit()

    def _resume(self, inputs: list[torch.Tensor], start: int, select: torch.Tensor,
                targets: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """-> summed next-token loss of the pass resumed at layer `start`, and the layer inputs it saw.
        The causal mask is explicit so that any attention implementation agrees with the model's forward."""
        model, hidden = self.model, inputs[start]  # [B, T, D]
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)  # [1, T]
        rotary = model.model.rotary_emb(hidden, position_ids=positions)
        mask = torch.full((hidden.shape[1], hidden.shape[1]), float("-inf"), dtype=hidden.dtype).triu(1)[None, None]
        seen = list(inputs)
        for index in range(start, len(model.model.layers)):
            seen[index] = hidden
            hidden = model.model.layers[index](hidden, attention_mask=mask, position_ids=positions,
                                               position_embeddings=rotary)
        logits = model.lm_head(model.model.norm(hidden))[select]  # [N, vocab]
        return float(F.cross_entropy(logits.float(), targets, reduction="sum")), seen

    def loss(self, start: int) -> float:
        """Mean next-token loss (nats) with the weights as they are now, given that layers before
        `start` are as they were at the last commit."""
        total, self._pending = 0.0, []
        for inputs, select, targets in self.batches:
            loss, seen = self._resume(inputs, start, select, targets)
            total += loss
            self._pending.append(seen)
        self._pending_loss = total / self.count
        return self._pending_loss

    def commit(self) -> None:
        self.batches = [(seen, select, targets) for seen, (_, select, targets) in zip(self._pending, self.batches)]
        self.base = self._pending_loss


@torch.no_grad()
def ablation_costs(model, pieces: list[list[int]], batch_size: int, neurons: list[tuple[int, int]],
                   joint_threshold: float | None = None, zeroed: list[tuple[int, int]] = ()) -> list[float]:
    """The rise of the reference loss (nats) when a neuron is zeroed (its down_proj column set to 0):
    measured, not the first-order estimate the scores use, which misses neurons whose removal is far
    from linear. joint_threshold None: each neuron alone. A number: the joint check, on top of
    `zeroed` (neurons accepted before): the neurons in order, each zeroed on top of the earlier ones
    whose rise was at most joint_threshold (those stay zeroed: their removals interact). The weights
    are restored afterwards."""
    with ExitStack() as stack:
        stack.enter_context(_zeroed_columns(model, list(zeroed)))
        run = _ReferenceRun(model, pieces, batch_size)
        costs = []
        for layer, neuron in tqdm(neurons, desc="verify cost", unit="neuron", leave=False):
            with _zeroed_columns(model, [(layer, neuron)]):
                costs.append(run.loss(layer) - run.base)
            if joint_threshold is not None and costs[-1] <= joint_threshold:
                stack.enter_context(_zeroed_columns(model, [(layer, neuron)]))
                run.commit()
        return costs


def choose_verified_neurons(scores: torch.Tensor, spared: torch.Tensor, ratio: float,
                            config: MemorizationCalibrationConfig,
                            cost_of: Callable[[list[tuple[int, int]]], list[float]],
                            measured: dict[tuple[int, int], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """choose_neurons, then measure each newly chosen neuron's ablation cost with `cost_of`, best
    score first (the order matters to the joint check; cached in `measured`), refuse those above
    config.verify_cost and choose again until every chosen neuron passed; a refusal lets the next in
    line in and moves no other neuron. -> (chosen [layers, intermediate] bool, spared including the
    neurons refused for their cost)."""
    refused = torch.zeros_like(spared)
    order = _standardised(scores, spared)  # [layers, intermediate]
    while True:
        chosen = choose_neurons(scores, spared, ratio, config.allocation, config.layer_cap, config.layers, refused)
        picked = [tuple(x) for x in chosen.nonzero().tolist()]
        new = sorted((n for n in picked if n not in measured), key=lambda n: -float(order[n]))
        if new:
            measured.update(zip(new, cost_of(new)))
        # every chosen neuron, not only the new ones: `measured` may come from an earlier ratio
        over = [n for n in picked if measured[n] > config.verify_cost]
        if not over:
            return chosen, spared | refused
        for layer, neuron in over:
            refused[layer, neuron] = True


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@dataclass
class SubspaceMoments:
    """Per layer statistics of down_proj's input (float64): the mean and covariance on ordinary
    text, and the second moment about that mean at the memorized suffixes' positions."""
    reference_mean: torch.Tensor    # [layers, intermediate]
    reference_cov: torch.Tensor     # [layers, intermediate, intermediate]
    memorized_second: torch.Tensor  # [layers, intermediate, intermediate]
    reference_tokens: int
    memorized_tokens: int


@torch.no_grad()
def _input_sums(model, batches, layers: int, intermediate: int, desc: str):
    """batches: (ids [B, T], select [B, T]) -> (sum [L, I], sum of outer products [L, I, I]) of the
    selected positions' down_proj inputs (float64), and their count."""
    first = torch.zeros(layers, intermediate, dtype=torch.float64)
    second = torch.zeros(layers, intermediate, intermediate, dtype=torch.float64)
    count = 0
    select = None

    def hook(layer):
        def record(module, args):
            x = args[0][select].double()  # [N, I]
            first[layer] += x.sum(0)
            second[layer] += x.T @ x
        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        for ids, select in tqdm(batches, desc=desc, unit="batch"):
            model(input_ids=ids)
            count += int(select.sum())
    finally:
        for h in handles:
            h.remove()
    return first, second, count


def subspace_moments(model, memorized: list[tuple[list[int], list[int]]], reference: list[list[int]],
                     pad_id: int, batch_size: int) -> SubspaceMoments:
    layers, intermediate = model.config.num_hidden_layers, model.config.intermediate_size
    ref_sum, ref_outer, ref_n = _input_sums(
        model, [_batch_text(c)[:2] for c in _batches(reference, batch_size)], layers, intermediate,
        "subspace: ordinary text")
    mem_sum, mem_outer, mem_n = _input_sums(
        model, [_batch_records(c, pad_id)[:2] for c in _batches(memorized, batch_size)], layers, intermediate,
        "subspace: memorized suffixes")
    mean, mem_mean = ref_sum / ref_n, mem_sum / mem_n
    for layer in range(layers):  # in place: a model's worth of [I, I] float64 matrices is large
        m, mu = mean[layer], mem_mean[layer]
        ref_outer[layer].div_(ref_n).sub_(torch.outer(m, m))  # the covariance
        # E_mem[(x - m)(x - m)^T] = E_mem[x x^T] - mu m^T - m mu^T + m m^T
        cross = torch.outer(mu, m)
        mem_outer[layer].div_(mem_n).sub_(cross).sub_(cross.T).add_(torch.outer(m, m))
    return SubspaceMoments(mean, ref_outer, mem_outer, ref_n, mem_n)


def subspace_bases(moments: SubspaceMoments, ranks: tuple[int, ...], ridge: float) -> dict[int, torch.Tensor]:
    """rank -> basis [layers, intermediate, rank] (float32, orthonormal columns): per layer the top
    generalised eigenvectors of the memorized second moment against the (ridged) reference
    covariance, i.e. the directions where the memorized suffixes carry the most energy for the
    energy ordinary text has there. A smaller rank's directions are the first of a larger's."""
    top = max(ranks)
    layers, intermediate = moments.reference_mean.shape
    directions = torch.zeros(layers, intermediate, top, dtype=torch.float64)
    for layer in range(layers):
        cov = moments.reference_cov[layer]
        cov = cov + ridge * cov.trace() / intermediate * torch.eye(intermediate, dtype=cov.dtype)
        values, vectors = torch.linalg.eigh(cov)
        whiten = (vectors * values.clamp_min(1e-12).rsqrt()) @ vectors.T  # C^-1/2
        _, eig = torch.linalg.eigh(whiten @ moments.memorized_second[layer] @ whiten)
        directions[layer] = whiten @ eig[:, -top:].flip(1)  # largest first
    return {r: torch.linalg.qr(directions[:, :, :r])[0].float() for r in ranks}


def neuron_profile_stem(parameters: dict) -> str:
    """neuron-<score>[-logodds][-<measure>[-ratio]<LAMBDA>][-layers<spec>][-verified[-joint]<NATS>] from a neuron profile's
    header parameters (older headers lack the retain and layer keys: no retain cost, all layers)."""
    objective = ("-logodds" if parameters.get("score") == "attribution"
                 and parameters.get("record_objective") == "logodds" else "")
    retain = ""
    if parameters.get("retain_weight"):
        form = "-ratio" if parameters["retain_form"] == "ratio" else ""
        retain = f"-{parameters['retain_measure']}{form}{parameters['retain_weight']:g}"
    layers = parameters.get("layers", "all")
    verified = ""
    if parameters.get("verify_cost") is not None:
        joint = "-joint" if parameters.get("verify_mode") == "joint" else ""
        verified = f"-verified{joint}{parameters['verify_cost']:g}"
    return (f"neuron-{parameters.get('score')}{objective}{retain}"
            f"{'' if layers == 'all' else f'-layers{layers}'}{verified}")


def neuron_profile_name(config: MemorizationCalibrationConfig, ratio: float, retain_weight: float) -> str:
    """The stem and the ratio; the defaults (no retain cost, all layers) give the names of profiles
    made before those options existed."""
    stem = neuron_profile_stem({"score": config.score, "record_objective": config.record_objective,
                                "retain_weight": retain_weight, "retain_form": config.retain_form,
                                "retain_measure": config.retain_measure, "layers": format_layers(config.layers),
                                "verify_cost": config.verify_cost, "verify_mode": config.verify_mode})
    return f"{stem}-{ratio:g}"


def calibrate_memorization(model, tokenizer, memorized: list[dict], config: MemorizationCalibrationConfig,
                           unseen: list[dict] | None = None,
                           reference: tuple[list[list[int]], list[list[int]]] | None = None,
                           verify_text: list[list[int]] | None = None,
                           subspace_text: list[list[int]] | None = None):
    """-> (list of (MemorizationProfile, parameters, quality) per granularity, ratio and (neuron masks)
    retain weight, report, stats (None when only subspaces are asked for)).
    reference: (scoring pieces, held-out pieces) of ordinary text; default WikiText-2 valid + Alpaca.
    verify_text: the pieces --verify-cost measures on; default the given scoring pieces, or else the
    first config.verify_sequences pieces of the default reference text (the scoring pieces are its
    first config.reference_sequences).
    subspace_text: the ordinary text the subspace granularity's statistics read; default the first
    config.subspace_sequences pieces of the default reference text."""
    from server.interventions.memorization import MemorizationProfile

    torch.manual_seed(config.seed)
    layers = model.config.num_hidden_layers
    intermediate = model.config.intermediate_size
    if config.layers is not None and not all(0 <= layer < layers for layer in config.layers):
        raise ValueError(f"layers {format_layers(config.layers)} outside the model's 0-{layers - 1}")
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if unseen is None:
        unseen = synthetic_records(config.unseen_records or len(memorized), config.unseen_seed + config.seed)
    mem_enc = [encode_record(tokenizer, r) for r in memorized]
    unseen_enc = [encode_record(tokenizer, r) for r in unseen]
    given_reference = reference is not None
    reference, heldout_text = reference or reference_pieces(
        tokenizer, config.data_dir, config.reference_sequences, config.reference_length, config.seed,
        config.heldout_reference_sequences)
    if config.verify_cost is not None and verify_text is None:
        # the first verify_sequences pieces of the same seeded text: the scoring pieces' first ones,
        # then more of it when the check asks for more pieces than the scores read
        verify_text = reference if given_reference else reference_pieces(
            tokenizer, config.data_dir, config.verify_sequences, config.reference_length, config.seed)[0]
    report: dict = {}
    stats = None  # the neuron statistics: masks need them, subspaces do not (a backward pass per batch)
    if any(g in ("neuron", "weight") for g in config.granularities):
        stats = collect_stats(model, {"memorized": mem_enc, "unseen": unseen_enc, "reference": reference},
                              pad_id, config.batch_size, layers, intermediate, config.record_objective,
                              per_position_effects=config.retain_measure == "taylor")
        down_weights = [layer.mlp.down_proj.weight.detach() for layer in model.model.layers]
        column_norms = torch.stack([w.norm(dim=0) for w in down_weights])  # [L, I]
        scores = neuron_scores(stats, column_norms, config.score)
        cost = retain_cost(stats, column_norms, config.retain_measure)
        spared, spare_counts = spared_neurons(stats, column_norms, config.spare_fraction, config.massive_factor)
        report.update({
            "sets": {name: {"tokens": s.tokens, "targets": s.targets,
                            "mean_effect_total": float(s.mean_effect.sum())} for name, s in stats.items()},
            "spared": spare_counts,
            # Does the plain baseline pick the neurons ordinary text needs? Share of its top 1% per layer
            # that the sparing rule protects.
            "activation_baseline_top1pct_spared": float(spared[choose_neurons(
                neuron_scores(stats, column_norms, "activation"), torch.zeros_like(spared), 0.01)].float().mean()),
        })
        logger.info("spared neurons: %s", spare_counts)
    before = measure(model, mem_enc, heldout_text, pad_id, config.batch_size)
    report["before"] = before
    report["heldout_reference"] = {"pieces": len(heldout_text), "scored_tokens": sum(len(t) - 2 for t in heldout_text)}
    if verify_text is not None:
        report["verify_text"] = {"pieces": len(verify_text), "scored_tokens": sum(len(t) - 2 for t in verify_text)}
    results = []
    # (layer, neuron) -> measured cost. A single neuron's cost holds for every profile; a joint cost
    # only for the ranking it was measured in (the ratios of one retain weight share one).
    single_costs: dict[tuple[int, int], float] = {}
    joint_checks: dict[float, tuple[dict[tuple[int, int], float], list[tuple[int, int]]]] = {}
    verify_base = reference_loss(model, verify_text, config.batch_size) if verify_text is not None else None

    def verified_choice(adjusted: torch.Tensor, ratio: float, retain_weight: float):
        """-> (chosen, spared now, the measured costs it was chosen by)."""
        if config.verify_mode == "single":
            measured = single_costs

            def cost_of(neurons):
                return ablation_costs(model, verify_text, config.batch_size, neurons)
        else:
            measured, accepted = joint_checks.setdefault(retain_weight, ({}, []))  # accepted: zeroed under later ones

            def cost_of(neurons):
                costs = ablation_costs(model, verify_text, config.batch_size, neurons, config.verify_cost, accepted)
                accepted.extend(n for n, c in zip(neurons, costs) if c <= config.verify_cost)
                return costs
        return (*choose_verified_neurons(adjusted, spared, ratio, config, cost_of, measured), measured)

    bases: dict[int, torch.Tensor] = {}
    if "subspace" in config.granularities:
        if subspace_text is None:
            subspace_text = reference if given_reference else reference_pieces(
                tokenizer, config.data_dir, config.subspace_sequences, config.reference_length, config.seed)[0]
        moments = subspace_moments(model, mem_enc, subspace_text, pad_id, config.batch_size)
        bases = subspace_bases(moments, config.ranks, config.subspace_ridge)
        report["subspace_text"] = {"pieces": len(subspace_text), "positions": moments.reference_tokens,
                                   "memorized_positions": moments.memorized_tokens}
    runs = [(g, r, w) for g in config.granularities
            for r in (config.ranks if g == "subspace" else config.ratios)
            for w in (config.retain_weights if g == "neuron" else (0.0,))]
    for granularity, ratio, retain_weight in tqdm(runs, desc="profiles", unit="profile"):
        if granularity == "subspace":
            rank = int(ratio)
            name = f"subspace-r{rank}"
            profile = MemorizationProfile(name, "subspace", layers, intermediate, basis=bases[rank],
                                          reference_mean=moments.reference_mean.float())
            parameters = {"ratio": rank / intermediate, "rank": rank, "ridge": config.subspace_ridge,
                          "recipe": "per layer, the top generalised eigenvectors of the memorized suffixes' "
                          "second moment about the reference mean against the reference covariance; "
                          "served as x - (x U - m U) U^T",
                          "subspace_sequences": len(subspace_text)}
        elif granularity == "neuron":
            adjusted = retain_adjusted(scores, cost, retain_weight, config.retain_form)
            refused: list[dict] = []
            if config.verify_cost is None:
                pruned = choose_neurons(adjusted, spared, ratio, config.allocation, config.layer_cap, config.layers)
            else:
                pruned, spared_now, measured = verified_choice(adjusted, ratio, retain_weight)
                refused = [{"layer": layer, "neuron": neuron, "cost_nats": round(measured[(layer, neuron)], 5)}
                           for layer, neuron in (spared_now & ~spared).nonzero().tolist()]
            name = neuron_profile_name(config, ratio, retain_weight)
            profile = MemorizationProfile(name, "neuron", layers, intermediate, pruned_neurons=pruned)
            parameters = {"ratio": ratio, "score": config.score, "allocation": config.allocation,
                          "record_objective": config.record_objective,
                          "spare_fraction": config.spare_fraction, "massive_factor": config.massive_factor,
                          "layer_cap": config.layer_cap, "retain_weight": retain_weight,
                          "retain_form": config.retain_form, "retain_measure": config.retain_measure,
                          "layers": format_layers(config.layers),
                          "per_layer": pruned.sum(1).tolist()}
            if config.verify_cost is not None:
                with _zeroed_columns(model, [tuple(n) for n in pruned.nonzero().tolist()]):
                    mask_cost = reference_loss(model, verify_text, config.batch_size) - verify_base
                parameters.update(verify_cost=config.verify_cost, verify_mode=config.verify_mode,
                                  verify_sequences=len(verify_text), verify_text_mask_cost_nats=round(mask_cost, 5),
                                  refused_for_cost=refused)
        else:
            index = weight_mask_indices(down_weights, stats["memorized"].input_norm,
                                        stats["reference"].input_norm, ratio,
                                        spared if config.weight_spare else None)
            name = f"weight-{ratio:g}" + ("-spared" if config.weight_spare else "")
            profile = MemorizationProfile(name, "weight", layers, intermediate, weight_index=index)
            parameters = {"ratio": ratio, "recipe": "per output row top ratio by |W_ij| ||X_j||_mem, "
                          "where it beats |W_ij| ||X_j||_ref", "spared_columns": config.weight_spare}
        after = measure(model, mem_enc, heldout_text, pad_id, config.batch_size, profile)
        quality = {"calibration_records_before": before, "calibration_records_after": after,
                   "pruned": profile.pruned_count}
        tqdm.write(f"{name}: pruned {profile.pruned_count}; exact extraction {before['exact_extraction']:.3f} -> "
                   f"{after['exact_extraction']:.3f}, held-out ppl {before['heldout_reference_ppl']:.2f} -> "
                   f"{after['heldout_reference_ppl']:.2f}"
                   + (f"; whole mask on the check text {parameters['verify_text_mask_cost_nats']:+.4f} nats, "
                      f"{len(parameters['refused_for_cost'])} refused" if "verify_text_mask_cost_nats" in parameters else ""))
        results.append((profile, parameters, quality))
    return results, report, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MemorizationCalibrationConfig()
    parser.add_argument("--model", default="default", help="Model to calibrate (as for serve). [default]")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="Calibration runs in float32 on the CPU (the model is small). [cpu]")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32"],
                        help="Calibration always runs in float32 (gradients). [float32]")
    parser.add_argument("--memorized", type=Path, required=True,
                        help="Text the model is known to have memorized: JSONL {prefix, suffix} or plain lines.")
    parser.add_argument("--reference", type=Path, default=None,
                        help="Ordinary text, one per line (default: WikiText-2 validation + Alpaca).")
    parser.add_argument("--unseen", type=Path, default=None,
                        help="Records of the same format the model never saw (default: fresh synthetic records).")
    parser.add_argument("--granularity", default="subspace", choices=["subspace", "neuron", "weight", "both"],
                        help="subspace: --rank directions per layer (docs/unmemorization.md: the best trade-off "
                             "measured); neuron: whole neurons (--ratio); weight: the paper's per-row weight "
                             "masks (--ratio); both: neuron and weight. [subspace]")
    parser.add_argument("--ratio", type=float, nargs="+", default=list(d.ratios),
                        help="Share pruned: of each layer's neurons, or of each down_proj row's weights.")
    parser.add_argument("--rank", type=int, nargs="+", default=list(d.ranks),
                        help=f"Subspace granularity: directions removed per layer, one profile each. "
                             f"[{' '.join(map(str, d.ranks))}]")
    parser.add_argument("--subspace-ridge", type=float, default=d.subspace_ridge,
                        help=f"Subspace granularity: ridge added to the reference covariance, as a share of "
                             f"its mean eigenvalue. [{d.subspace_ridge}]")
    parser.add_argument("--subspace-sequences", type=int, default=d.subspace_sequences, metavar="N",
                        help=f"Subspace granularity: pieces of ordinary text ({d.reference_length} tokens each) "
                             f"its reference mean and covariance read. [{d.subspace_sequences}]")
    parser.add_argument("--score", default=d.score, choices=SCORES)
    parser.add_argument("--allocation", default=d.allocation, choices=["uniform", "global"])
    parser.add_argument("--record-objective", default=d.record_objective, choices=["logodds", "nll"],
                        help="Effects on records: minus the target log-odds (does not saturate) or the loss.")
    parser.add_argument("--retain-weight", type=float, nargs="+", default=list(d.retain_weights), metavar="LAMBDA",
                        help="Neuron masks: trade the score against the cost on ordinary text (--retain-measure), "
                             "each on its own scale; one profile per value. 0: the score alone. [0]")
    parser.add_argument("--retain-form", default=d.retain_form, choices=RETAIN_FORMS,
                        help="difference: score - LAMBDA x cost; ratio (selective pruning): "
                             "score / cost^LAMBDA. [difference]")
    parser.add_argument("--retain-measure", default=d.retain_measure, choices=RETAIN_MEASURES,
                        help="Cost on ordinary text: first-order loss effect (positive part), RMS of the "
                             "per-position effects (taylor), or mean |activation| x column norm. [effect]")
    parser.add_argument("--layers", default="all",
                        help="Layers whose neurons may be pruned, e.g. 10-29 or 0-3,10-29. [all]")
    parser.add_argument("--verify-cost", type=float, default=None, metavar="NATS",
                        help="Neuron masks: zero each chosen neuron on ordinary text (--verify-mode) and refuse "
                             "(spare, then choose the next) those that raise its loss by more than NATS, e.g. 0.002. "
                             "About a second per neuron checked per 16 pieces of --verify-sequences on 2 cores. [off]")
    parser.add_argument("--verify-mode", default=d.verify_mode, choices=["single", "joint"],
                        help="single: each neuron zeroed alone; joint: the candidates in score order, each "
                             "zeroed on top of those accepted before it (removals interact: on our test model "
                             "92 neurons cost 1.8x the sum of their single costs; held out it was no better "
                             "than single there: docs/unmemorization.md). [single]")
    parser.add_argument("--verify-sequences", type=int, default=d.verify_sequences, metavar="N",
                        help=f"Pieces of ordinary text ({d.reference_length} tokens each) the cost check runs on: "
                             f"the first of the scoring pieces, then more of the same text. [{d.verify_sequences}]")
    parser.add_argument("--spare-fraction", type=float, default=d.spare_fraction)
    parser.add_argument("--massive-factor", type=float, default=d.massive_factor)
    parser.add_argument("--paper-weights", action="store_true",
                        help="Weight masks exactly as the paper: do not spare the neurons ordinary text needs.")
    parser.add_argument("--reference-sequences", type=int, default=d.reference_sequences, metavar="N",
                        help=f"Pieces of ordinary text ({d.reference_length} tokens each) the scores and the "
                             f"sparing rule read (default reference text only). [{d.reference_sequences}]")
    parser.add_argument("--heldout-reference-sequences", type=int, default=d.heldout_reference_sequences,
                        help=f"Held-out validation pieces ({d.reference_length} tokens each) for the before/after "
                             f"perplexity in each profile's header. [{d.heldout_reference_sequences}]")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: ../shared/data.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Output directory. Default: <cache>/profiles/<model name>/.")


def _reference_from_file(tokenizer, path: Path, count: int, length: int) -> list[list[int]]:
    ids = tokenizer("\n".join(l for l in Path(path).read_text().splitlines() if l.strip()),
                    add_special_tokens=False)["input_ids"]
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]


def run(args: argparse.Namespace) -> int:
    from server.interventions.memorization import save_memorization_profile
    from server.settings import default_cache_dir

    try:
        layers = parse_layers(args.layers)  # the syntax now, the range once the model is loaded
    except ValueError as e:
        print(f"neuronserve: {e}", file=sys.stderr)
        return 2
    if args.verify_cost is not None and args.verify_cost < 0:
        print("neuronserve: --verify-cost must be >= 0", file=sys.stderr)
        return 2
    if args.verify_sequences < 1:
        print("neuronserve: --verify-sequences must be >= 1", file=sys.stderr)
        return 2
    if args.subspace_sequences < 1 or args.subspace_ridge < 0:
        print("neuronserve: --subspace-sequences must be >= 1 and --subspace-ridge >= 0", file=sys.stderr)
        return 2
    if any(r < 1 for r in args.rank):
        print("neuronserve: --rank values must be >= 1", file=sys.stderr)
        return 2
    if any(w < 0 for w in args.retain_weight):
        print("neuronserve: --retain-weight must be >= 0", file=sys.stderr)
        return 2
    config = MemorizationCalibrationConfig(
        ratios=tuple(args.ratio), granularities=("neuron", "weight") if args.granularity == "both" else (args.granularity,),
        score=args.score, allocation=args.allocation, record_objective=args.record_objective, spare_fraction=args.spare_fraction,
        massive_factor=args.massive_factor, reference_sequences=args.reference_sequences,
        heldout_reference_sequences=args.heldout_reference_sequences, retain_weights=tuple(args.retain_weight),
        retain_form=args.retain_form, retain_measure=args.retain_measure, layers=layers, verify_cost=args.verify_cost,
        verify_mode=args.verify_mode, verify_sequences=args.verify_sequences,
        batch_size=args.batch_size, weight_spare=not args.paper_weights, seed=args.seed,
        ranks=tuple(sorted(set(args.rank))), subspace_ridge=args.subspace_ridge, subspace_sequences=args.subspace_sequences,
        **({"data_dir": args.data_dir} if args.data_dir else {}))
    if not args.memorized.is_file():
        print(f"neuronserve: --memorized {args.memorized} not found", file=sys.stderr)
        return 2
    if args.reference is None and not (config.data_dir / "wikitext2").is_dir():
        print(f"neuronserve: reference data not found under {config.data_dir} (--data-dir or --reference)",
              file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    model, tokenizer, fingerprint, name = load_float32_model(args.model)
    try:
        parse_layers(args.layers, model.config.num_hidden_layers)
    except ValueError as e:
        print(f"neuronserve: {e}", file=sys.stderr)
        return 2
    memorized = read_records(args.memorized)
    if not memorized:
        print(f"neuronserve: no records in {args.memorized}", file=sys.stderr)
        return 2
    unseen = read_records(args.unseen) if args.unseen else None
    reference, verify_text, subspace_text = None, None, None
    if args.reference is not None:
        scoring, heldout = config.reference_sequences, config.heldout_reference_sequences
        more = max(config.verify_sequences, config.subspace_sequences) - scoring
        pieces = _reference_from_file(tokenizer, args.reference, scoring + heldout + max(more, 0),
                                      config.reference_length)
        reference = (pieces[:scoring], pieces[scoring:scoring + heldout])
        # as with the default text: the scoring pieces, then more; never the held-out ones
        beyond = pieces[:scoring] + pieces[scoring + heldout:]
        verify_text, subspace_text = beyond[:config.verify_sequences], beyond[:config.subspace_sequences]
    results, report, _ = calibrate_memorization(model, tokenizer, memorized, config, unseen, reference, verify_text,
                                                subspace_text)
    from server.profiles import model_slug

    out = args.out or default_cache_dir() / "profiles" / model_slug(name)
    data = {"memorized": str(args.memorized), "memorized_records": len(memorized),
            "unseen": str(args.unseen) if args.unseen else f"synthetic seed {config.unseen_seed + config.seed}",
            "reference": str(args.reference) if args.reference else
            f"WikiText-2 validation + Alpaca, {config.reference_sequences} x {config.reference_length} tokens",
            "report": report}
    for profile, parameters, quality in results:
        path = save_memorization_profile(out / f"memorization-{profile.name}.safetensors", profile,
                                         model_fingerprint=fingerprint, model_name=name, parameters=parameters,
                                         data=data, quality=quality)
        print(f"wrote {path}")
    bar = calibration_side_bar(data["memorized_records"])
    for granularity in ("neuron", "subspace"):
        pick = calibration_side_pick([(profile.name, quality) for profile, _, quality in results
                                      if profile.granularity == granularity], min_cut=bar)
        if pick is not None:
            print(f"calibration-side pick ({granularity}): {pick} (bar {100 * bar:.0f}% for "
                  f"{data['memorized_records']} calibration records; docs/unmemorization.md: confirm it on "
                  f"records held out from calibration before relying on it)")
    return 0


def calibration_side_bar(calibration_records: int) -> float:
    """The calibration-side cut a profile must reach to be picked. The issue's target is an 80% cut
    held out; the bar keeps a margin for how far the calibration-side cut misses the held-out one.
    With 60 calibration records that was up to 12 points (bar 90%); with 120, 1-7 points. On three
    leaky models built after the 85% bar was set it met the target on two (where 90% missed on
    one) and missed on the third, where both bars took the same largest ratio (RESULTS.md, issue
    6, thirteenth and fourteenth sessions)."""
    return 0.85 if calibration_records >= 120 else 0.9


def calibration_side_pick(rows: list[tuple[str, dict]], min_cut: float) -> str | None:
    """The rule docs/unmemorization.md recommends, on calibration-side figures only: among profiles
    whose cut of the calibration records' exact extraction is at least `min_cut`, the one with the
    lowest held-out validation perplexity; if none reaches it, the largest cut. rows: (name, quality
    as a profile header stores it). -> 'name (cut -91%, validation perplexity +2.8%)', or None when
    nothing was extracted before (no cut to measure)."""
    scored = []
    for name, quality in rows:
        before, after = quality["calibration_records_before"], quality["calibration_records_after"]
        if before["exact_extraction"] <= 0:
            return None
        cut = 1 - after["exact_extraction"] / before["exact_extraction"]
        ppl_change = after["heldout_reference_ppl"] / before["heldout_reference_ppl"] - 1
        scored.append((name, cut, ppl_change))
    if not scored:
        return None
    reaching = [row for row in scored if row[1] >= min_cut - 1e-9]
    name, cut, ppl_change = (min(reaching, key=lambda row: row[2]) if reaching
                             else max(scored, key=lambda row: row[1]))
    how = "" if reaching else f"; none reached a {100 * min_cut:.0f}% cut"
    return f"{name} (cut {-100 * cut:.0f}%, validation perplexity {100 * ppl_change:+.1f}%{how})"
