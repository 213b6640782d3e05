"""Real projection inputs of the default model, for the GPU kernel benchmark and the batch question.

A sparse kernel at batch B reads every weight row that *some* row keeps, so what it can save at
B > 1 depends on how much concurrent requests' masks overlap. Random inputs overlap as independent
draws do (at 50 %, 8 rows leave 0.5**8 = 0.4 % of the rows unread); real activations share their
large channels, so they overlap more. This measures it on the default model:

1. ``--sequences`` (8) windows of ``--tokens`` (64) tokens of WikiText-2 *test* text (never the
   calibration text) go through the served model (the torch path, masked dense: the dense
   model's activations), and the input of every projection of every layer is recorded.
2. At each position, the 8 windows' rows stand for one decode step of 8 concurrent requests. With
   the served WINA profile's thresholds at ``--sparsity`` (0.5), for each projection: the share of
   channels one row keeps, and the share that at least one of the 8 rows keeps (the rows the
   kernel reads at batch 8), against the independent-rows value 1 - s**8.
   Also, per projection, how often one row keeps each channel (a histogram over all layers'
   channels): whether a static channel order could gather the kept rows into long runs.
3. One layer's (``--layer``, default the middle one) weights, criterion factors, thresholds and
   the 8 rows of the last position go to ``--save`` (safetensors, a few MB), which
   ``benchmarks/wina_kernel_gpu.py --real-inputs FILE`` times on a GPU: batch 1 on row 0 and batch
   8 on all rows, with the calibrated thresholds.

    python benchmarks/wina_real_inputs.py [--save benchmarks/out/wina_real_inputs.safetensors]

Text to stdout, JSON to ``--out``. Runs on the CPU in about a minute.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from bench_common import command_line, describe_machine, fmt, format_table, write_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "wina_real_inputs.json"
DEFAULT_SAVE = PROJECT_ROOT / "benchmarks" / "out" / "wina_real_inputs.safetensors"
# (name, block of a decoder layer, its Linear attribute); the block's SparseProjection is
# `sparse_<name>`, which knows its columns of the [*, 7] threshold table
PROJECTIONS = (("qkv", "attn", "qkv"), ("o", "attn", "o_proj"), ("gate_up", "mlp", "gate_up"), ("down", "mlp", "down"))


def sparse_projection(layer, block: str, name: str):
    """The decoder layer's SparseProjection for projection `name` (set by attach_sparsity)."""
    return getattr(getattr(layer, block), f"sparse_{name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8, help="concurrent requests (rows of a step)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per window (positions measured)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (served profile)")
    parser.add_argument("--layer", type=int, default=None, help="layer saved for the GPU (default: middle)")
    parser.add_argument("--save", type=Path, default=DEFAULT_SAVE, help="safetensors for wina_kernel_gpu.py")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    return parser.parse_args(argv)


def recorder(linear):
    """A module that stands in for one projection (our Linear) and keeps a copy of every input."""
    from torch import nn

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear
            self.inputs: list = []

        def forward(self, x):
            self.inputs.append(x.detach().float().clone())
            return self.linear.forward(x)

        def forward_swiglu(self, x):
            self.inputs.append(x.detach().float().clone())
            return self.linear.forward_swiglu(x)

    return Recorder()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from server.calibration.data import default_data_dir
    from server.runtime import load_model
    from server.settings import ServerSettings

    loaded = load_model(ServerSettings(device="cpu", cpu_dense_kernel=False, log_level="warning"))
    model, table = loaded.model, loaded.model.wina
    if table is None:
        sys.exit("wina_real_inputs: the served model has no WINA profile")
    text = (default_data_dir() / "wikitext2" / "wiki.test.raw.nonblank-crlf").read_text(encoding="utf-8")
    ids = loaded.tokenizer(text[:200_000])["input_ids"]
    stride = len(ids) // args.sequences
    windows = torch.tensor([ids[i * stride: i * stride + args.tokens] for i in range(args.sequences)])  # [R, T]

    # Record through our own module objects for this run only (no third-party code is touched).
    recorders = {}
    for i, layer in enumerate(model.layers):
        for name, block, attr in PROJECTIONS:
            owner = getattr(layer, block)
            recorders[i, name] = recorder(getattr(owner, attr))
            setattr(owner, attr, recorders[i, name])
    cache = model.new_cache(args.sequences)
    model.forward(windows, torch.arange(args.sequences), torch.zeros(args.sequences, dtype=torch.long), cache)

    thresholds = table.thresholds_for(torch.tensor([args.sparsity]))[:, 0]  # [L, 7]
    batches = [b for b in (1, 2, 4, 8, 16, 32) if b <= args.sequences]
    rows = []
    for name, block, _ in PROJECTIONS:
        union: dict[int, list[float]] = {b: [] for b in batches}  # per batch size, per layer
        frequencies = []  # per layer: [K], the share of rows (windows x positions) keeping each channel
        for i, layer in enumerate(model.layers):
            x = recorders[i, name].inputs[0]  # [R, T, K]
            projection = sparse_projection(layer, block, name)
            lo, hi = projection.columns
            keep = x.abs().unsqueeze(2) * projection.col_norms > thresholds[i, lo:hi].view(1, 1, -1, 1)  # [R, T, G, K]
            for b in batches:  # the first b windows as one step's rows
                union[b].append(keep[:b].any(dim=0).float().mean().item())
            frequencies.append(keep.any(dim=2).reshape(-1, keep.shape[-1]).float().mean(0))  # [K]
        # How often each channel is kept by one row: near 0 or 1 for many channels would let a
        # static reordering of the channels turn the masks into long runs of rows (cheaper reads
        # on a CPU whose prefetcher fetches short gaps anyway); near s for most, it cannot.
        histogram = torch.histc(torch.cat(frequencies), bins=10, min=0, max=1) / sum(len(f) for f in frequencies)
        rows.append({"projection": name, "rows_read": {b: sum(u) / len(u) for b, u in union.items()},
                     "rows_read_per_layer": union, "channel_keep_frequency_deciles": histogram.tolist()})

    layer_index = len(model.layers) // 2 if args.layer is None else args.layer
    layer = model.layers[layer_index]
    tensors = {}
    for name, block, _ in PROJECTIONS:
        projection = sparse_projection(layer, block, name)
        lo, hi = projection.columns
        tensors[f"{name}.weight"] = projection.linear.weight.contiguous()  # [N, K] in the served dtype
        tensors[f"{name}.col_norms"] = projection.col_norms.float().contiguous()  # [G, K]
        tensors[f"{name}.thresholds"] = thresholds[layer_index, lo:hi].float().contiguous()  # [G]
        tensors[f"{name}.x"] = recorders[layer_index, name].inputs[0][:, -1].contiguous()  # [R, K] last position
        tensors[f"{name}.segments"] = torch.tensor(projection.segments)
    args.save.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.save), metadata={"layer": str(layer_index), "sparsity": str(args.sparsity),
                                                 "criterion": table.criterion, "model": loaded.name})

    headers = ["projection", *(f"B={b}" for b in batches)]
    table_rows = [[r["projection"], *(fmt(r["rows_read"][b], 3) for b in batches)] for r in rows]
    table_rows.append(["independent rows", *(fmt(1 - args.sparsity ** b, 3) for b in batches)])
    text_out = (f"Real projection inputs of {loaded.name}, WikiText-2 test, {args.sequences} windows x "
                f"{args.tokens} positions, {table.criterion} profile at sparsity {args.sparsity} "
                "(means over layers and positions): share of weight rows that some row of a batch of "
                "B windows keeps, which a sparse kernel must read\n\n" + format_table(headers, table_rows)
                + "\n\nChannels by how often one row keeps them (share of all layers' channels per "
                "decile of keep frequency, 0-0.1 ... 0.9-1)\n\n"
                + format_table(["projection", *(f"{d / 10:.1f}" for d in range(10))],
                               [[r["projection"], *(fmt(v, 3) for v in r["channel_keep_frequency_deciles"])]
                                for r in rows])
                + f"\n\nsaved layer {layer_index} for the GPU benchmark: {args.save}")
    report: dict[str, Any] = {
        "benchmark": "wina_real_inputs",
        "command": command_line(argv),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(), "model": loaded.name, "criterion": table.criterion,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "projections": rows, "saved_layer": layer_index,
    }
    write_report(report, text_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
