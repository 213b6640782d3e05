"""Measured single-neuron ablation costs of a memorization profile's neurons (issue 6, a diagnostic).

For each neuron of the profile: zero it alone (its down_proj column, as the calibration does);
cost = rise of the mean next-token loss on 32 x 64 tokens of the calibration's reference text
(WikiText-2 validation + Alpaca, every next token, the one predicted from position 0 included; the
calibration's reference_loss leaves that one out), effect = fall of the mean log-prob
of the calibration records' suffix tokens (teacher forced). Then the neurons are added in
effect / cost order and the joint figures printed; a profile per size is written (rescored-N).
This is how the two neurons that carry most of the profiles' perplexity cost were found; the
calibration's `--verify-cost` does the cost half of it for every chosen neuron.

    python benchmarks/unmemorize_neuron_costs.py POOL_PROFILE OUT_DIR   # ~3-6 s per neuron, 2 threads

Writes OUT_DIR/rescore.json (per neuron: layer, neuron, cost, effect, acc_drop).
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
    _batch_records,
    _zeroed_columns,
    encode_record,
    load_float32_model,
    read_records,
    reference_pieces,
)
from server.interventions.memorization import (
    MemorizationProfile,
    save_memorization_profile,
)
from server.profiles import load_profile
from server.settings import default_cache_dir

JOINT_SIZES = (5, 10, 20, 30, 45, 60, 90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool_profile", type=Path, help="memorization-*.safetensors whose neurons are measured")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default=str(default_cache_dir() / "leaky-smollm2"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, fingerprint, name = load_float32_model(args.model)
    reference = torch.tensor(reference_pieces(tokenizer, default_data_dir(), 32, 64, 0)[0])  # [32, 64]
    records = [encode_record(tokenizer, r) for r in read_records(Path(args.model) / "records_calibration.jsonl")]
    ids, select, targets = _batch_records(records, pad_id=0)  # right-padded: causal attention never sees the pads

    @torch.inference_mode()
    def reference_nll() -> float:
        total = 0.0
        for start in range(0, len(reference), 16):
            x = reference[start:start + 16]
            logprobs = model(x).logits.float().log_softmax(-1)[:, :-1]
            total -= float(logprobs.gather(2, x[:, 1:, None]).sum())
        return total / (reference.shape[0] * (reference.shape[1] - 1))

    @torch.inference_mode()
    def record_logprob() -> tuple[float, float]:
        """(mean log-prob of the suffix tokens, share of them still the argmax)."""
        logprobs = model(ids).logits[select].float().log_softmax(-1)  # [suffix tokens, vocab]
        picked = logprobs.gather(1, targets[:, None])
        return float(picked.mean()), float((logprobs.argmax(-1) == targets).float().mean())

    pool = load_profile(args.pool_profile).tensors["pruned"].bool()  # [layers, intermediate]
    candidates = [tuple(x) for x in pool.nonzero().tolist()]
    started = time.time()
    base_ref, (base_lp, base_acc) = reference_nll(), record_logprob()
    print(f"base reference nll {base_ref:.4f}, record log-prob {base_lp:.4f}, argmax {base_acc:.4f}; "
          f"{len(candidates)} neurons", flush=True)
    rows = []
    for n, (layer, neuron) in enumerate(candidates):
        with _zeroed_columns(model, [(layer, neuron)]):
            ref, (lp, acc) = reference_nll(), record_logprob()
        rows.append({"layer": layer, "neuron": neuron, "cost": ref - base_ref, "effect": base_lp - lp,
                     "acc_drop": base_acc - acc})
        if n % 10 == 0:
            print(n, rows[-1], f"{time.time() - started:.0f}s", flush=True)
    (args.out_dir / "rescore.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "model": f"{name} ({fingerprint})", "base_ref": base_ref,
         "base_lp": base_lp, "rows": rows}, indent=1) + "\n")
    order = sorted(rows, key=lambda r: -r["effect"] / max(r["cost"], 1e-4))
    print("top by cost:", [(r["layer"], r["neuron"], round(r["effect"], 3), round(r["cost"], 4))
                           for r in sorted(rows, key=lambda r: -r["cost"])[:10]])
    for size in (s for s in JOINT_SIZES if s <= len(order)):
        chosen = [(r["layer"], r["neuron"]) for r in order[:size]]
        with _zeroed_columns(model, chosen):
            ref, (lp, acc) = reference_nll(), record_logprob()
        print(f"effect/cost order, {size} neurons: reference ppl {100 * (math.exp(ref - base_ref) - 1):+.2f}%, "
              f"record log-prob {lp:.3f} (base {base_lp:.3f}), argmax {acc:.3f}", flush=True)
        mask = torch.zeros_like(pool)
        for layer, neuron in chosen:
            mask[layer, neuron] = True
        profile = MemorizationProfile(name=f"rescored-{size}", granularity="neuron", num_layers=pool.shape[0],
                                      intermediate_size=pool.shape[1], pruned_neurons=mask)
        save_memorization_profile(args.out_dir / f"memorization-rescored-{size}.safetensors", profile,
                                  model_fingerprint=fingerprint, model_name=name,
                                  parameters={"pool": str(args.pool_profile), "size": size}, data={}, quality={})
    return 0


if __name__ == "__main__":
    sys.exit(main())
