"""Nothing trained twice: a finished run records its settings, a rerun reloads it.

Explained in ``notebooks/03_train_memory_decoder.ipynb`` (the decoder) and
``notebooks/04_blended_sampling.ipynb`` (the α gate).  A checkpoint folder
(``model.safetensors`` + ``config.json``) counts as *finished* only once
``run.json`` sits beside them: the settings it was trained with, the data it
was trained on, and its training history.  ``run.json`` is written last, so
a run interrupted before the end leaves no finished checkpoint behind, and
the next run trains again instead of loading it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .paths import atomic_file

RUN_FILE = "run.json"


def _json_safe(value):
    """Settings as JSON keeps them: tuples as lists, NaN/inf as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return value


def save_run(folder, settings: dict, **record) -> Path:
    """Mark the checkpoint in ``folder`` finished: write ``run.json`` (atomically).

    ``settings`` are what a rerun must match to reuse it (knobs and the data
    fingerprint); ``record`` is anything else worth keeping (history, timings).
    """
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint in {folder} to mark as finished; save the "
                                "model there first (save_decoder / save_gate).")
    with atomic_file(folder / RUN_FILE) as tmp:
        tmp.write_text(json.dumps({"settings": _json_safe(settings),
                                   **_json_safe(record)}, indent=1))
    return folder / RUN_FILE


def finished_run(folder, settings: dict, what: str = "checkpoint") -> dict | None:
    """``run.json`` of ``folder`` if it was finished with exactly ``settings``, else None.

    Prints one line saying why it is not reused (none there, unfinished, or
    which settings differ), so the notebook's output says what happened.
    """
    folder = Path(folder)
    path = folder / RUN_FILE
    if not (folder / "model.safetensors").is_file():
        print(f"No saved {what} in {folder}: training one.")
        return None
    if not path.is_file():
        print(f"The {what} in {folder} is from a run that did not finish: training again.")
        return None
    try:
        run = json.loads(path.read_text())
        saved = run["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        print(f"{path} is unreadable: training again (it will be replaced).")
        return None
    wanted = _json_safe(settings)
    diffs = [f"{k} = {saved.get(k, '(not recorded)')!r} there, {v!r} here"
             for k, v in wanted.items() if saved.get(k, "(not recorded)") != v]
    diffs += [f"{k} = {saved[k]!r} there, not set here" for k in saved if k not in wanted]
    if diffs:
        print(f"The {what} in {folder} was trained with other settings ({'; '.join(diffs)}): "
              "training again.")
        return None
    return run


def partial_dir(folder) -> Path:
    """Where a run in progress keeps its best-so-far checkpoint: ``<folder>.partial``.

    Training writes there, never into ``folder``, so an interrupted retrain
    leaves the last finished checkpoint in place.
    """
    folder = Path(folder)
    return folder.with_name(folder.name + ".partial")


def finish_run(module, folder, settings: dict, **record) -> dict:
    """Save ``module`` (safetensors + config) in ``folder``, mark it finished, drop the partial.

    ``module`` is a MemoryDecoder or an AlphaGate (anything with a dataclass
    ``config``).  Weights, config and ``run.json`` go in with one swap, so the
    finished checkpoint that was there stays until the new one is complete.
    Returns the run record, as :func:`finished_run` would.
    """
    import shutil
    from dataclasses import asdict

    from .paths import CHECKPOINT_FILES, refuse_foreign, save_checkpoint

    run = {"settings": _json_safe(settings), **_json_safe(record)}
    save_checkpoint(module, asdict(module.config), folder,
                    extra={RUN_FILE: json.dumps(run, indent=1)})
    partial = partial_dir(folder)
    try:
        refuse_foreign(partial, CHECKPOINT_FILES)
        shutil.rmtree(partial, ignore_errors=True)
    except FileExistsError:  # someone keeps files there: leave the folder alone
        pass
    return json.loads(json.dumps(run))
