"""Where the tutorial keeps downloads, caches and artifacts.

Everything lives under ``data/`` at the repository root, so a learner can see
(and delete) what the notebooks built.  Set ``MEMDEC_DATA_DIR`` to put it
elsewhere, e.g. on a larger disk or on Google Drive in Colab.
"""

from __future__ import annotations

import errno
import fnmatch
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
    return make_dir(Path(chosen).expanduser() if chosen else REPO_ROOT / "data")


def cache_dir(*parts: str) -> Path:
    """A sub-folder of ``data/cache`` (created on demand)."""
    return make_dir(data_dir().joinpath("cache", *parts))


def make_dir(path: Path) -> Path:
    """``mkdir -p path``; a read-only or full disk gets an error that names the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _save_error(path, err) from err
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
                         f"tag, helpers.sizes); got {tag!r}. Pass one of those, e.g. "
                         "pick_size(FULL).tag.")
    return make_dir(data_dir() / "artifacts" / tag)


@contextmanager
def atomic_dir(target: Path, owned=(), what: str = "this save's") -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in with renames.

    ``owned``: glob patterns of the names this save may replace (none by
    default: only a missing or empty ``target`` is replaced).  A ``target``
    that holds anything else (a user's notes, another checkpoint) is refused
    before any work, never emptied.  The old copy is renamed aside, the new
    one renamed in (both fsynced), and only then the old copy is deleted: if
    the body raises, the disk is full or the process is interrupted,
    ``target`` holds the previous result or the complete new one.
    """
    target = Path(target)
    refuse_foreign(target, owned, what)
    _restore_aside(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".new",
                                    dir=target.parent))
    except OSError as err:
        raise _save_error(target, err) from err
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except OSError as err:
            raise _save_error(target, err) from err
        refuse_foreign(target, owned, what)  # anything that appeared while we worked
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_foreign(target: Path, owned=(), what: str = "this save's") -> None:
    """Raise ``FileExistsError`` if ``target`` holds names no ``owned`` pattern covers."""
    target = Path(target)
    if target.is_file() or target.is_symlink():
        raise FileExistsError(f"{target} is a file, not a folder; the save needs a folder "
                              "there. Move or delete that file, or save somewhere else.")
    if not target.is_dir():
        return
    foreign = sorted(p.name for p in target.iterdir()
                     if not any(fnmatch.fnmatch(p.name, pat) for pat in owned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                          if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{target} is not {what} folder: it holds files this save did not write "
            f"({shown}). Saving replaces the whole folder, so nothing was saved and nothing "
            "was deleted. Move those files elsewhere, or save to another (new or empty) "
            "folder.")


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _restore_aside(target: Path) -> None:
    """A swap interrupted between its two renames left the old copy aside: put it back."""
    aside = _aside(target)
    if aside.is_dir():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)  # the swap had finished
        else:
            os.replace(aside, target)


def _swap_in(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target``; the previous ``target`` is deleted only afterwards."""
    aside = _aside(target)
    if aside.exists():
        shutil.rmtree(aside)
    had_old = target.exists()
    try:
        if had_old:
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if had_old:
                os.replace(aside, target)  # put the previous copy back
            raise
        _fsync_dir(target.parent)
    except OSError as err:
        raise _save_error(target, err) from err
    if had_old:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SaveError(OSError):
    """A save failed (disk full, read-only folder...); the previous state is intact."""


def _save_error(target: Path, err: OSError) -> SaveError:
    what = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno, str(err))
    return SaveError(err.errno, f"could not save {target} ({what}: {err}). Whatever was "
                     f"there before is unchanged. Free space or make {target.parent} "
                     "writable (or set MEMDEC_DATA_DIR to another folder), then run "
                     "again.")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Write a file under a temporary name, then rename it into place (fsynced)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise _save_error(target, err) from err
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as err:
            raise _save_error(target, err) from err
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


class CorruptFile(ValueError):
    """A file the project wrote is unreadable; the message names it and what to do."""


def read_json(path: Path, advice: str, required=()) -> dict:
    """``path`` as a dict holding ``required`` keys, or ``CorruptFile`` saying ``advice``."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptFile(f"{path} is unreadable ({type(err).__name__}: {err}); "
                          f"{advice}") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} should hold a JSON object, not {type(data).__name__}; "
                          f"{advice}")
    require_keys(data, path, required, advice)
    return data


def require_keys(data: dict, path, required, advice: str) -> None:
    """``CorruptFile`` saying ``advice`` unless the JSON object ``data`` read from
    ``path`` holds every key of ``required``."""
    missing = [k for k in required if k not in data]
    if missing:
        raise CorruptFile(f"{path} lacks {', '.join(missing)}: it is incomplete or from "
                          f"another version; {advice}")


def load_array(path: Path, advice: str, mmap: bool = True):
    """``np.load`` of an ``.npy`` (pickle refused), or ``CorruptFile`` saying ``advice``."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CorruptFile(f"{path} is missing; {advice}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CorruptFile(f"{path} is truncated or not a NumPy array ({err}); "
                          f"{advice}") from None


def load_npz(path: Path, advice: str, required=()) -> dict:
    """Every array of an ``.npz`` (pickle refused), or ``CorruptFile`` saying ``advice``."""
    import zipfile

    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise CorruptFile(f"{path} is truncated or not an .npz of arrays ({err}); "
                          f"{advice}") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise CorruptFile(f"{path} lacks the arrays {missing}; {advice}")
    return arrays


def save_checkpoint(module, config: dict, folder, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically).

    The checkpoint format of the decoder and the α gate: weights without
    pickle, and a JSON config a person can read.  ``extra``: more text files
    (name -> content) written in the same swap, e.g. ``run.json``.  A folder
    holding other files is refused, never emptied (``atomic_dir``).
    """
    import json

    from safetensors.torch import save_model
    folder = Path(folder)
    with atomic_dir(folder, CHECKPOINT_FILES, "a checkpoint") as tmp:
        save_model(module, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return folder


CHECKPOINT_FILES = ("model.safetensors", "config.json", "run.json")


def load_weights(module, path: Path, advice: str) -> None:
    """``safetensors`` weights into ``module`` (strict), or ``CorruptFile`` saying ``advice``."""
    from safetensors.torch import load_model

    path = Path(path)
    try:
        load_model(module, str(path), strict=True)
    except Exception as err:  # SafetensorError (truncated, "header too large"), shapes
        first = " ".join(str(err).split())[:300] or type(err).__name__
        raise CorruptFile(f"{path} cannot be loaded into a {type(module).__name__} "
                          f"({first}); {advice}") from None


def update_metrics(values: dict, path: Path | None = None, tag: str = "") -> dict:
    """Merge ``values`` into ``data/artifacts/metrics.json`` (atomically).

    Notebooks 02-04 each add their figures; the README and later notebooks
    read them back.  ``tag``: the run's size, as for :func:`artifacts_dir`.
    Returns the merged dictionary.
    """
    import json

    path = Path(path) if path else artifacts_dir(tag) / "metrics.json"
    merged = (read_json(path, "delete it and rerun notebooks 02-04, which write it again.")
              if path.exists() else {})
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
    figures benchmarks/RESULTS.md quotes).  A run that was interrupted (``"partial"``) is
    skipped.
    """
    for path, origin in [(artifacts_dir() / f"{name}.json", "your run"),
                         (REPO_ROOT / "benchmarks" / "results" / f"{name}.json",
                          "the run shipped with the project")]:
        if path.exists():
            results = read_json(path, "delete it and run the benchmark again (python "
                                f"benchmarks/{name}.py).")
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
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps({**results, "machine": machine_summary()}, indent=2))
    width = max(map(len, results)) + 2
    for key, value in results.items():
        shown = f"{value:,.4g}" if isinstance(value, float) else value
        print(f"{key:{width}s} {shown}")
    print(f"wrote {out}")
    return out
