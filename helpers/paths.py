"""Where the tutorial keeps downloads, caches and artifacts.

Everything lives under ``data/`` at the repository root, so a learner can see
(and delete) what the notebooks built.  Set ``MEMDEC_DATA_DIR`` to put it
elsewhere, e.g. on a larger disk or on Google Drive in Colab.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_dir() -> Path:
    """Root folder for data: ``$MEMDEC_DATA_DIR`` or ``<repo>/data``.

    A ``MEMDEC_DATA_DIR`` that does not exist is refused rather than created:
    in Colab it is usually a Google Drive that is not mounted yet, and a
    folder created in its place would vanish with the runtime.
    """
    chosen = os.environ.get("MEMDEC_DATA_DIR")
    if chosen and not Path(chosen).expanduser().is_dir():
        raise FileNotFoundError(
            f"MEMDEC_DATA_DIR={chosen} does not exist. Create it (mkdir -p {chosen}), or in "
            "Colab mount your Drive first (from google.colab import drive; "
            "drive.mount('/content/drive')); unset MEMDEC_DATA_DIR to use "
            f"{REPO_ROOT / 'data'}.")
    root = Path(chosen).expanduser() if chosen else REPO_ROOT / "data"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of ``data/cache`` (created on demand)."""
    path = data_dir().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifacts_dir(tag: str = "") -> Path:
    """Folder for things the notebooks produce (metrics, checkpoints).

    ``tag`` is the run's size (``helpers.sizes``): the quick default writes to
    ``artifacts/quick/``, smoke runs (``MEMDEC_SMOKE=1``, the tests) to
    ``artifacts/smoke/``, the full size to ``artifacts/`` itself, so no size
    overwrites another's results.
    """
    if not isinstance(tag, str) or tag not in ("", "quick", "smoke"):
        raise ValueError(f"artifacts_dir: tag must be '', 'quick' or 'smoke' (a size's "
                         f"tag, helpers.sizes); got {tag!r}.")
    path = data_dir() / "artifacts" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then rename it into place.

    If the body raises (or the process is interrupted) ``target`` is never
    half-written: it either does not exist or holds the complete result.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Write a file under a temporary name, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(module, config: dict, folder) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically).

    The checkpoint format of the decoder and the α gate: weights without
    pickle, and a JSON config a person can read.
    """
    import json

    from safetensors.torch import save_model
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_model(module, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def update_metrics(values: dict, path: Path | None = None, tag: str = "") -> dict:
    """Merge ``values`` into ``data/artifacts/metrics.json`` (atomically).

    Notebooks 02-04 each add their figures; the README and later notebooks
    read them back.  ``tag``: the run's size, as for :func:`artifacts_dir`.
    Returns the merged dictionary.
    """
    import json

    path = Path(path) if path else artifacts_dir(tag) / "metrics.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(values)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=2, sort_keys=True))
    return merged


def machine_summary() -> dict:
    """Where a figure was measured: CPU, threads, GPU, PyTorch version, date."""
    import datetime
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def benchmark_results(name: str) -> tuple[dict, str] | None:
    """A benchmark's figures and where they came from, or ``None``.

    Your own finished run (``data/artifacts/<name>.json``) wins; otherwise the
    run shipped with the project (``benchmarks/results/<name>.json``, the
    figures the README quotes).  A run that was interrupted (``"partial"``) is
    skipped.
    """
    import json

    for path, origin in [(artifacts_dir() / f"{name}.json", "your run"),
                         (REPO_ROOT / "benchmarks" / "results" / f"{name}.json",
                          "the run shipped with the project")]:
        if path.exists():
            results = json.loads(path.read_text())
            if not results.get("partial"):
                return results, f"{path} ({origin})"
    return None


def write_results(name: str, results: dict) -> Path:
    """Print a benchmark's figures and save them to ``data/artifacts/<name>.json``.

    The file also records ``machine`` (:func:`machine_summary`), so a figure
    shown later says where it came from.
    """
    import json

    out = artifacts_dir() / f"{name}.json"
    out.write_text(json.dumps({**results, "machine": machine_summary()}, indent=2))
    width = max(map(len, results)) + 2
    for key, value in results.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else value
        print(f"{key:{width}s} {shown}")
    print(f"wrote {out}")
    return out
