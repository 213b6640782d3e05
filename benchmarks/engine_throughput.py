"""Generation throughput of the engine in-process (no HTTP, no client on the same cores): N
requests of serve_load.py's prompts (Alpaca seed tasks), greedy with ignore_eos, submitted at once
to an engine with C slots, so C run at a time and each finished one is replaced at the next step,
as C closed-loop clients would keep it; for each C, with a prompt chunk and the decode step in one
pass (the served engine) and in separate passes, interleaved. Tokens generated / wall time, and
each C's throughput over C = 1's: what the engine itself does with concurrent streams, apart from
serve_load.py's HTTP and load generator.

    python benchmarks/engine_throughput.py [--concurrency 1,8] [--requests 32] [--max-tokens 64]
        [--rounds 2] [--sparsity S] [--out benchmarks/out/engine_throughput.json]

--sparsity S runs every request at WINA sparsity S (a sparse prompt's chunks then share the decode
pass as dense ones do, where the fused layers run sparse rows).

Prints a table, writes JSON. Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

from bench_common import command_line, describe_machine, format_table, write_report
from serve_load import DEFAULT_PROMPTS, load_prompts

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "engine_throughput.json"


def run_once(loaded, prompts: list[tuple[int, ...]], concurrency: int, max_tokens: int, merge: bool,
             prefill_chunk_tokens: int, sparsity: float = 0.0) -> dict:
    from server.engine.offline import OfflineGenerator
    from server.engine.request import SamplingParams

    generator = OfflineGenerator(loaded, max_batch_size=concurrency, prefill_chunk_tokens=prefill_chunk_tokens,
                                 merge_prompt_chunks=merge)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = generator.generate([list(ids) for ids in prompts], params, sparsity=sparsity)
    seconds = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    return {"generated_tokens": generated, "seconds": seconds, "tok_s": generated / seconds,
            "steps": generator.engine.steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8", help="engine slots (comma-separated; the first is the baseline)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case (median)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="prompt tokens per prefill step (default: the server's default)")
    parser.add_argument("--prompts", type=Path, default=None, help=f"JSONL prompts (default {DEFAULT_PROMPTS})")
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="every request's WINA sparsity (default 0: dense), with the wina-uniform profile")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in levels) or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        parser.error("concurrency levels, --requests, --max-tokens and --rounds must be positive")
    if not 0 <= args.sparsity <= 0.9:
        parser.error("--sparsity must be in [0, 0.9]")
    from server.runtime import load_model
    from server.settings import ServerSettings

    settings = ServerSettings(log_level="warning", load_interventions=False, wina_profile="wina-uniform")
    chunk = args.prefill_chunk_tokens or settings.prefill_chunk_tokens
    loaded = load_model(settings)
    if args.sparsity > 0 and loaded.model.wina is None:
        raise SystemExit("no WINA profile for this model: run `neuronserve calibrate wina` first")
    texts, source = load_prompts(args.prompts)
    prompts = [tuple(loaded.tokenizer.encode(texts[i % len(texts)])) for i in range(args.requests)]
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cases = [(c, merge) for c in levels for merge in (True, False)]
    runs: dict[tuple[int, bool], list[dict]] = {case: [] for case in cases}
    run_once(loaded, prompts[:2], levels[0], 4, True, chunk)  # warm-up
    for _ in range(args.rounds):
        for concurrency, merge in cases:
            runs[(concurrency, merge)].append(run_once(loaded, prompts, concurrency, args.max_tokens, merge, chunk,
                                                       args.sparsity))
    tok_s = {case: statistics.median(r["tok_s"] for r in runs[case]) for case in cases}
    rows = [{"concurrency": c, "merged_prompt_chunks": merge, "tok_s": tok_s[(c, merge)],
             "ratio_vs_first_level": tok_s[(c, merge)] / tok_s[(levels[0], merge)],
             "merge_gain": tok_s[(c, True)] / tok_s[(c, False)], "runs": runs[(c, merge)]} for c, merge in cases]
    title = (f"engine_throughput  {started}  {loaded.name}  {args.requests} requests x {args.max_tokens} tokens, "
             f"prompts {source}, prefill chunks of {chunk}, sparsity {args.sparsity:g}  "
             f"(median of {args.rounds} interleaved rounds)")
    text = "\n".join([
        title,
        format_table(["concurrency", "prompt chunk with decode", "tok/s", f"x concurrency {levels[0]}",
                      "merged / separate"],
                     [[str(r["concurrency"]), "one pass" if r["merged_prompt_chunks"] else "separate passes",
                       f"{r['tok_s']:.1f}", f"{r['ratio_vs_first_level']:.2f}",
                       f"{r['merge_gain']:.3f}" if r["merged_prompt_chunks"] else ""] for r in rows]),
    ])
    report = {"benchmark": "engine_throughput", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "requests": args.requests,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "prompts": source,
              "prefill_chunk_tokens": chunk, "sparsity": args.sparsity, "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
