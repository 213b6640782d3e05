"""What the per-request interventions cost at decode: tokens/s with every row of the batch asking
for one intervention, against no intervention, at batch 1 and 8, in one run.

Each condition runs the engine's own per-step work: build the step's plan (as Engine does, reused
while the batch does not change) and one batched decode forward pass. Conditions are interleaved
round by round so that machine noise hits them alike; the report gives the median over rounds and
the ratio to "none" from the same rounds.

Cost depends on shapes, not on trained values: where the default model's trained profile is
installed it is used, else a random one of the stated shape (said in the report).

    python benchmarks/interventions_cost.py [--rounds 7] [--steps 16] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import describe_machine, fmt, format_table, write_report  # noqa: E402
from server.interventions.plan import InterventionPlan  # noqa: E402
from server.interventions.vectors import SteeringVector  # noqa: E402
from server.runtime import load_model  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.test_interventions import random_eigenshift, random_memorization, random_sae  # noqa: E402

TARGETS = {"steer-add": 0.03, "steer-clamp": 0.15, "eigenshift": 0.10, "unmemorize-neuron": 0.05}
SUBSPACE_RANK = 16  # per layer: the rank the calibration picked on the leaky models (RESULTS.md, issue 6)


def conditions(loaded) -> tuple[dict[str, list | None], dict[str, str]]:
    """name -> request entries, and where each profile came from."""
    model, reg = loaded.model, loaded.interventions
    hidden = model.config.hidden_size
    sources = {}
    if reg.saes:
        sae_id = next(iter(reg.saes))
        sources["sae"] = f"trained {sae_id} (d_sae {reg.saes[sae_id].cfg.d_sae})"
    else:
        sae_id = "random-8k"
        reg.add_sae(random_sae(hidden, layer=15, d_sae=8192, k=32, name=sae_id))
        sources["sae"] = "random TopK SAE, layer 15, d_sae 8192, k 32 (no trained one installed)"
    if "toxicity" in reg.eigenshift:
        eig = "toxicity"
        sources["eigenshift"] = f"trained profile, k {reg.eigenshift[eig].k}"
    else:
        eig = "random-eig"
        reg.add_eigenshift(random_eigenshift(model, k=32, name=eig))
        sources["eigenshift"] = "random components, k 32"
    reg.add_vector(SteeringVector("bench-vector", (15,), torch.randn(1, hidden)))
    toxicity_vector = "toxicity" if "toxicity" in reg.vectors else "bench-vector"
    sources["eigenshift+vector"] = f"the EigenShift profile above and vector {toxicity_vector!r} at strength -0.75"
    reg.add_memorization(random_memorization(model, "neuron", fraction=0.01, name="bench-neuron"))
    reg.add_memorization(random_memorization(model, "weight", fraction=0.01, name="bench-weight"))
    reg.add_memorization(random_memorization(model, "subspace", name="bench-subspace", rank=SUBSPACE_RANK,
                                             layer_step=1))
    sources["unmemorize"] = (f"random masks: 1% of neurons per layer / 1% of down_proj weights; a random subspace "
                             f"of rank {SUBSPACE_RANK} in every layer")
    entries = {
        "none": None,
        "steer-add": [{"type": "steer", "sae": sae_id, "feature": 7, "strength": 4.0}],
        "steer-clamp": [{"type": "steer", "sae": sae_id, "feature": 7, "clamp": 4.0}],
        "vector": [{"type": "steer", "vector": "bench-vector", "strength": 2.0}],
        "eigenshift": [{"type": "eigenshift", "profile": eig, "alpha": 0.0}],
        # the toxicity stack RESULTS.md measures: the EigenShift profile and the toxicity vector in one request
        "eigenshift+vector": [{"type": "eigenshift", "profile": eig, "alpha": 0.0},
                              {"type": "steer", "vector": toxicity_vector, "strength": -0.75}],
        "unmemorize-neuron": [{"type": "unmemorize", "profile": "bench-neuron"}],
        "unmemorize-weight": [{"type": "unmemorize", "profile": "bench-weight"}],
        "unmemorize-subspace": [{"type": "unmemorize", "profile": "bench-subspace"}],
    }
    return entries, sources


def time_decode(model, cache, rows, batch: int, start: int, steps: int) -> float:
    """Seconds for `steps` decode steps of `batch` rows, each with its plan built once (as the
    engine reuses it while the batch is unchanged)."""
    tokens = torch.full((batch, 1), 42, dtype=torch.long)
    slots = torch.arange(batch)
    t0 = time.perf_counter()
    plan = InterventionPlan.build(rows, prompt_step=False, device=model.device)
    for step in range(steps):
        model(tokens, slots, torch.full((batch,), start + step), cache, edits=plan)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--conditions", nargs="+", default=None,
                        help="Measure only these conditions (and none, which the ratios need). [all]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "interventions_cost.json")
    args = parser.parse_args(argv)

    loaded = load_model(ServerSettings(wina_profile="none", max_model_len=512))
    model = loaded.model
    entries, sources = conditions(loaded)
    if args.conditions:
        unknown = set(args.conditions) - set(entries)
        if unknown:
            parser.error(f"--conditions: unknown {sorted(unknown)}; known: {sorted(entries)}")
        entries = {name: e for name, e in entries.items() if name == "none" or name in args.conditions}
    resolved = {name: loaded.interventions.resolve(e) for name, e in entries.items()}
    results = {}
    for batch in args.batch_sizes:
        cache = model.new_cache(batch)
        prompt = torch.full((1, 64), 42, dtype=torch.long)
        for slot in range(batch):  # a 64-token context in every slot
            model(prompt, torch.tensor([slot]), torch.tensor([0]), cache)
        times: dict[str, list[float]] = {name: [] for name in entries}
        for round_ in range(args.rounds + 1):  # round 0 warms every path up and is not counted
            for name, row in resolved.items():
                seconds = time_decode(model, cache, [row] * batch, batch, 64, args.steps)
                if round_:
                    times[name].append(seconds)
        none = times["none"]
        results[batch] = {
            name: {"tokens_per_s": batch * args.steps / statistics.median(t),
                   "slowdown": statistics.median([a / b - 1 for a, b in zip(t, none)]),
                   "target_slowdown": TARGETS.get(name)}
            for name, t in times.items()}
    report = {"benchmark": "interventions_cost", "command": "python benchmarks/interventions_cost.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": describe_machine(), "dtype": str(model.dtype), "rounds": args.rounds,
              "steps_per_round": args.steps, "context_tokens": 64, "profiles": sources, "results": results}
    rows = []
    for batch, by_name in results.items():
        for name, r in by_name.items():
            target = r["target_slowdown"]
            verdict = "-" if target is None or name == "none" else ("met" if r["slowdown"] <= target else "MISSED")
            rows.append([f"{name} (batch {batch})", fmt(r["tokens_per_s"]), f"{100 * r['slowdown']:+.1f}%",
                         "-" if target is None else f"< {100 * target:.0f}%", verdict])
    text = "\n".join([
        "Decode cost of interventions (every row asks; slowdown = median over rounds of time / time(none) - 1)",
        f"machine: {report['machine']['cpu_model_name']}, {report['machine']['torch_threads']} threads, {model.dtype}",
        *(f"{k}: {v}" for k, v in sources.items()), "",
        format_table(["condition", "tok/s", "slowdown", "target", ""], rows)])
    write_report(report, text, args.out)
    args.out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
