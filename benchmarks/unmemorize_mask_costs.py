"""What a memorization profile's neurons cost on ordinary text, measured (issue 6, a diagnostic).

For each profile: the rise of the mean next-token loss (nats) when all its neurons are zeroed at
once, on the calibration's reference pieces (WikiText-2 validation and Alpaca, 64 tokens each,
seed 0, `--pieces` of them: 64 by default, of which `calibrate memorization --verify-cost` checks on
the first 16 unless given `--verify-sequences`; position 0 not predicted from), and with `--singles` also each neuron's cost alone (the calibration's own
`ablation_costs`) and their sum: is the whole mask's cost the sum of its neurons' costs?

    python benchmarks/unmemorize_mask_costs.py PROFILE [PROFILE ...] --singles --out results/NAME

Writes NAME.json and NAME.txt.
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

from server.calibration.data import default_data_dir
from server.calibration.memorization import (
    _zeroed_columns,
    ablation_costs,
    load_float32_model,
    reference_loss,
    reference_pieces,
)
from server.interventions.memorization import MemorizationProfile
from server.profiles import load_profile
from server.settings import default_cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", type=Path, nargs="+", help="memorization-*.safetensors (neuron masks)")
    parser.add_argument("--model", default=str(default_cache_dir() / "leaky-smollm2"))
    parser.add_argument("--pieces", type=int, default=64, help="64-token pieces of reference text. [64]")
    parser.add_argument("--singles", action="store_true", help="Also each neuron alone (seconds per neuron).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="Output path without suffix.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, fingerprint, name = load_float32_model(args.model)
    pieces = reference_pieces(tokenizer, default_data_dir(), args.pieces, 64, 0)[0]
    base = reference_loss(model, pieces, args.batch_size)
    rows = []
    for path in args.profiles:
        started = time.time()
        profile = MemorizationProfile.from_profile(load_profile(path))
        if profile.granularity != "neuron":
            parser.error(f"{path}: a {profile.granularity} profile; only neuron masks are measured")
        neurons = [tuple(n) for n in profile.pruned_neurons.nonzero().tolist()]
        with _zeroed_columns(model, neurons):
            joint = reference_loss(model, pieces, args.batch_size) - base
        row = {"profile": profile.name, "neurons": len(neurons), "mask_cost_nats": joint,
               "mask_ppl_change": math.exp(joint) - 1}
        if args.singles:
            singles = ablation_costs(model, pieces, args.batch_size, neurons)
            row.update(sum_of_single_costs=sum(singles), mask_over_sum=joint / sum(singles) if sum(singles) else None,
                       single_costs=sorted(([l, n, c] for (l, n), c in zip(neurons, singles)), key=lambda r: -r[2]))
        row["seconds"] = round(time.time() - started, 1)
        rows.append(row)
        print(f"{row['profile']}: {len(neurons)} neurons, whole mask {joint:+.4f} nats "
              f"({100 * row['mask_ppl_change']:+.2f}% ppl)"
              + (f", sum of single costs {row['sum_of_single_costs']:+.4f}" if args.singles else ""), flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "model": f"{name} ({fingerprint})",
              "text": f"{len(pieces)} x 64 tokens, reference_pieces(seed 0)", "base_loss": base, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"{result['model']}; {result['text']}; base loss {base:.4f} nats", "",
             "| profile | neurons | whole mask (nats) | ppl change | sum of single costs | whole / sum |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        singles = (f"{r['sum_of_single_costs']:+.4f} | {r['mask_over_sum']:.2f}" if "sum_of_single_costs" in r
                   else "- | -")
        lines.append(f"| {r['profile']} | {r['neurons']} | {r['mask_cost_nats']:+.4f} | "
                     f"{100 * r['mask_ppl_change']:+.2f}% | {singles} |")
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
