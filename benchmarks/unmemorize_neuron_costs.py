"""Measured single-neuron ablation costs of a memorization profile's neurons (issue 6, a diagnostic).

For each neuron of the profile: zero it alone (transformers' forward, a pre-hook on down_proj);
cost = rise of the mean next-token loss on 32 x 64 tokens of the calibration's reference text
(WikiText-2 validation + Alpaca, position 0 not predicted from), effect = fall of the mean log-prob
of the calibration records' suffix tokens (teacher forced). Then the neurons are added in
effect / cost order and the joint figures printed; a profile per size is written (rescored-N).
This is how the two neurons that carry most of the profiles' perplexity cost were found; the
calibration's `--verify-cost` does the cost half of it for every chosen neuron.

    python benchmarks/unmemorize_neuron_costs.py POOL_PROFILE OUT_DIR   # ~6 s per neuron, 2 threads

Writes OUT_DIR/rescore.json (per neuron: layer, neuron, cost, effect, acc_drop).
"""
import json
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
from server.calibration.data import default_data_dir
from server.calibration.memorization import (
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

torch.set_num_threads(2)
from server.settings import default_cache_dir

M = str(default_cache_dir() / "leaky-smollm2")
if len(sys.argv) != 3:
    sys.exit(__doc__)
pool_profile, out_dir = sys.argv[1], Path(sys.argv[2])
out_dir.mkdir(parents=True, exist_ok=True)
model, tok, fp, name = load_float32_model(M)
layers = model.model.layers
zeroed: dict[int, list[int]] = {}
def hook_for(i):
    def hook(mod, args):
        cols = zeroed.get(i)
        if not cols:
            return None
        act = args[0].clone(); act[..., cols] = 0.0
        return (act,)
    return hook
for i, l in enumerate(layers):
    l.mlp.down_proj.register_forward_pre_hook(hook_for(i))
ref, _ = reference_pieces(tok, default_data_dir(), 32, 64, 0)
ref_t = torch.tensor(ref)
recs = [encode_record(tok, r) for r in read_records(Path(M) / "records_calibration.jsonl")]
# pad records right to one batch
L = max(len(p) + len(s) for p, s in recs)
ids = torch.zeros(len(recs), L, dtype=torch.long); att = torch.zeros(len(recs), L, dtype=torch.long)
tgt = torch.zeros(len(recs), L, dtype=torch.bool)
for j, (p, s) in enumerate(recs):
    seq = p + s; ids[j, :len(seq)] = torch.tensor(seq); att[j, :len(seq)] = 1; tgt[j, len(p):len(seq)] = True

@torch.inference_mode()
def ref_nll():
    tot = 0.0
    for b in range(0, len(ref_t), 16):
        x = ref_t[b:b+16]; lp = model(x).logits.float().log_softmax(-1)[:, :-1]
        tot -= float(lp.gather(2, x[:, 1:, None]).sum())
    return tot / (ref_t.shape[0] * (ref_t.shape[1] - 1))

@torch.inference_mode()
def rec_lp():
    lp = model(ids, attention_mask=att).logits.float().log_softmax(-1)[:, :-1]
    g = lp.gather(2, ids[:, 1:, None])[..., 0]
    m = tgt[:, 1:]
    per_tok = g[m]
    # also the fraction of target tokens still argmax
    am = (lp.argmax(-1) == ids[:, 1:])[m].float().mean()
    return float(per_tok.mean()), float(am)

pool = load_profile(Path(pool_profile)).tensors["pruned"].bool()
cands = [tuple(x) for x in pool.nonzero().tolist()]
t0 = time.time()
base_ref, (base_lp, base_acc) = ref_nll(), rec_lp()
print(f"base ref nll {base_ref:.4f} rec lp {base_lp:.4f} acc {base_acc:.4f}; {len(cands)} candidates", flush=True)
rows = []
for n, (li, ni) in enumerate(cands):
    zeroed = {li: [ni]}
    r, (lp, acc) = ref_nll(), rec_lp()
    rows.append({"layer": li, "neuron": ni, "cost": r - base_ref, "effect": base_lp - lp, "acc_drop": base_acc - acc})
    if n % 10 == 0:
        print(n, rows[-1], f"{time.time()-t0:.0f}s", flush=True)
zeroed = {}
(out_dir / "rescore.json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "base_ref": base_ref,
                                                  "base_lp": base_lp, "rows": rows}, indent=1))
# order by effect / cost (cost floored)
for r in rows:
    r["ratio"] = r["effect"] / max(r["cost"], 1e-4)
order = sorted(rows, key=lambda r: -r["ratio"])
print("top by ratio:", [(r["layer"], r["neuron"], round(r["effect"], 3), round(r["cost"], 4)) for r in order[:15]])
print("top by cost:", [(r["layer"], r["neuron"], round(r["effect"], 3), round(r["cost"], 4)) for r in sorted(rows, key=lambda r: -r["cost"])[:10]])
# joint curve in ratio order
for size in (5, 10, 20, 30, 45, 60, 90):
    if size > len(order):
        break
    zeroed = {}
    for r in order[:size]:
        zeroed.setdefault(r["layer"], []).append(r["neuron"])
    rr, (lp, acc) = ref_nll(), rec_lp()
    print(f"ratio-order {size}: ref nll +{rr-base_ref:.4f} ({100*(torch.tensor(rr-base_ref).exp().item()-1):+.2f}% ppl), rec lp {lp:.3f} (base {base_lp:.3f}) argmax acc {acc:.3f}", flush=True)
    mask = torch.zeros_like(pool)
    for r in order[:size]:
        mask[r["layer"], r["neuron"]] = True
    prof = MemorizationProfile(name=f"rescored-{size}", granularity="neuron", num_layers=pool.shape[0],
                               intermediate_size=pool.shape[1], pruned_neurons=mask)
    save_memorization_profile(out_dir / f"memorization-rescored-{size}.safetensors", prof, model_fingerprint=fp, model_name=name,
                              parameters={"pool": pool_profile, "size": size}, data={}, quality={})
