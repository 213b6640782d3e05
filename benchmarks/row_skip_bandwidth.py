"""What skipping weight rows can save on this CPU: the memory roofline of a sparse GEMV.

A WINA kernel on the CPU reads the rows of W^T [K, N] whose input channel a token keeps, in
ascending order. Whether reading half the rows takes half the time depends on the memory system,
not on the kernel: a hardware prefetcher that streams through short gaps reads the skipped rows
anyway. This times a probe with no arithmetic (``benchmarks/csrc/row_skip.c``: load and add
every byte of the kept rows, one thread) over matrices of the default model's row widths (W^T rows
of 1152, 1920 and 6144 bytes in float16, for o/down, qkv and gate/up), at kept fractions 1, 0.5,
0.25 and 0.1 (random rows, the same for every run), against reading every row. Enough copies of
each matrix to fill 256 MB are read in turn, so the rows come from DRAM, as in a decode step.

``speedup`` = time to read every row / time to read the kept rows: the most a row-skipping kernel
can gain over a dense one that streams the same matrix on this machine (1 / kept when skipping is
free). Best of ``--repeats`` passes, with and without software prefetch ``--prefetch`` rows ahead, and
with each row's cache lines read in ascending or in a scrambled order (a coprime stride through the
row: if the prefetcher runs on from one kept row into the next, skipped one because it sees an
ascending stream, a scrambled order should stop it; the ratio shows whether it does).

A second table uses both cores, as a decode step does: two threads split each matrix either by
columns (each reads its half of every kept row, the WINA CPU kernel's split) or by rows (each reads
whole rows of half of the kept list); the reference is the faster of the two over every row.

    python benchmarks/row_skip_bandwidth.py [--out benchmarks/out/row_skip_bandwidth.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import random
import sys
import time
from pathlib import Path

from bench_common import command_line, describe_machine, fmt, format_table, write_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "row_skip_bandwidth.json"
SHAPES = {"o/down rows (576 fp16)": (1152, 1536), "qkv rows (960 fp16)": (1920, 576),
          "gate_up rows (3072 fp16)": (6144, 576)}  # name: (row bytes, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--prefetch", type=int, default=16, help="rows ahead for the software prefetch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=256, help="memory read per pass (from DRAM)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def best_seconds(lib, matrices: list, row_bytes: int, kept_rows, prefetch: int, repeats: int,
                 scrambled: bool = False) -> float:
    """Seconds to read `kept_rows` of one matrix: best of `repeats` passes over all the copies."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for m in matrices:
            lib.read_rows(m.data_ptr(), row_bytes, kept_rows.data_ptr(), kept_rows.numel(), prefetch, int(scrambled), 0)
        best = min(best, time.perf_counter() - start)
    return best / len(matrices)


def two_thread_seconds(lib, pointers, row_bytes: int, kept_rows, prefetch: int, split_rows: bool,
                       repeats: int) -> float:
    """Seconds per matrix for two threads to read `kept_rows` of every matrix in `pointers` in turn."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        lib.read_rows_two_threads(pointers, len(pointers), row_bytes, kept_rows.data_ptr(), kept_rows.numel(),
                                  prefetch, int(split_rows), 0)
        best = min(best, time.perf_counter() - start)
    return best / len(pointers)


def load_probe() -> ctypes.CDLL:
    """benchmarks/csrc/row_skip.c, built on first use, with its two entry points typed (also used
    by wina_kernel_vs_probe.py)."""
    from kernels.cpu_build import build_library, default_cache_dir

    lib = ctypes.CDLL(str(build_library(PROJECT_ROOT / "benchmarks" / "csrc" / "row_skip.c", default_cache_dir())))
    lib.read_rows.restype = ctypes.c_int64
    lib.read_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int, ctypes.c_int64]
    lib.read_rows_two_threads.restype = ctypes.c_int64
    lib.read_rows_two_threads.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    return lib


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    lib = load_probe()
    rng = random.Random(0)
    results, two_threads = [], []
    for name, (row_bytes, rows) in SHAPES.items():
        copies = max(1, args.megabytes * 2**20 // (row_bytes * rows))
        matrices = [torch.randint(0, 127, (rows * row_bytes,), dtype=torch.uint8) for _ in range(copies)]

        every = torch.arange(rows, dtype=torch.int32)
        dense = best_seconds(lib, matrices, row_bytes, every, 0, args.repeats)
        for kept in args.kept:
            chosen = torch.tensor(sorted(rng.sample(range(rows), round(kept * rows))), dtype=torch.int32)
            for prefetch, scrambled in ((0, False), (args.prefetch, False), (0, True), (args.prefetch, True)):
                t = best_seconds(lib, matrices, row_bytes, chosen, prefetch, args.repeats, scrambled)
                results.append({"rows": name, "row_bytes": row_bytes, "kept": kept, "prefetch": prefetch,
                                "line_order": "scrambled" if scrambled else "ascending",
                                "dense_us": dense * 1e6, "sparse_us": t * 1e6, "speedup": dense / t,
                                "ideal": 1 / kept, "dense_gb_s": row_bytes * rows / dense / 1e9,
                                "kept_gb_s": chosen.numel() * row_bytes / t / 1e9})

        pointers = (ctypes.c_void_p * len(matrices))(*[m.data_ptr() for m in matrices])

        dense2 = min(two_thread_seconds(lib, pointers, row_bytes, every, prefetch, split, args.repeats)
                     for prefetch in (0, args.prefetch) for split in (False, True))
        for kept in args.kept:
            chosen = torch.tensor(sorted(rng.sample(range(rows), round(kept * rows))), dtype=torch.int32)
            for split_rows in (False, True):
                for prefetch in (0, args.prefetch):
                    t = two_thread_seconds(lib, pointers, row_bytes, chosen, prefetch, split_rows, args.repeats)
                    two_threads.append({"rows": name, "row_bytes": row_bytes, "kept": kept, "prefetch": prefetch,
                                        "split": "rows" if split_rows else "columns", "dense_us": dense2 * 1e6,
                                        "sparse_us": t * 1e6, "speedup": dense2 / t, "ideal": 1 / kept,
                                        "dense_gb_s": row_bytes * rows / dense2 / 1e9})

    headers = ["rows", "kept", "prefetch", "line order", "every row us", "kept rows us", "speedup", "ideal", "kept GB/s"]
    table = [[r["rows"], fmt(r["kept"], 2), str(r["prefetch"]), r["line_order"], fmt(r["dense_us"]), fmt(r["sparse_us"]),
              fmt(r["speedup"], 2), fmt(r["ideal"], 1), fmt(r["kept_gb_s"], 1)] for r in results]
    headers2 = ["rows", "kept", "split", "prefetch", "every row us", "kept rows us", "speedup", "ideal", "every row GB/s"]
    table2 = [[r["rows"], fmt(r["kept"], 2), r["split"], str(r["prefetch"]), fmt(r["dense_us"]), fmt(r["sparse_us"]),
               fmt(r["speedup"], 2), fmt(r["ideal"], 1), fmt(r["dense_gb_s"], 1)] for r in two_threads]
    text = ("Reading only the kept rows of a W^T matrix from DRAM (one thread, no arithmetic) against "
            "reading every row\n\n" + format_table(headers, table)
            + "\n\nTwo threads, split by columns or by rows; 'every row' is the faster way over every row\n\n"
            + format_table(headers2, table2))
    report = {
        "benchmark": "row_skip_bandwidth",
        "command": command_line(argv),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(("torch",)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "two_threads": two_threads,
    }
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
