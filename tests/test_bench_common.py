"""Helpers the benchmark scripts share (benchmarks/bench_common.py)."""

from __future__ import annotations

import math
import os
import sys

import pytest

from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from bench_common import run_in_fresh_process  # a script's helpers, not a package


def test_a_fresh_process_returns_its_result():
    assert run_in_fresh_process(math.factorial, 10) == 3628800


def test_a_process_that_dies_raises_instead_of_hanging():
    """As a llama.cpp build whose instructions this CPU lacks does (SIGILL): a multiprocessing.Pool
    waited for its result forever."""
    with pytest.raises(RuntimeError, match="_exit: its process died"):
        run_in_fresh_process(os._exit, 3)


def test_wina_speed_says_why_llama_cpp_is_missing():
    """A skipped llama.cpp run once read as 'not installed'."""
    from wina_speed import format_report

    decode = {"dtype": "torch.float16", "profile": "wina-uniform", "kernel": "cpu", "tokens": 8, "repeats": 1,
              "rows": [{"batch": 1, "sparsity": 0.0, "achieved_sparsity": 0.0, "decode_tok_s": 80.0,
                        "ratio_to_dense": 1.0}]}
    base = {"machine": {"cpu_model_name": "cpu", "cpu_count": 2}, "utc": "now", "command": "cmd", "decode": decode}
    texts = {name: format_report({**base, **extra}) for name, extra in [
        ("skipped", {"llama_cpp": {"skipped": "--skip-llama-cpp"}}), ("absent", {}),
        ("error", {"llama_cpp": {"error": "its process died"}}), ("ran", {"llama_cpp": {"tok_s": 40.0}})]}
    assert "llama.cpp: not run (--skip-llama-cpp)" in texts["skipped"] and "not installed" not in texts["skipped"]
    assert "not installed" in texts["absent"]
    assert "llama.cpp: its process died" in texts["error"]
    assert "40.0 tok/s" in texts["ran"] and "2.00" in texts["ran"]  # 80 / 40 in the x llama.cpp column
