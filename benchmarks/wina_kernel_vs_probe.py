"""How close the WINA CPU kernel comes to the memory system's limit for the rows it reads.

For each projection shape of the default model, one token (batch 1) over enough copies of the
weight to fill --megabytes (so the rows come from memory, as in a decode step): the dense kernel
(kernels/csrc/dense_cpu.c) over the whole weight, the WINA kernel (kernels/csrc/wina_core.h,
through kernels/wina_cpu.py's PreparedWinaLinear) keeping a fraction --kept of the input channels
(the same channels for every segment: unit column norms and one threshold, so that the pure-read
probe below reads exactly the same bytes), and the probe of benchmarks/row_skip_bandwidth.py
(benchmarks/csrc/row_skip.c: two threads load every byte of those kept rows of W^T and nothing
else, whole rows each) over all rows and over the kept rows, each in two ways: prefetching all
of each row 16 rows ahead, and prefetching only its first 512 bytes, about 16 KiB of such prefixes
ahead, as the kernel did in the twenty-third session (for long rows the hardware prefetcher reads
the rest faster); the faster of the two is the probe's time. (The kernel now prefetches the rows
a pass ahead a line at a time inside its arithmetic, which a probe without arithmetic has nothing
to pace by.)

'kernel / probe' above 1 is what the kernel spends beyond reading its bytes (its arithmetic, the
per-call work: threads, kept sets, barriers, epilogue, and the Python call); 'probe kept / all' is
what skipping rows saves when rows are read this way. The probe reads one row at a time; the
kernel reads eight side by side, which can be faster (gate/up's kernel beat the probe in the
twenty-third session), so the probe is an estimate of the memory system's limit, not a bound.
Best of --repeats.

    python benchmarks/wina_kernel_vs_probe.py [--kept 0.42] [--out benchmarks/out/wina_kernel_vs_probe.json]

Prints a table, writes JSON. Nothing runs on import.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import sys
import time
from pathlib import Path

from bench_common import command_line, describe_machine, format_table, write_report
from row_skip_bandwidth import load_probe

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "wina_kernel_vs_probe.json"
# The probe's second way of prefetching: the WINA CPU kernel's in the twenty-third session
PREFETCH_PREFIX_BYTES, PREFETCH_IN_FLIGHT_BYTES = 512, 16384
# The default model's projections: (in features K, segment widths, gate_up)
SHAPES = {"qkv": (576, (576, 192, 192), False), "o": (576, (576,), False),
          "gate_up": (576, (1536, 1536), True), "down": (1536, (576,), False)}


def best_seconds(fn, repeats: int) -> float:
    fn()  # once to settle
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, K: int, segments: tuple[int, ...], gate_up: bool, args: argparse.Namespace, dense_kernel,
            wina_kernel, probe, generator) -> dict:
    """One projection shape: the four timings (us per call) and their ratios."""
    import torch

    N, G = sum(segments), len(segments)
    copies = max(1, args.megabytes * 2**20 // (K * N * 2))
    weights_t = [(torch.randn(K, N, generator=generator) * 0.05).half() for _ in range(copies)]  # [K, N]
    panels = [dense_kernel.pack(w.t().contiguous(), 2 if gate_up else 1) for w in weights_t]
    sparse = [wina_kernel.prepare(w, torch.ones(G, K), segments, gate_up=gate_up) for w in weights_t]
    x = torch.randn(1, K, generator=generator)
    # every segment keeps the channels whose |x| is above the (1 - kept) quantile
    threshold = float(x.abs().flatten().sort().values[round((1 - args.kept) * K) - 1])
    thresholds = torch.full((1, G), threshold)
    kept_counts = torch.zeros(1, G, dtype=torch.int32)
    kept_rows = torch.nonzero(x.abs()[0] > threshold).flatten().to(torch.int32)
    every_row = torch.arange(K, dtype=torch.int32)
    pointers = (ctypes.c_void_p * copies)(*[w.data_ptr() for w in weights_t])

    def read(rows, ahead: int, prefix_bytes: int):  # prefix_bytes 0: prefetch whole rows
        return lambda: probe.read_rows_two_threads(pointers, copies, N * 2, rows.data_ptr(), rows.numel(), ahead, 1,
                                                   prefix_bytes)

    prefix_ahead = min(64, max(8, PREFETCH_IN_FLIGHT_BYTES // (min(N * 2, PREFETCH_PREFIX_BYTES) + 1)))
    calls = {
        "dense": lambda: [dense_kernel.linear(x, w, gate_up=gate_up) for w in panels],
        "wina": lambda: [p(x, thresholds.data_ptr(), G, kept_counts.data_ptr(), G) for p in sparse],
        "probe_all_whole": read(every_row, 16, 0),
        "probe_all_prefix": read(every_row, prefix_ahead, PREFETCH_PREFIX_BYTES),
        "probe_kept_whole": read(kept_rows, 16, 0),
        "probe_kept_prefix": read(kept_rows, prefix_ahead, PREFETCH_PREFIX_BYTES),
    }
    us = {key: best_seconds(fn, args.repeats) / copies * 1e6 for key, fn in calls.items()}
    us["probe_all"] = min(us["probe_all_whole"], us["probe_all_prefix"])
    us["probe_kept"] = min(us["probe_kept_whole"], us["probe_kept_prefix"])
    if kept_counts.tolist() != [[kept_rows.numel()] * G]:
        raise RuntimeError(f"{name}: the kernel kept {kept_counts.tolist()}, the probe reads {kept_rows.numel()}")
    return {"projection": name, "in_features": K, "segments": list(segments), "copies": copies,
            "kept_rows": kept_rows.numel(), "kept_fraction": kept_rows.numel() / K,
            **{f"{key}_us": value for key, value in us.items()},
            "wina_over_dense": us["wina"] / us["dense"], "probe_kept_over_all": us["probe_kept"] / us["probe_all"],
            "wina_over_probe_kept": us["wina"] / us["probe_kept"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kept", type=float, default=0.42, help="fraction of input channels kept (default 0.42, "
                        "what the default profile keeps at sparsity 0.5 on WikiText-2 decoding)")
    parser.add_argument("--megabytes", type=int, default=256, help="weight copies read per pass (from memory)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not 0 < args.kept < 1:
        parser.error("--kept must be between 0 and 1")
    import torch

    from kernels.dense_cpu import CpuDenseKernel
    from kernels.wina_cpu import CpuWinaKernel

    dense_kernel, wina_kernel = CpuDenseKernel.load(), CpuWinaKernel.load()
    if dense_kernel is None or wina_kernel is None:
        raise SystemExit("the CPU kernels did not load here (they need AVX2/FMA/F16C and gcc)")
    probe = load_probe()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    generator = torch.Generator().manual_seed(0)
    rows = [measure(name, K, segments, gate_up, args, dense_kernel, wina_kernel, probe, generator)
            for name, (K, segments, gate_up) in SHAPES.items()]
    title = (f"wina_kernel_vs_probe  {started}  batch 1, kept {args.kept}, weights from memory "
             f"(~{args.megabytes} MB of copies), us per call, best of {args.repeats}")
    text = "\n".join([
        title,
        format_table(["projection", "kept", "dense", "WINA kernel", "probe all rows (whole / prefix)",
                      "probe kept rows (whole / prefix)", "kernel / dense", "probe kept / all", "kernel / probe kept"],
                     [[r["projection"], f"{r['kept_rows']}/{r['in_features']}", f"{r['dense_us']:.1f}",
                       f"{r['wina_us']:.1f}", f"{r['probe_all_whole_us']:.1f} / {r['probe_all_prefix_us']:.1f}",
                       f"{r['probe_kept_whole_us']:.1f} / {r['probe_kept_prefix_us']:.1f}",
                       f"{r['wina_over_dense']:.2f}", f"{r['probe_kept_over_all']:.2f}",
                       f"{r['wina_over_probe_kept']:.2f}"] for r in rows]),
    ])
    report = {"benchmark": "wina_kernel_vs_probe", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "kept": args.kept, "megabytes": args.megabytes,
              "repeats": args.repeats, "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
