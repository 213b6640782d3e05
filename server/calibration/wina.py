"""`neuronserve calibrate wina`: per-layer, per-projection WINA (or TEAL) score thresholds for a grid
of target sparsities, from the dense model's activations on calibration text.

Procedure (the same for both criteria, so they compare fairly):
1. Run the dense model over calibration sequences (Alpaca instructions with their answers, and the
   WikiText-2 validation split), and keep the inputs of every projection at a seeded random
   sample of token positions (position 0, the attention sink with its outsized norm, excluded).
2. Score every sampled input channel: |x_i| * ||W_p[:, i]||_2 for WINA, |x_i| for TEAL.
3. Uniform allocation: the threshold of projection p for target s is the s-quantile of its scores,
   so every projection skips a share s of its channels on calibration text.
   Greedy allocation (optional): within each layer, sparsity moves to the projections where it
   costs least. Starting dense, repeatedly raise by one step the projection whose relative output
   error ||W_p (x - x*mask)||^2 / ||W_p x||^2 grows least per weight skipped, until the layer's
   weight-averaged sparsity reaches each target. TEAL's greedy search minimises each block's output
   error; ours uses the projections' own output errors, which needs no extra forward passes.
4. Check on held-out validation text: the sparsity achieved and the loss, at a few targets.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from server.calibration.data import alpaca_texts, default_data_dir, wikitext_valid_text
from server.model.llama import LlamaDecoder
from server.model.sparsity import PROJECTIONS, SparseProjection, WinaTable, criterion_factors
from server.profiles import save_profile

logger = logging.getLogger(__name__)

GREEDY_STEP = 0.05
EVAL_LEVELS = (0.25, 0.5, 0.65)


@dataclass
class WinaCalibrationConfig:
    criteria: tuple[str, ...] = ("wina", "teal")
    allocations: tuple[str, ...] = ("uniform",)
    sequences_per_source: int = 48
    sequence_length: int = 256
    positions_per_sequence: int = 24
    greedy_rows: int = 512
    heldout_sequences: int = 8
    levels: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(19))  # 0 .. 0.9
    seed: int = 0
    data_dir: Path = field(default_factory=default_data_dir)


def calibration_sequences(tokenizer, config: WinaCalibrationConfig) -> tuple[list[list[int]], list[list[int]], dict]:
    """-> (calibration sequences, held-out sequences, a description of the data). Alpaca texts are
    joined with EOS and cut into sequence_length pieces; WikiText pieces start at seeded offsets.
    The held-out pieces come from the end of the validation split, which calibration never reads."""
    rng = random.Random(config.seed)
    L = config.sequence_length
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    texts = alpaca_texts(config.data_dir)
    rng.shuffle(texts)
    alpaca_ids: list[int] = []
    for text in texts:
        alpaca_ids.extend(tokenizer.encode(text, add_special_tokens=False) + [eos])
        if len(alpaca_ids) >= L * config.sequences_per_source:
            break
    alpaca = [alpaca_ids[i * L:(i + 1) * L] for i in range(config.sequences_per_source)]
    wiki_ids = tokenizer.encode(wikitext_valid_text(config.data_dir), add_special_tokens=False)
    heldout_start = len(wiki_ids) - config.heldout_sequences * L
    heldout = [wiki_ids[heldout_start + i * L: heldout_start + (i + 1) * L] for i in range(config.heldout_sequences)]
    offsets = sorted(rng.sample(range(0, heldout_start - L), config.sequences_per_source))
    wiki = [wiki_ids[o:o + L] for o in offsets]
    described = {
        "calibration": [
            {"source": "alpaca (AlpacaEval instructions + text-davinci-003 answers, seed tasks)",
             "sequences": len(alpaca), "tokens": sum(map(len, alpaca))},
            {"source": "wikitext2/wiki.valid.tokens", "sequences": len(wiki), "tokens": sum(map(len, wiki))},
        ],
        "heldout": {"source": "wikitext2/wiki.valid.tokens, last tokens (never in calibration)",
                    "tokens": sum(map(len, heldout))},
        "sampled_positions_per_sequence": config.positions_per_sequence,
    }
    return alpaca + wiki, heldout, described


class _InputRecorder:
    """Stands in for a SparsityPlan: every layer's projections run dense, and the inputs at the
    chosen positions are kept (a plain step of the forward pass, no hooks)."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.inputs: dict[tuple[int, str], list[torch.Tensor]] = {}

    def layer(self, index: int) -> "_LayerRecorder":
        return _LayerRecorder(self, index)


class _LayerRecorder:
    def __init__(self, recorder: _InputRecorder, index: int) -> None:
        self.recorder = recorder
        self.index = index

    def apply(self, projection: SparseProjection, x: torch.Tensor, dense) -> torch.Tensor:
        # x: [1, T, K]; kept per fused call, named by its columns in the [*, 7] tables
        rows = x[0, self.recorder.positions].float().cpu()  # [P, K]: thresholds are computed on the CPU
        self.recorder.inputs.setdefault((self.index, projection.columns), []).append(rows)
        return dense(x)


@dataclass(frozen=True)
class _Projection:
    weight: torch.Tensor  # [N_p, K] float32
    norms: torch.Tensor  # [K]: the score's factor, column norms for WINA, ones for TEAL
    columns: tuple[int, int]  # the fused call it belongs to (its recorded inputs' key)


def _layer_projections(model: LlamaDecoder, layer: int, criterion: str) -> dict[str, _Projection]:
    """The seven projections of one layer, in PROJECTIONS order, split out of the fused calls that
    attach_sparsity set up (q/k/v, o, gate/up, down)."""
    attn, mlp = model.layers[layer].attn, model.layers[layer].mlp
    names = iter(PROJECTIONS)
    projections = {}
    for fused in (attn.sparse_qkv, attn.sparse_o, mlp.sparse_gate_up, mlp.sparse_down):
        weight = fused.linear.weight.float().cpu()
        factors = criterion_factors(weight, fused.segments, fused.columns, criterion)  # [G, K]
        for part, factor in zip(weight.split(list(fused.segments)), factors):
            projections[next(names)] = _Projection(part, factor, fused.columns)
    return projections


def _quantile(sorted_scores: torch.Tensor, sparsity: float) -> float:
    """The threshold that makes a share `sparsity` of these (ascending) scores fall at or below it."""
    if sparsity <= 0:
        return 0.0
    n = sorted_scores.numel()
    index = min(n - 1, max(0, math.ceil(sparsity * n) - 1))
    return float(sorted_scores[index])


def _greedy_allocation(projections: dict[str, _Projection], inputs: dict[str, torch.Tensor],
                       sorted_scores: dict[str, torch.Tensor], levels: tuple[float, ...],
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (thresholds [S, 7], per-projection sparsity [S, 7]) for one layer."""
    steps = [round(GREEDY_STEP * i, 4) for i in range(int(round(0.95 / GREEDY_STEP)) + 1)]
    sizes = torch.tensor([float(projections[p].weight.numel()) for p in PROJECTIONS])
    share = sizes / sizes.sum()
    errors = torch.zeros(len(PROJECTIONS), len(steps))
    for pi, name in enumerate(PROJECTIONS):
        x = inputs[name][:rows]  # [R, K]
        w = projections[name].weight
        reference = (x @ w.t()).pow(2).sum()
        scores = x.abs() * projections[name].norms
        for si, s in enumerate(steps[1:], start=1):
            dropped = x * (scores <= _quantile(sorted_scores[name], s))
            errors[pi, si] = (dropped @ w.t()).pow(2).sum() / reference
    position = [0] * len(PROJECTIONS)
    thresholds = torch.zeros(len(levels), len(PROJECTIONS))
    allocation = torch.zeros(len(levels), len(PROJECTIONS))
    average = 0.0
    level_index = 1  # level 0 stays dense
    while level_index < len(levels):
        costs = [(errors[p, position[p] + 1] - errors[p, position[p]]) / share[p]
                 if position[p] + 1 < len(steps) else float("inf") for p in range(len(PROJECTIONS))]
        best = min(range(len(PROJECTIONS)), key=lambda p: costs[p])
        if costs[best] == float("inf"):
            raise ValueError(f"greedy allocation cannot reach sparsity {levels[level_index]}")
        gain = float(share[best]) * GREEDY_STEP
        while level_index < len(levels) and average + gain >= levels[level_index] - 1e-9:
            # the target falls inside this step: stop the chosen projection part-way
            current = [steps[position[p]] for p in range(len(PROJECTIONS))]
            current[best] += (levels[level_index] - average) / float(share[best])
            allocation[level_index] = torch.tensor(current)
            thresholds[level_index] = torch.tensor(
                [_quantile(sorted_scores[p], s) for p, s in zip(PROJECTIONS, current)])
            level_index += 1
        position[best] += 1
        average += gain
    return thresholds, allocation


def calibrate_wina(model: LlamaDecoder, tokenizer, config: WinaCalibrationConfig) -> dict[str, dict]:
    """-> {profile name: {"table": WinaTable, "allocation": [S, L, 7], "data": ..., "parameters": ...}}"""
    sequences, heldout, described = calibration_sequences(tokenizer, config)
    return calibrate_wina_on(model, sequences, heldout, described, config)


def calibrate_wina_on(model: LlamaDecoder, sequences: list[list[int]], heldout: list[list[int]], described: dict,
                      config: WinaCalibrationConfig) -> dict[str, dict]:
    """calibrate_wina on token sequences already chosen (`described` says where they came from)."""
    torch.manual_seed(config.seed)
    L = model.config.num_layers
    device = model.device
    # projections must exist for the recorder to stand in their place; thresholds are unused
    model.attach_sparsity(WinaTable("teal", torch.tensor([0.0, 1.0]), torch.zeros(2, L, 7)), cpu_kernel=None)
    recorder = _InputRecorder()
    cache = model.new_cache(1)
    rng = torch.Generator().manual_seed(config.seed)
    for seq in tqdm(sequences, desc="calibrate wina: activations", unit="seq"):
        T = len(seq)
        count = min(config.positions_per_sequence, T - 1)
        recorder.positions = (1 + torch.randperm(T - 1, generator=rng)[:count]).to(device)
        model(torch.tensor([seq], device=device), torch.zeros(1, dtype=torch.long, device=device),
              torch.zeros(1, dtype=torch.long, device=device), cache, sparsity=recorder)
    calls = {key: torch.cat(rows) for key, rows in recorder.inputs.items()}  # (layer, columns) -> [P, K]
    levels = torch.tensor(config.levels, dtype=torch.float32)
    profiles = {}
    for criterion in config.criteria:
        per_allocation = {a: (torch.zeros(len(levels), L, 7), torch.zeros(len(levels), L, 7))
                          for a in config.allocations}
        for layer in tqdm(range(L), desc=f"calibrate wina: {criterion} thresholds", unit="layer"):
            projections = _layer_projections(model, layer, criterion)
            inputs = {p: calls[(layer, projections[p].columns)] for p in PROJECTIONS}
            sorted_scores = {p: (inputs[p].abs() * projections[p].norms).flatten().sort().values
                             for p in PROJECTIONS}
            for allocation, (thresholds, shares) in per_allocation.items():
                if allocation == "uniform":
                    for si, s in enumerate(config.levels):
                        thresholds[si, layer] = torch.tensor([_quantile(sorted_scores[p], s) for p in PROJECTIONS])
                        shares[si, layer] = s
                else:
                    thresholds[:, layer], shares[:, layer] = _greedy_allocation(
                        projections, inputs, sorted_scores, config.levels, config.greedy_rows)
        for allocation, (thresholds, shares) in per_allocation.items():
            profiles[f"{criterion}-{allocation}"] = {
                "table": WinaTable(criterion, levels, thresholds), "allocation": shares,
                "data": described,
                "parameters": {"criterion": criterion, "allocation": allocation, "levels": list(config.levels),
                               "sequence_length": config.sequence_length, "seed": config.seed,
                               "positions_per_sequence": config.positions_per_sequence,
                               "greedy_step": GREEDY_STEP if allocation == "greedy" else None,
                               "greedy_rows": config.greedy_rows if allocation == "greedy" else None},
            }
    for name, profile in profiles.items():
        profile["quality"] = heldout_quality(model, profile["table"], heldout, name) if heldout else {}
    return profiles


@torch.inference_mode()
def heldout_quality(model: LlamaDecoder, table: WinaTable, heldout: list[list[int]], label: str) -> dict:
    """Loss and achieved sparsity on held-out validation text at a few targets (masked dense path:
    the same numbers the kernels give)."""
    model.attach_sparsity(table, cpu_kernel=None)
    cache = model.new_cache(1)
    zero = torch.zeros(1, dtype=torch.long, device=model.device)
    results = {}
    for target in tqdm((0.0, *EVAL_LEVELS), desc=f"calibrate wina: held-out check {label}", unit="level"):
        nll, count, achieved = 0.0, 0, []
        for seq in heldout:
            tokens = torch.tensor([seq], device=model.device)
            plan = model.sparsity_plan([target], len(seq))
            logits = model(tokens, zero, zero, cache, all_logits=True, sparsity=plan)
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum"))
            count += len(seq) - 1
            if plan is not None:
                achieved.append(float(plan.skipped_fraction()[0]))
        results[f"{target:.2f}"] = {
            "heldout_nll": nll / count, "heldout_ppl": math.exp(nll / count),
            "achieved_sparsity": sum(achieved) / len(achieved) if achieved else 0.0,
        }
    return results


def write_profiles(profiles: dict[str, dict], out_dir: Path, fingerprint: str, model_name: str) -> list[Path]:
    paths = []
    for name, profile in profiles.items():
        table: WinaTable = profile["table"]
        paths.append(save_profile(
            out_dir / f"wina-{name}.safetensors", method="wina", name=name, model_fingerprint=fingerprint,
            model_name=model_name,
            tensors={"levels": table.levels, "thresholds": table.thresholds, "allocation": profile["allocation"]},
            parameters=profile["parameters"], data=profile["data"], quality=profile["quality"]))
    return paths
