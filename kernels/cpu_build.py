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
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
# the kernels' dtype codes (kernels/csrc/simd_cpu.h)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class InstructionSet:
    """A build of the kernels: the CPU flags (/proc/cpuinfo) it needs and the compiler flags that
    enable them. The sources pick their vector width from the compiler's macros (__AVX512F__);
    every build computes the same float32 chains, so the choice changes speed, never results."""

    name: str
    cpu_flags: frozenset[str]
    compile_flags: tuple[str, ...]


AVX2 = InstructionSet("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c"))
AVX512 = InstructionSet("avx512", AVX2.cpu_flags | {"avx512f", "avx512vl", "avx512bw", "avx512dq"},
                        AVX2.compile_flags + ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"))
INSTRUCTION_SETS = {isa.name: isa for isa in (AVX2, AVX512)}  # the last one a CPU supports is the default


def cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return frozenset()


def supported_instruction_sets(flags: frozenset[str] | None = None) -> list[InstructionSet]:
    """The builds a CPU with these flags (default: this one's) can run, slowest first."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa in INSTRUCTION_SETS.values() if isa.cpu_flags <= flags]


def pick_instruction_set(requested: str = "auto", flags: frozenset[str] | None = None) -> InstructionSet | None:
    """`requested` ("auto": the widest the CPU supports, else a name of INSTRUCTION_SETS) if a CPU
    with these flags (default: this one's) runs it, else None."""
    supported = supported_instruction_sets(flags)
    if requested == "auto":
        return supported[-1] if supported else None
    if requested not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {requested!r}: auto or one of {sorted(INSTRUCTION_SETS)}")
    return INSTRUCTION_SETS[requested] if INSTRUCTION_SETS[requested] in supported else None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "neuronserve" / "kernels"


def build_library(source: Path, cache_dir: Path, isa: InstructionSet = AVX2, defines: tuple[str, ...] = ()) -> Path:
    """Compile `source` (with the shared headers beside it) for `isa`, with the macros `defines`
    (e.g. NEURONSERVE_STAGE_TIMERS, for benchmarks), once per version into cache_dir; concurrent
    builds are safe (each writes a temporary file and renames it into place)."""
    flags = [*BASE_FLAGS, *isa.compile_flags, *(f"-D{name}" for name in defines)]
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(flags).encode())
    target = cache_dir / f"{source.stem}-{isa.name}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError(f"no C compiler (gcc) found to build {source.name}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", str(tmp_path), "-lm"],
                       check=True, capture_output=True, text=True)
        tmp_path.replace(target)
    except subprocess.CalledProcessError as error:
        tmp_path.unlink(missing_ok=True)
        raise RuntimeError(f"building {source.name} failed:\n{error.stderr}") from error
    return target


def load_library(source: Path, cache_dir: Path | None, fallback: str,
                 instruction_set: str = "auto") -> tuple[ctypes.CDLL, InstructionSet] | None:
    """The built library of `source` for `instruction_set` (see pick_instruction_set) and the build
    it is, or None (with a warning that ends in `fallback`, what the caller does instead) where it
    cannot run: a CPU without that build's flags (AVX2/FMA/F16C at least), or no working compiler."""
    isa = pick_instruction_set(instruction_set)
    if isa is None:
        logger.warning("CPU lacks the %s instructions for %s: %s",
                       "AVX2/FMA/F16C" if instruction_set == "auto" else instruction_set, source.name, fallback)
        return None
    try:
        return ctypes.CDLL(str(build_library(source, cache_dir or default_cache_dir(), isa))), isa
    except (RuntimeError, OSError) as error:
        logger.warning("%s unavailable (%s): %s", source.name, error, fallback)
        return None
