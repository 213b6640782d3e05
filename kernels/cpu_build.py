"""Building the CPU kernels in kernels/csrc: each .c file is compiled by the system C compiler on
first use into a shared library cached per source version, and called through ctypes.

Why C and not a torch extension: the kernels need no torch headers, so each compiles in about a
second with only `gcc` (a torch C++ extension takes a minute and needs matching headers), and a
ctypes call costs a few microseconds, no more than a torch op's dispatch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
# the kernels' dtype codes (kernels/csrc/simd_cpu.h)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "neuronserve" / "kernels"


def cpu_supports_kernels() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def build_library(source: Path, cache_dir: Path) -> Path:
    """Compile `source` (with the shared headers beside it) once per version into cache_dir;
    concurrent builds are safe (each writes a temporary file and renames it into place)."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    target = cache_dir / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError(f"no C compiler (gcc) found to build {source.name}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", str(tmp_path), "-lm"],
                       check=True, capture_output=True, text=True)
        tmp_path.replace(target)
    except subprocess.CalledProcessError as error:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"building {source.name} failed:\n{error.stderr}") from error
    return target


def load_library(source: Path, cache_dir: Path | None, fallback: str) -> ctypes.CDLL | None:
    """The built library of `source`, or None (with a warning that ends in `fallback`, what the
    caller does instead) where it cannot run: no AVX2/FMA/F16C, or no working compiler."""
    if not cpu_supports_kernels():
        logger.warning("CPU lacks AVX2/FMA/F16C for %s: %s", source.name, fallback)
        return None
    try:
        return ctypes.CDLL(str(build_library(source, cache_dir or default_cache_dir())))
    except (RuntimeError, OSError) as error:
        logger.warning("%s unavailable (%s): %s", source.name, error, fallback)
        return None
