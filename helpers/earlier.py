"""Build what a notebook lacks by running the earlier notebook that makes it.

Used by notebooks 04 and 05.  Opened from a Colab badge, every notebook
starts in a fresh runtime: notebook 04 finds no decoder, notebook 05 no
datastore and no decoder.  :func:`run_earlier` executes the notebook that
builds them (headless, in a kernel of its own, at the same size and with the
same model and corpus), so its artifacts land exactly where the calling
notebook looks.  Point ``MEMDEC_DATA_DIR`` at a mounted Google Drive to keep
them for the next session instead of building them again.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .paths import REPO_ROOT, artifacts_dir

PARAMETERS_ENV = "MEMDEC_EARLIER_PARAMETERS"  # JSON {"03": {"MAX_STEPS": 4}}: extra knobs


def parameters_cell(parameters: dict) -> str:
    """The cell papermill would inject after a notebook's ``parameters`` cell."""
    return "# injected by helpers.earlier.run_earlier\n" + "".join(
        f"{name} = {value!r}\n" for name, value in parameters.items())


def run_earlier(name: str, tag: str = "", progress: bool = True, **parameters) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters``; return the executed copy.

    ``tag`` is the size's tag (``size.tag``): the executed copy goes to that
    size's ``artifacts/executed/``.  Knobs in ``$MEMDEC_EARLIER_PARAMETERS``
    (JSON, keyed by the notebook's number) are added: the GPU check uses it
    to keep its CPU run short.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = REPO_ROOT / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run this notebook from a full copy of the "
                                "project (git clone, or the Colab setup cell).")
    extra = json.loads(os.environ.get(PARAMETERS_ENV) or "{}").get(name[:2], {})
    parameters = {**parameters, **extra}
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters_cell(parameters)))
    code = sum(c.cell_type == "code" for c in nb.cells)
    tic, done = time.perf_counter(), []

    def on_cell_executed(cell, cell_index, **_):
        if cell.cell_type == "code" and progress:
            done.append(cell_index)
            print(f"\r  {name}: {len(done)}/{code} cells, {time.perf_counter() - tic:.0f} s",
                  end="", flush=True)

    knobs = ", ".join(f"{k}={v!r}" for k, v in parameters.items()) or "its defaults"
    print(f"Running {path.name} first ({knobs}); it saves what this notebook needs.", flush=True)
    client = NotebookClient(nb, kernel_name="python3", timeout=None,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_executed=on_cell_executed)
    out = artifacts_dir(tag) / "executed" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute()
    except CellExecutionError as err:
        nbformat.write(nb, out)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # no terminal colours
        last = [ln for ln in plain.splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"{path.name} stopped with {last[0] if last else 'an error'}. Its "
                           f"executed copy is {out}; open {path.name} and run it yourself to "
                           "see the whole message.") from None
    nbformat.write(nb, out)
    print(f"\n  {name} done in {time.perf_counter() - tic:.0f} s (executed copy: {out})")
    return out
