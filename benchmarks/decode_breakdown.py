"""Where a CPU decode step's time goes, projection by projection, dense and at WINA sparsities.

The model's own decode path (one fused kernel call per decoder layer), with
kernels/csrc/dense_cpu.c built a second time with -DNEURONSERVE_STAGE_TIMERS: that build adds up
the seconds spent in each layer's qkv, attention, o, gate/up and down stages, in whole layer calls
and in dense_linear calls (at decode, the LM head), which the served build does not. Each row
reads WikiText-2 test text, one token per step at advancing positions (teacher-forced), so a
sparse row's kept channels change from step to step as in real decoding; the sparsities take turns
step by step, each on its own cache slots. "rest" is the step's wall time minus layer calls and
LM head: the embedding, final norm, the model's Python and the ctypes calls.

    python benchmarks/decode_breakdown.py [--sparsities 0,0.5,0.9] [--batch-size 1] [--steps 200]
                                          [--out FILE]

Prints a table (ms per step, means over the steps after the first 10), writes JSON (default
benchmarks/out/decode_breakdown.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    command_line,
    describe_machine,
    format_table,
    wikitext_step_tokens,
    write_report,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "decode_breakdown.json"
WARMUP_STEPS = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0,0.5,0.9", help="WINA sparsities, comma-separated (0: dense)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step")
    parser.add_argument("--steps", type=int, default=200, help="steps per sparsity (positions 0..steps-1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    import torch

    from kernels.dense_cpu import STAGES, CpuDenseKernel
    from server.model.config import ModelConfig
    from server.model.llama import LlamaDecoder
    from server.model.loader import load_checkpoint
    from server.runtime import attach_wina, load_model
    from server.settings import ServerSettings

    sparsities = [float(s) for s in args.sparsities.split(",")]
    B = args.batch_size
    settings = ServerSettings(max_model_len=max(16, args.steps + 1), wina_profile="wina-uniform",
                              load_interventions=False, log_level="warning")
    loaded = load_model(settings)
    if loaded.model.dense_kernel is None:
        parser.error("the CPU decode kernel is unavailable here (it needs AVX2/FMA/F16C and gcc)")
    kernel, read_timers = CpuDenseKernel.load_stage_timed(Path(tempfile.mkdtemp()),
                                                          loaded.model.dense_kernel.instruction_set)
    ckpt = load_checkpoint(settings.model, settings.cache_dir)
    model = LlamaDecoder(ModelConfig.from_hf(ckpt.hf_config), ckpt.state_dict, loaded.model.dtype,
                         loaded.model.device, loaded.model.max_model_len, kernel)
    attach_wina(model, loaded.wina_profile, settings)
    step_tokens = wikitext_step_tokens(loaded.tokenizer)
    cache = model.new_cache(B * len(sparsities))
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    totals = {s: {name: 0.0 for name in [*STAGES, "step"]} for s in sparsities}
    for step in range(args.steps):
        tokens = step_tokens(step, B)
        for i, sparsity in enumerate(sparsities):
            slots = torch.arange(B) + i * B  # each sparsity its own cache slots
            plan = model.sparsity_plan([sparsity] * B, 1) if sparsity > 0 else None
            before = read_timers()
            start = time.perf_counter()
            model(tokens, slots, torch.full((B,), step), cache, sparsity=plan)
            elapsed = time.perf_counter() - start
            if step >= WARMUP_STEPS:
                for name, seconds in read_timers().items():
                    totals[sparsity][name] += seconds - before[name]
                totals[sparsity]["step"] += elapsed
    counted = args.steps - WARMUP_STEPS
    rows = []
    for sparsity in sparsities:
        ms = {name: seconds / counted * 1e3 for name, seconds in totals[sparsity].items()}
        projections = ms["qkv"] + ms["o"] + ms["gate_up"] + ms["down"]
        rows.append({"sparsity": sparsity, **{f"{name}_ms": value for name, value in ms.items()},
                     "projections_ms": projections, "rest_ms": ms["step"] - ms["layer"] - ms["dense_linear"]})
    dense = next((r for r in rows if r["sparsity"] == 0), None)
    headers = ["sparsity", "qkv", "attention", "o", "gate/up", "down", "projections", "x dense", "layers",
               "LM head", "rest", "step"]
    table = [[f"{r['sparsity']:.2f}", *(f"{r[f'{name}_ms']:.2f}" for name in STAGES[:5]), f"{r['projections_ms']:.2f}",
              f"{r['projections_ms'] / dense['projections_ms']:.2f}" if dense else "-", f"{r['layer_ms']:.2f}",
              f"{r['dense_linear_ms']:.2f}", f"{r['rest_ms']:.2f}", f"{r['step_ms']:.2f}"] for r in rows]
    title = (f"decode_breakdown  {started}  {loaded.name}  batch {B}  {args.steps} steps (first {WARMUP_STEPS} not "
             f"counted)  CPU kernel {kernel.instruction_set}  ms per step; 'x dense': the projections' time over dense's")
    report_text = "\n".join([title, format_table(headers, table)])
    report = {"benchmark": "decode_breakdown", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "batch_size": B, "steps": args.steps,
              "warmup_steps": WARMUP_STEPS, "instruction_set": kernel.instruction_set, "results": rows}
    write_report(report, report_text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
