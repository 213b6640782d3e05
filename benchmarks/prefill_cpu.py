"""Prompt prefill on the CPU: the default model's forward pass over one prompt of T tokens, with
the layers run as one fused kernel call each (kernels/csrc/dense_cpu.c's decode_layer, the path
for prompt chunks of up to CpuDenseKernel.MAX_ROWS tokens) against the torch layer around the same
kernel's projections (the path for longer chunks), interleaved in one process. Why MAX_ROWS is
what it is, and what a prompt costs to prefill (time to first token, minus the HTTP).

    python benchmarks/prefill_cpu.py [--tokens 16,32,64,128,256] [--repeats 5] [--out FILE]

Prints a table, writes JSON (default benchmarks/out/prefill_cpu.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

from bench_common import command_line, describe_machine, format_table, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "prefill_cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16,32,64,128,256", help="prompt lengths (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per length (median)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    from kernels.dense_cpu import CpuDenseKernel
    from server.runtime import load_model
    from server.settings import ServerSettings

    lengths = [int(t) for t in args.tokens.split(",")]
    loaded = load_model(ServerSettings(max_model_len=max(16, *lengths), wina_profile="none", dtype=args.dtype,
                                       load_interventions=False, log_level="warning"))
    model = loaded.model
    fused_layers = model.decode_layers
    if fused_layers is None:
        raise SystemExit("the CPU kernel did not load here: nothing to compare")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cache = model.new_cache(1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    try:
        for T in lengths:
            tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=generator)
            times: dict[str, list[float]] = {"fused": [], "torch": []}
            for _ in range(args.repeats):
                for path, taken in times.items():
                    model.decode_layers = fused_layers if path == "fused" else None
                    start = time.perf_counter()
                    model(tokens, torch.tensor([0]), torch.tensor([0]), cache)
                    taken.append(time.perf_counter() - start)
            fused, plain = (statistics.median(times[p]) * 1e3 for p in ("fused", "torch"))
            rows.append({"tokens": T, "fused_ms": fused, "torch_layer_ms": plain, "torch_over_fused": plain / fused,
                         "fused_ms_per_token": fused / T, "fused_taken_by_forward": T <= CpuDenseKernel.MAX_ROWS})
    finally:
        model.decode_layers = fused_layers
    text = "\n".join([
        (f"prefill_cpu  {started}  {loaded.name}  {args.dtype}  torch {torch.__version__}  threads "
         f"{torch.get_num_threads()}  (median of {args.repeats} interleaved rounds)"),
        format_table(["tokens", "fused ms", "torch layer ms", "torch / fused", "ms per token (fused)", "served path"],
                     [[str(r["tokens"]), f"{r['fused_ms']:.1f}", f"{r['torch_layer_ms']:.1f}",
                       f"{r['torch_over_fused']:.2f}", f"{r['fused_ms_per_token']:.2f}",
                       "fused" if r["fused_taken_by_forward"] else "torch layer"] for r in rows]),
    ])
    report = {"benchmark": "prefill_cpu", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "dtype": args.dtype, "repeats": args.repeats,
              "max_fused_rows": CpuDenseKernel.MAX_ROWS, "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
