"""What this CPU can do, detected rather than assumed, and FAISS's BLAS set to match.

Used by ``helpers.index`` (every FAISS import goes through :func:`import_faiss`)
and printed by notebook 02.  Machines of the same size differ: an AMD EPYC with
AVX2 only, an Intel Xeon with AVX-512 and fast bf16 (AVX-512-bf16 and AMX), an
AMD EPYC with AVX-512 and AVX-512-bf16.  Two things follow:

* The OpenBLAS that faiss-cpu bundles (0.3.15 in faiss-cpu 1.15.1) predates some
  CPUs and then falls back to kernels far below what they can run: its generic
  "Prescott" on an AVX-512 Xeon (~22 against ~72 GFLOP/s for exact search), its
  "Barcelona" (an SSE3 Opteron's) on an AVX-512 AMD EPYC (102 against 354 GFLOP/s
  with SkylakeX, 229 with Haswell).  OpenBLAS reads ``OPENBLAS_CORETYPE`` when it
  loads, so :func:`import_faiss` asks a short-lived subprocess which kernel it
  would pick and, where that kernel uses less of the CPU's vector width than it
  has, sets the variable (``SkylakeX`` with AVX-512, ``Haswell`` with AVX2) before
  FAISS loads.  The search results are the same with either kernel.
* bf16 matmuls are fast only with AVX-512-bf16 or AMX (:func:`fast_bf16`);
  elsewhere PyTorch emulates them, 8x slower than float32.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

# OpenBLAS's x86-64 kernel families by the widest vectors they use (lower case);
# a name not listed (an old or unknown one) counts as level 0.
KERNEL_LEVEL = {
    **dict.fromkeys(["sandybridge", "bulldozer", "piledriver", "steamroller"], 1),  # AVX
    **dict.fromkeys(["haswell", "zen", "excavator"], 2),                            # AVX2
    **dict.fromkeys(["skylakex", "cooperlake", "sapphirerapids"], 3),               # AVX-512
}
CORETYPE_FOR_LEVEL = {3: "SkylakeX", 2: "Haswell"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (AVX-512-bf16 or AMX)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def autocast_dtype(device="cpu"):
    """``torch.bfloat16`` where bf16 matmuls are native on ``device``, else None (float32).

    A CPU needs AVX-512-bf16 or AMX (``fast_bf16``); elsewhere PyTorch emulates
    bf16 and autocast is slower than float32.  A CUDA GPU needs bf16 support
    (Ampere or later; a Colab T4 has none).  Pass the result to
    ``train_decoder(autocast=...)``.
    """
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if fast_bf16() else None
    if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _bundled_openblas() -> Path | None:
    """faiss-cpu's own OpenBLAS library, found without importing faiss."""
    import importlib.util

    spec = importlib.util.find_spec("faiss")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "faiss_cpu.libs"
    found = sorted(libs.glob("libopenblas*.so*")) if libs.is_dir() else []
    return found[0] if found else None


def openblas_kernel(library: Path | None = None, env: dict | None = None) -> str | None:
    """The kernel family OpenBLAS picks for this CPU (e.g. ``Zen``, ``Prescott``).

    Asked in a subprocess, so the answer does not depend on (or change) this
    process.  ``None`` where there is no bundled OpenBLAS or it cannot say.
    """
    library = library or _bundled_openblas()
    if library is None:
        return None
    code = ("import ctypes,sys; lib = ctypes.CDLL(sys.argv[1]); "
            "lib.openblas_get_corename.restype = ctypes.c_char_p; "
            "print(lib.openblas_get_corename().decode())")
    env = dict(os.environ if env is None else env)  # its libgfortran lies beside it
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(library.parent),
                                                           env.get("LD_LIBRARY_PATH")]))
    try:
        out = subprocess.run([sys.executable, "-c", code, str(library)], capture_output=True,
                             text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_level(flags=None) -> int:
    """The widest vectors this CPU runs, on ``KERNEL_LEVEL``'s scale (3 = AVX-512)."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags and "avx512bw" in flags:
        return 3
    if "avx2" in flags and "fma" in flags:
        return 2
    return 1 if "avx" in flags else 0


def better_coretype(kernel: str | None, flags=None) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to use instead of ``kernel``, or None to keep it.

    Replaces a kernel family that uses narrower vectors than the CPU has
    (``Prescott`` or ``Barcelona`` on an AVX-512 CPU, ``Zen`` there too).
    """
    flags = cpu_flags() if flags is None else flags
    if kernel is None:
        return None
    have = cpu_level(flags)
    if KERNEL_LEVEL.get(kernel.lower(), 0) >= have:
        return None
    return CORETYPE_FOR_LEVEL.get(have)


@functools.lru_cache(maxsize=1)
def prepare_openblas() -> str:
    """Set ``OPENBLAS_CORETYPE`` if faiss's OpenBLAS would fall back; say what was found.

    Must run before faiss is imported (OpenBLAS reads the variable at load).
    Leaves a value the user set alone.
    """
    if "OPENBLAS_CORETYPE" in os.environ:
        chosen = os.environ["OPENBLAS_CORETYPE"]
        better = better_coretype(chosen)
        hint = (f"; this CPU's vectors are wider: unset it to let the helpers set {better}"
                if better else "")
        return f"OPENBLAS_CORETYPE={chosen} (set by you{hint})"
    if "faiss" in sys.modules:
        return "faiss was imported already: OpenBLAS kernel left as it chose"
    kernel = openblas_kernel()
    better = better_coretype(kernel)
    if better is None:
        return f"faiss's OpenBLAS kernel: {kernel or 'unknown'}"
    os.environ["OPENBLAS_CORETYPE"] = better
    return (f"faiss's OpenBLAS does not know this CPU (it would use its {kernel} kernels, "
            f"made for narrower vectors): set OPENBLAS_CORETYPE={better}")


def import_faiss():
    """``import faiss``, after :func:`prepare_openblas`."""
    prepare_openblas()
    import faiss

    return faiss


def describe() -> str:
    """One line on what was detected, for a notebook to print."""
    flags = cpu_flags()
    simd = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
            else "no AVX2" if flags else "unknown SIMD")
    bf16 = ("fast bf16 (AVX-512-bf16/AMX)" if fast_bf16()
            else "no fast bf16 (float32 is faster here)")
    return f"CPU: {simd}, {bf16}; {prepare_openblas()}"
