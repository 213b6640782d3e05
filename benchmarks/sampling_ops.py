#!/usr/bin/env python3
"""What a decode step spends after the forward pass on two whole-vocabulary reductions, the
engine's way against torch's plain ops, on the logits of real forward passes (issue 2).

For batch sizes 1 and 8: each row's greedy token (``torch.argmax`` against
``server.engine.sampling.greedy``, numpy's argmax on the CPU) and whether each row's logits are
all finite (``torch.isfinite(logits).all(-1)`` against ``sampling.finite_rows``, each row's max
and min).
Each op is timed right after a forward pass of the default model, as the engine runs it (the
logits were just written by the LM head's threads), and alone on logits already in this core's
cache; medians. If a torch release makes its argmax as fast, `greedy` can go back to it.

    python benchmarks/sampling_ops.py [--steps 200] [--out benchmarks/out/sampling_ops.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import command_line, describe_machine, fmt, format_table, write_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))


def _ops():
    import torch

    from server.engine.sampling import finite_rows, greedy

    return {
        "argmax: torch.argmax": lambda x: x.argmax(dim=-1),
        "argmax: greedy()": greedy,
        "finite: isfinite().all()": lambda x: torch.isfinite(x).all(dim=-1),
        "finite: finite_rows()": finite_rows,
    }


def measure(batch_sizes: list[int], steps: int) -> list[dict]:
    import torch

    from server.runtime import load_model
    from server.settings import ServerSettings

    torch.set_grad_enabled(False)
    loaded = load_model(ServerSettings(max_model_len=steps + 8, max_batch_size=max(batch_sizes),
                                       load_interventions=False, log_level="warning"))
    model, ops = loaded.model, _ops()
    rows = []
    for batch in batch_sizes:
        cache = model.new_cache(batch)
        tokens = torch.full((batch, 1), 1)
        slots = torch.arange(batch)
        after_forward: dict[str, list[float]] = {name: [] for name in ops}
        alone: dict[str, list[float]] = {name: [] for name in ops}
        for step in range(steps):
            name = list(ops)[step % len(ops)]  # one op after each pass, taking turns
            logits = model(tokens, slots, torch.full((batch,), step), cache)  # [B, V] float32
            start = time.perf_counter()
            ops[name](logits)
            after_forward[name].append(time.perf_counter() - start)
            for other, op in ops.items():
                start = time.perf_counter()
                op(logits)
                alone[other].append(time.perf_counter() - start)
        for name in ops:
            rows.append({"batch": batch, "op": name, "vocab": logits.shape[-1],
                         "after_forward_us": statistics.median(after_forward[name]) * 1e6,
                         "alone_us": statistics.median(alone[name]) * 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=200, help="forward passes per batch size")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "out" / "sampling_ops.json")
    args = parser.parse_args(argv)
    rows = measure(args.batch_sizes, args.steps)
    report = {"benchmark": "sampling_ops", "utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": command_line(argv), "steps": args.steps, "rows": rows, "machine": describe_machine()}
    text = "\n".join([
        f"sampling_ops: {report['utc']}, {report['machine'].get('cpu_model_name')}",
        f"command: {report['command']}", "",
        format_table(["batch", "op", "after a forward pass, us", "alone, us"],
                     [[str(r["batch"]), r["op"], fmt(r["after_forward_us"]), fmt(r["alone_us"])] for r in rows]),
    ])
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
