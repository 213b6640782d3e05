#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call: for a lent GPU machine (docs/gpu.md says how to
# prepare one) or any CUDA box with the project installed.
#
#   OUT=DIR bash scripts/gpu_checks.sh [tune] [kernels] [tests] [kernels-bf16] [decode] [startup] [serve]   (default: all)
#
# KERNEL_ARGS and DECODE_ARGS replace the microbenchmark's and the decode benchmark's default
# options (to fit a short lease).
#
# tune          tune the kernels' launch parameters for this GPU (benchmarks/wina_tune_gpu.py) into
#               $OUT/wina_configs.json, which every later step then uses (commit it as
#               kernels/configs/<GPU name>.json)
# kernels       Triton sparse GEMV vs cuBLAS (benchmarks/wina_kernel_gpu.py), float16, batch 1..8,
#               and on the default model's own layer and inputs where .gpu/wina_real_inputs.safetensors
#               exists (benchmarks/wina_real_inputs.py saves it)
# tests         pytest -m gpu: compiled kernels against the references, model/sparsity/interventions/engine
# kernels-bf16  the same microbenchmark in bfloat16, batch 1 and 8
# decode        engine decode tok/s on CUDA at each sparsity (benchmarks/wina_speed.py) after
#               `calibrate wina --device cuda`; on the default model, or on a random-weight stand-in
#               of its shapes where its GGUF is not installed
# startup       launch to healthy of `neuronserve serve --device cuda`, cold (empty caches, Triton's too)
#               and warm (benchmarks/startup.py), on the same model as decode
# serve         streaming clients against `neuronserve serve --device cuda` at 1, 8 and 16 concurrent
#               streams (benchmarks/serve_load.py), on the same model as decode
#
# Logs go to $OUT/gpu_checks.log, reports to $OUT/*.json. Each step has its own time limit, and a
# failing step does not stop the later ones. The exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu_checks.log
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages a bare machine lacks, carried as wheels (docs/gpu.md)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 100
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu/tokenizer ] && export NEURONSERVE_TEST_TOKENIZER=$PWD/.gpu/tokenizer
[ -d .gpu/data ] && export NEURONSERVE_DATA_DIR=$PWD/.gpu/data

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log everything, print the tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$LOG"

served_model() {  # the default model where installed, else a random-weight stand-in of its shapes
    if python3 -c "from server.model.loader import resolve_model_path as r; r('default')" 2>/dev/null; then
        echo default
        return
    fi
    [ -d /tmp/neuronserve-stand-in ] ||
        step stand-in 60 python3 benchmarks/stand_in_model.py /tmp/neuronserve-stand-in --tokenizer .gpu/tokenizer >&2
    echo /tmp/neuronserve-stand-in
}

real_inputs=()
[ -f .gpu/wina_real_inputs.safetensors ] && real_inputs=(--real-inputs .gpu/wina_real_inputs.safetensors)
steps=${*:-tune kernels tests kernels-bf16 decode startup serve}
for s in $steps; do
    case $s in
    tune)
        # the broadcast path at batch 1 too, for the comparison in the kernels step (never served)
        step tune-broadcast 120 python3 benchmarks/wina_tune_gpu.py --path broadcast --batches 1 \
            --configs "$OUT/wina_configs_broadcast.json" --out "$OUT/wina_tune_gpu_broadcast.json"
        step tune 240 python3 benchmarks/wina_tune_gpu.py --configs "$OUT/wina_configs.json" \
            --out "$OUT/wina_tune_gpu.json"
        [ -f "$OUT/wina_configs.json" ] && export NEURONSERVE_WINA_CONFIGS=$OUT/wina_configs.json
        ;;
    kernels)
        broadcast=()
        [ -f "$OUT/wina_configs_broadcast.json" ] && broadcast=(--broadcast-configs "$OUT/wina_configs_broadcast.json")
        # shellcheck disable=SC2086  # KERNEL_ARGS is a list of options
        step kernels 300 python3 benchmarks/wina_kernel_gpu.py ${KERNEL_ARGS:---batches 1,2,4,8 --rep-ms 20 --warmup-ms 10} \
            "${real_inputs[@]}" "${broadcast[@]}" --out "$OUT/wina_kernel_gpu_float16.json"
        ;;
    tests)
        step tests 240 env TRITON_INTERPRET=0 python3 -m pytest -m gpu -rA -s -p no:cacheprovider \
            tests/test_gpu.py tests/test_wina_triton.py
        ;;
    kernels-bf16)
        step kernels-bf16 60 python3 benchmarks/wina_kernel_gpu.py --dtype bfloat16 --batches 1,8 --rep-ms 20 \
            --out "$OUT/wina_kernel_gpu_bfloat16.json"
        ;;
    decode)
        model=$(served_model)
        step calibrate 90 python3 -m server.cli calibrate wina --model "$model" --device cuda --sequences 8
        # shellcheck disable=SC2086  # DECODE_ARGS is a list of options
        step decode 240 python3 benchmarks/wina_speed.py --model "$model" --device cuda --skip-micro \
            --skip-llama-cpp ${DECODE_ARGS:---sparsities 0.25 0.5 0.65 0.9 --repeats 3} --out "$OUT/wina_speed_gpu.json"
        ;;
    startup)
        model=$(served_model)
        step startup 240 python3 benchmarks/startup.py --repeats 1 --model "$model" --device cuda \
            --out "$OUT/startup_gpu.json"
        ;;
    serve)
        model=$(served_model)
        prompts=()
        [ -f .gpu/data/alpaca/seed_tasks.jsonl ] && prompts=(--prompts .gpu/data/alpaca/seed_tasks.jsonl)
        step serve 240 python3 benchmarks/serve_load.py --launch --server-arg=--model="$model" \
            --server-arg=--device=cuda --concurrency 1,8,16 --requests-per-level 48 "${prompts[@]}" \
            --out "$OUT/serve_load_gpu.json"
        ;;
    *) echo "unknown step $s" | tee -a "$LOG"; failed=$((failed + 1)) ;;
    esac
done
# The reply of a lent machine carries only the end of the output: the summaries last.
echo "=== summary"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|^=+ .*(passed|failed|error)" "$LOG" | grep -v "^PASSED" | tail -n 40
grep -E "max \|" "$LOG" | tail -n 60
for f in "$OUT"/*.json; do
    [ -f "$f" ] && python3 - "$f" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
name = sys.argv[1].rsplit("/", 1)[-1]
if report.get("benchmark") == "wina_tune_gpu":
    for c in report["cases"]:
        for b in c["batches"]:
            b = str(b) if str(b) in c["best_us"] else b
            print(f"{name}: {c['layer']} B={b} tuned {c['best_us'][b]:.1f} us, heuristic "
                  f"{(c['heuristic_us'] or {}).get(b, 0):.1f}, cuBLAS {c['dense_us'][b]:.1f} "
                  f"(x{c['x_dense'][b]:.2f}) {c['best']}")
    sys.exit()
for c in report.get("cases", []):
    if c["sparsity"] == 0.5 or c["layer"].startswith("real_"):
        dot = f"; broadcast path {c['broadcast_graph_us']:.1f}" if "broadcast_graph_us" in c else ""
        steps = "+".join(f"{v:.1f}" for v in c.get("gather_steps_us", {}).values())
        print(f"{name}: {c['layer']} B={c['batch']} s={c['sparsity']:.2f} graph: gather {c['gather_graph_us']:.1f} "
              f"(steps {steps}; best {c['gather_best_us']:.1f} {c['gather_best']}), tile {c['triton_graph_us']:.1f}, cuBLAS "
              f"{c['dense_graph_us']:.1f} us (gather x{c['dense_graph_us'] / c['gather_graph_us']:.2f}, rows read "
              f"{c['rows_read']:.2f}); eager gather {c['gather_eager_us']:.1f} vs {c['dense_us']:.1f}{dot}")
        if len(c.get("gather_all_us", {})) > 1:  # --gather-grid: every variant's time
            print("   ", ", ".join(f"{k} {v:.1f}" for k, v in c["gather_all_us"].items()))
if "cold_median_s" in report:
    print(f"{name}: launch to healthy on {report['device']}, model {report['model']}: cold {report['cold_s']}, "
          f"warm {report['warm_s']} s")
for level in report.get("levels", []):
    ratio = level["output_throughput_ratio_vs_c1"]  # None when the first level produced nothing
    print(f"{name}: {level['concurrency']} streams: {level['output_throughput_tok_s']:.1f} tok/s "
          f"({'n/a' if ratio is None else f'{ratio:.2f}x'} the first level), {level['failed']} failed")
decode = report.get("decode")
if decode:
    for r in decode["rows"]:
        print(name, "batch", r["batch"], "sparsity", r["sparsity"], "tok/s", round(r["decode_tok_s"], 1),
              "x dense", round(r["ratio_to_dense"], 3), "achieved", round(r["achieved_sparsity"], 3))
PY
done
exit "$failed"
