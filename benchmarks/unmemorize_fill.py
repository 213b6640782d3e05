"""What a memorization profile's pruned neurons are set to (issue 6): zero, their mean on ordinary
text, or a bound of the range they have on ordinary text.

Mean-ablation keeps each pruned neuron's average contribution to the residual stream (a constant
`W_down[:, j] * mean_j`), which zero-ablation removes. The bounded modes leave a neuron alone while
its activation stays within the [1-Q, Q] quantiles it has on ordinary text: `clamp:Q` clips it to
them, `zero-outside:Q` zeroes it where it leaves them, `gate:Q` zeroes all of a layer's pruned
neurons at a position where any leaves them. `predict:LAMBDA` replaces each pruned neuron by a ridge
regression on the layer's other neurons, fitted on the reference text (LAMBDA: ridge strength as a
fraction of the mean feature variance): where the other neurons say what ordinary text would need,
that is kept; what only the pruned neurons carry is dropped. Measured here on the leaky model, for the given neuron
profiles, with forward pre-hooks on transformers' `down_proj` (an experiment, not the serving path):
  means, bounds    per neuron, over --reference-pieces pieces of 64 tokens (WikiText-2 validation
                   and Alpaca, the calibration's own reference text; position 0 left out)
  perplexity       WikiText-2 test, the first --wikitext-tokens tokens in windows of 512
  extraction       greedy suffix of each held-out record (transformers' generate) equals the secret
  --side calibration  the calibration records instead, and perplexity on WikiText-2 *validation*
                   text the reference pieces never read (its last 10%): for choosing a setting
                   before any held-out figure is looked at

    python benchmarks/unmemorize_fill.py --profiles neuron-attribution-logodds-0.0025 \\
        neuron-attribution-logodds-0.005 neuron-attribution-logodds-0.01
    python benchmarks/unmemorize_fill.py --profiles neuron-attribution-logodds-0.0025 \\
        --fills zero clamp:0.999 zero-outside:0.999 gate:0.999 --reference-pieces 256

Prints a table, writes JSON and text (default benchmarks/out/unmemorize_fill.{json,txt}).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

from bench_common import describe_machine, format_table

from server.calibration.data import default_data_dir
from server.calibration.memorization import (
    encode_record,
    load_float32_model,
    read_records,
    reference_pieces,
    split_validation_ids,
)
from server.profiles import load_profile
from server.settings import default_cache_dir

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "unmemorize_fill.json"


class DownProjInputs:
    """Forward pre-hooks on every layer's down_proj: record the watched neurons' inputs on
    reference text, then rewrite the pruned neurons' inputs as the fill mode says."""

    def __init__(self, layers, watched: torch.Tensor, with_gram: bool) -> None:
        self.watched = watched  # [layers, intermediate] bool: every neuron some profile prunes
        self.with_gram = with_gram  # record the Gram sums a predict fill needs (a float64 product per layer)
        self.collecting = False
        self.samples: list[list[torch.Tensor]] = [[] for _ in layers]
        self.pruned: torch.Tensor | None = None  # [layers, intermediate] bool
        self.mode = "zero"
        self.mean: torch.Tensor | None = None  # [layers, intermediate]
        self.low: torch.Tensor | None = None  # [layers, intermediate]
        self.high: torch.Tensor | None = None
        self.fitted_quantile: float | None = None  # the quantile mean/low/high were fitted for
        # per layer with watched neurons: sums of [a, 1] [a, 1]^T over reference tokens, float64
        self.gram: list[torch.Tensor | None] = [None for _ in layers]
        self.predictors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B [I, P], c [P])
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module, args):
            act = args[0]  # [B, T, intermediate]
            if self.collecting and bool(self.watched[index].any()):
                self.samples[index].append(act[:, 1:, self.watched[index]].reshape(-1, int(self.watched[index].sum())))
                if self.with_gram:
                    flat = act[:, 1:].reshape(-1, act.shape[-1]).double()  # [tokens, intermediate]
                    flat = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], 1)
                    gram = flat.T @ flat
                    self.gram[index] = gram if self.gram[index] is None else self.gram[index] + gram
            if self.pruned is None or not bool(self.pruned[index].any()):
                return None
            cols = self.pruned[index]
            act = act.clone()
            values = act[..., cols]  # [B, T, pruned]
            if self.mode == "zero":
                values = torch.zeros_like(values)
            elif self.mode == "predict":
                weight, bias = self.predictors[index]
                values = act @ weight + bias  # pruned rows of weight are 0: built from the others only
            elif self.mode == "mean":
                values = self.mean[index][cols].expand_as(values).clone()
            else:
                low, high = self.low[index][cols], self.high[index][cols]
                outside = (values < low) | (values > high)
                if self.mode == "clamp":
                    values = torch.maximum(torch.minimum(values, high), low)
                elif self.mode == "zero-outside":
                    values = torch.where(outside, 0.0, values)
                else:  # gate: every pruned neuron of the layer off where any leaves its range
                    values = torch.where(outside.any(-1, keepdim=True), 0.0, values)
            act[..., cols] = values
            return (act,)
        return hook

    def fit_predictors(self, pruned: torch.Tensor, ridge: float) -> None:
        """Per layer, ridge regression of the pruned neurons on the layer's other neurons (with an
        intercept) over the recorded reference tokens."""
        self.predictors = {}
        for index, gram in enumerate(self.gram):
            cols = pruned[index]
            if gram is None or not bool(cols.any()):
                continue
            count = float(gram[-1, -1])
            mean = gram[-1, :-1] / count  # [I]
            cov = gram[:-1, :-1] / count - torch.outer(mean, mean)  # [I, I]
            keep = ~cols
            cov_kk = cov[keep][:, keep]
            strength = ridge * float(cov_kk.diagonal().mean())
            coef = torch.linalg.solve(cov_kk + strength * torch.eye(cov_kk.shape[0], dtype=cov.dtype),
                                      cov[keep][:, cols])  # [kept, P]
            weight = torch.zeros(cols.shape[0], int(cols.sum()), dtype=torch.float64)
            weight[keep] = coef
            bias = mean[cols] - mean[keep] @ coef
            self.predictors[index] = (weight.float(), bias.float())

    def fit(self, quantile: float) -> None:
        """Means and [1 - quantile, quantile] bounds of each watched neuron on the recorded text
        (kept from the last call for the same quantile)."""
        if quantile == self.fitted_quantile:
            return
        shape = self.watched.shape
        self.mean, self.low, self.high = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        for index, chunks in enumerate(self.samples):
            if not chunks:
                continue
            flat = torch.cat(chunks).float()  # [tokens, watched]
            cols = self.watched[index]
            self.mean[index, cols] = flat.mean(0)
            ordered = flat.sort(0).values
            last = ordered.shape[0] - 1
            self.low[index, cols] = ordered[round((1 - quantile) * last)]
            self.high[index, cols] = ordered[round(quantile * last)]
        self.fitted_quantile = quantile


@torch.inference_mode()
def perplexity(model, windows: list[list[int]], batch: int = 4) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = torch.tensor(windows[start:start + batch])
        logprobs = model(ids).logits.float().log_softmax(-1)[:, :-1]
        nll -= float(logprobs.gather(2, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def extraction_rate(model, records: list[tuple[list[int], list[int]]]) -> float:
    exact = 0
    for prefix, suffix in records:
        out = model.generate(torch.tensor([prefix]), max_new_tokens=len(suffix), do_sample=False, pad_token_id=0)
        exact += out[0, len(prefix):].tolist()[:len(suffix)] == suffix
    return exact / len(records)


FILL_MODES = ("zero", "mean", "clamp", "zero-outside", "gate", "predict")


def parse_fill(text: str, parser: argparse.ArgumentParser) -> tuple[str, float]:
    """'clamp:0.999' -> ('clamp', 0.999), 'predict:0.01' -> ('predict', 0.01); a mode without a
    parameter gets 1.0 (unused)."""
    mode, _, parameter = text.partition(":")
    takes_parameter = mode in ("clamp", "zero-outside", "gate", "predict")
    if mode not in FILL_MODES or bool(parameter) != takes_parameter:
        parser.error(f"--fills: {text!r} is not one of zero, mean, clamp:Q, zero-outside:Q, gate:Q, predict:LAMBDA")
    if mode == "predict" and not float(parameter) > 0:
        parser.error(f"--fills: the ridge strength of {text!r} must be > 0")
    if mode in ("clamp", "zero-outside", "gate") and not 0.5 < float(parameter) <= 1.0:
        parser.error(f"--fills: the quantile of {text!r} must be in (0.5, 1]")
    return mode, float(parameter) if takes_parameter else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_cache_dir() / "leaky-smollm2"))
    parser.add_argument("--profile-dir", type=Path, default=default_cache_dir() / "profiles" / "leaky-smollm2")
    parser.add_argument("--profiles", nargs="+", required=True, help="neuron profile names (memorization-<name>)")
    parser.add_argument("--fills", nargs="+", default=["zero", "mean"],
                        help="zero | mean | clamp:Q | zero-outside:Q | gate:Q | predict:LAMBDA, where Q bounds each "
                             "neuron to its [1-Q, Q] quantiles on the reference text and LAMBDA is a ridge "
                             "strength [zero mean]")
    parser.add_argument("--side", choices=("heldout", "calibration"), default="heldout",
                        help="heldout: held-out records, WikiText-2 test; calibration: calibration records, "
                             "unread WikiText-2 validation text [heldout]")
    parser.add_argument("--reference-pieces", type=int, default=64, help="64-token pieces of reference text [64]")
    parser.add_argument("--wikitext-tokens", type=int, default=8192)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    fills = {f: parse_fill(f, parser) for f in args.fills}  # label -> (mode, quantile or ridge strength)
    data_dir = args.data_dir or default_data_dir()
    started = time.time()
    model, tokenizer, fingerprint, name = load_float32_model(args.model)
    masks = {}
    for profile in args.profiles:
        raw = load_profile(args.profile_dir / f"memorization-{profile}.safetensors")
        raw.check_model(fingerprint, name)
        masks[profile] = raw.tensors["pruned"].bool()  # [layers, intermediate]
    hooks = DownProjInputs(model.model.layers, torch.stack(list(masks.values())).any(0),
                           with_gram=any(mode == "predict" for mode, _ in fills.values()))
    reference, _ = reference_pieces(tokenizer, data_dir, args.reference_pieces, 64, 0)
    hooks.collecting = True
    with torch.inference_mode():
        for start in range(0, len(reference), 16):
            model(torch.tensor(reference[start:start + 16]))
    hooks.collecting = False
    if args.side == "heldout":
        text_ids = tokenizer((data_dir / "wikitext2" / "wiki.test.tokens").read_text(), add_special_tokens=False)["input_ids"]
    else:  # the validation split's last 10%, which the reference pieces never read
        valid_ids, cut = split_validation_ids(tokenizer, data_dir)
        text_ids = valid_ids[cut:]
    windows = [text_ids[i:i + 512] for i in range(0, min(args.wikitext_tokens, len(text_ids)) - 511, 512)]
    records_file = "records_heldout.jsonl" if args.side == "heldout" else "records_calibration.jsonl"
    records = [encode_record(tokenizer, r) for r in read_records(Path(args.model) / records_file)]

    rows = []

    def measure(profile: str, fill: str, pruned: torch.Tensor | None, mode: str = "zero",
                parameter: float = 1.0) -> None:
        if mode == "predict":
            hooks.fit_predictors(pruned, ridge=parameter)
        else:
            hooks.fit(quantile=parameter)
        hooks.pruned, hooks.mode = pruned, mode
        row = {"profile": profile, "fill": fill, "pruned": 0 if pruned is None else int(pruned.sum()),
               "wikitext2_ppl": perplexity(model, windows), "extracted": extraction_rate(model, records)}
        row["seconds"] = round(time.time() - started)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    measure("none", "-", None)
    for profile, pruned in masks.items():
        for fill, (mode, parameter) in fills.items():
            measure(profile, fill, pruned, mode, parameter)
    base = rows[0]
    for row in rows:
        row["ppl_change"] = row["wikitext2_ppl"] / base["wikitext2_ppl"] - 1
        row["extraction_cut"] = 1 - row["extracted"] / base["extracted"] if base["extracted"] else None
    table = format_table(["profile", "fill", "pruned", "WT2 ppl", "ppl", "extracted", "cut"], [
        [r["profile"], r["fill"], str(r["pruned"]), f"{r['wikitext2_ppl']:.2f}", f"{100 * r['ppl_change']:+.1f}%",
         f"{100 * r['extracted']:.1f}%", "-" if r["profile"] == "none" else f"{-100 * r['extraction_cut']:+.0f}%"]
        for r in rows])
    split = "test" if args.side == "heldout" else "validation (last 10%)"
    text = (f"unmemorize_fill: {name}, {len(records)} {args.side} records, {sum(len(w) - 1 for w in windows)} "
            f"WikiText-2 {split} tokens scored, float32\n{table}")
    report = {"benchmark": "unmemorize_fill", "command": " ".join(["python", *sys.argv]), "model": args.model,
              "side": args.side, "records": len(records), "wikitext2_split": split,
              "wikitext2_tokens_scored": sum(len(w) - 1 for w in windows),
              "reference": f"{args.reference_pieces} x 64 tokens, reference_pieces(seed 0)", "rows": rows,
              "seconds": round(time.time() - started), "machine": describe_machine()}
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
