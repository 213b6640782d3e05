"""What every benchmark shares: the machine block of its JSON and its plain-text tables (imported
by the scripts beside it)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def describe_machine(packages: tuple[str, ...] = ("torch", "transformers")) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model_name": None,
        "cpu_count": os.cpu_count(),
        "affinity_cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "gpu": None,
    }
    for name in packages:
        try:
            info[f"{name.replace('-', '_')}_version"] = version(name)
        except PackageNotFoundError:
            info[f"{name.replace('-', '_')}_version"] = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    info["cpu_model_name"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")  # only described when the benchmark itself uses torch
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["torch_parallel_info"] = torch.__config__.parallel_info()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_in_fresh_process(fn, *args) -> Any:
    """fn(*args) in a new spawned Python process (its own torch threads and kernel caches) -> its
    result. A process that dies (a crash in native code, an illegal instruction) raises
    RuntimeError instead of leaving the caller waiting for a result that never comes, as a
    multiprocessing.Pool does."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise RuntimeError(f"{getattr(fn, '__name__', fn)}: its process died ({exc})") from None


def machine_cpu_seconds() -> dict[str, float] | None:
    """The whole machine's CPU seconds so far, summed over its cores, by kind (Linux /proc/stat's
    first line): user, nice, system, idle, iowait, irq, softirq, steal; None without /proc/stat.
    `steal` is time the hypervisor ran someone else on this VM's cores."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:1 + len(names)]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return {name: t / hz for name, t in zip(names, ticks)}


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark, for its report: the script and the arguments its main()
    parsed (`argv`, or the process's own when None), shell-quoted."""
    return shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: '-' for a missing or NaN value, floats to `digits` places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def write_report(report: dict[str, Any], text: str, out: Path) -> None:
    """Print the human-readable report and write the JSON beside it."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


def wikitext_step_tokens(tokenizer):
    """Decode-step inputs from WikiText-2 test text (its first 400,000 characters, tokenized once):
    a function (step, B) -> [B, 1] token ids, row b reading from token offset 1000 b, one token
    per step (teacher-forced), so that a sparse row's kept channels change from step to step as in
    real decoding (benchmarks/decode_breakdown.py, decode_context.py --text-tokens)."""
    import torch

    from server.calibration.data import default_data_dir

    text = (default_data_dir() / "wikitext2" / "wiki.test.tokens").read_text()[:400_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return lambda step, B: ids[(torch.arange(B) * 1000 + step) % len(ids)].view(B, 1)


def prefill_in_chunks(model, tokens, cache, chunk: int, sparsity: float = 0.0, all_logits: bool = False):
    """One prompt tokens [1, T] into cache slot 0 from position 0, `chunk` tokens per forward call
    (as the engine prefills: a sparse prompt in chunks of at most model.sparse_chunk_tokens), every
    chunk at WINA `sparsity` (0: dense) -> logits [1, T, V] with all_logits, else the last
    token's [1, V]."""
    import torch

    pieces = []
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start:start + chunk]
        plan = model.sparsity_plan([sparsity], piece.shape[1])
        pieces.append(model(piece, torch.tensor([0]), torch.tensor([start]), cache, all_logits=all_logits,
                            sparsity=plan))
    return torch.cat(pieces, dim=1) if all_logits else pieces[-1]
