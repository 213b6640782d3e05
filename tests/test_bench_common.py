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
