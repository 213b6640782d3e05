"""Zero- or mean-ablation of a memorization profile's neurons (issue 6): does replacing a pruned
neuron's activation by its mean on ordinary text, instead of 0, cost less perplexity for the same
cut in extraction?

Mean-ablation keeps each pruned neuron's average contribution to the residual stream (a constant
`W_down[:, j] * mean_j`), which zero-ablation removes; where that average matters to ordinary
text, mean-ablation should cost less. Measured here on the leaky model, for the given neuron
profiles, with forward pre-hooks on transformers' `down_proj` (an experiment, not the serving path):
  mean activation  per neuron, over 64 reference pieces of 64 tokens (WikiText-2 validation and
                   Alpaca, the calibration's own reference text; position 0 left out)
  perplexity       WikiText-2 test, the first --wikitext-tokens tokens in windows of 512
  extraction       greedy suffix of each held-out record (transformers' generate) equals the secret

    python benchmarks/unmemorize_fill.py --profiles neuron-attribution-logodds-0.0025 \\
        neuron-attribution-logodds-0.005 neuron-attribution-logodds-0.01

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
from server.calibration.memorization import encode_record, load_float32_model, read_records, reference_pieces
from server.profiles import load_profile
from server.settings import default_cache_dir

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "unmemorize_fill.json"


class DownProjInputs:
    """Forward pre-hooks on every layer's down_proj: sum the inputs (to take means), or replace the
    pruned neurons' inputs by 0 or by a fill value."""

    def __init__(self, layers) -> None:
        self.collecting = False
        self.sums: list[torch.Tensor | None] = [None] * len(layers)
        self.count = 0
        self.pruned: torch.Tensor | None = None  # [layers, intermediate] bool
        self.fill: torch.Tensor | None = None  # [layers, intermediate], None: zeros
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module, args):
            act = args[0]  # [B, T, intermediate]
            if self.collecting:
                flat = act[:, 1:].reshape(-1, act.shape[-1]).double()
                self.sums[index] = flat.sum(0) if self.sums[index] is None else self.sums[index] + flat.sum(0)
                if index == 0:
                    self.count += flat.shape[0]
            if self.pruned is None or not bool(self.pruned[index].any()):
                return None
            keep = self.pruned[index]
            act = act.clone()
            act[..., keep] = 0.0 if self.fill is None else self.fill[index][keep].to(act.dtype)
            return (act,)
        return hook

    def means(self) -> torch.Tensor:
        return torch.stack([(s / self.count).float() for s in self.sums])  # [layers, intermediate]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_cache_dir() / "leaky-smollm2"))
    parser.add_argument("--profile-dir", type=Path, default=default_cache_dir() / "profiles" / "leaky-smollm2")
    parser.add_argument("--profiles", nargs="+", required=True, help="neuron profile names (memorization-<name>)")
    parser.add_argument("--wikitext-tokens", type=int, default=8192)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    started = time.time()
    model, tokenizer, fingerprint, name = load_float32_model(args.model)
    hooks = DownProjInputs(model.model.layers)
    reference, _ = reference_pieces(tokenizer, data_dir, 64, 64, 0)
    hooks.collecting = True
    with torch.inference_mode():
        for start in range(0, len(reference), 16):
            model(torch.tensor(reference[start:start + 16]))
    hooks.collecting = False
    means = hooks.means()
    test_ids = tokenizer((data_dir / "wikitext2" / "wiki.test.tokens").read_text(), add_special_tokens=False)["input_ids"]
    windows = [test_ids[i:i + 512] for i in range(0, min(args.wikitext_tokens, len(test_ids)) - 511, 512)]
    records = [encode_record(tokenizer, r) for r in read_records(Path(args.model) / "records_heldout.jsonl")]

    rows = []

    def measure(profile: str, fill: str, pruned: torch.Tensor | None) -> None:
        hooks.pruned, hooks.fill = pruned, (means if fill == "mean" else None)
        row = {"profile": profile, "fill": fill, "pruned": 0 if pruned is None else int(pruned.sum()),
               "wikitext2_ppl": perplexity(model, windows), "extracted": extraction_rate(model, records)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    measure("none", "-", None)
    for profile in args.profiles:
        raw = load_profile(args.profile_dir / f"memorization-{profile}.safetensors")
        raw.check_model(fingerprint, name)
        pruned = raw.tensors["pruned"].bool()
        for fill in ("zero", "mean"):
            measure(profile, fill, pruned)
    base = rows[0]
    for row in rows:
        row["ppl_change"] = row["wikitext2_ppl"] / base["wikitext2_ppl"] - 1
        row["extraction_cut"] = 1 - row["extracted"] / base["extracted"] if base["extracted"] else None
    table = format_table(["profile", "fill", "pruned", "WT2 ppl", "ppl", "extracted", "cut"], [
        [r["profile"], r["fill"], str(r["pruned"]), f"{r['wikitext2_ppl']:.2f}", f"{100 * r['ppl_change']:+.1f}%",
         f"{100 * r['extracted']:.1f}%", "-" if r["profile"] == "none" else f"{-100 * r['extraction_cut']:+.0f}%"]
        for r in rows])
    text = (f"unmemorize_fill: {name}, {len(records)} held-out records, {sum(len(w) - 1 for w in windows)} "
            f"WikiText-2 test tokens scored, float32\n{table}")
    report = {"benchmark": "unmemorize_fill", "command": " ".join(["python", *sys.argv]), "model": args.model,
              "heldout_records": len(records), "wikitext2_tokens_scored": sum(len(w) - 1 for w in windows),
              "reference": "64 x 64 tokens, reference_pieces(seed 0)", "rows": rows,
              "seconds": round(time.time() - started), "machine": describe_machine()}
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
