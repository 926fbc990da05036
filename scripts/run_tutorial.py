"""Execute the numbered notebooks in order, headless, like a learner would.

    python scripts/run_tutorial.py [--full] [--smoke] [--only 03] [--param NAME=VALUE ...]

The quick size is the default; ``--full`` (or ``--param FULL=True``; ``make
tutorial FULL=1``) runs the full size (see ``helpers/sizes.py``).  Executed
copies (with outputs) go to ``data/artifacts/executed/``; the notebooks in
``notebooks/`` stay output-free.  Each notebook's ``parameters`` cell can be
overridden with papermill's ``--param NAME=VALUE``.

While a notebook runs, the script prints each code cell as it starts, a line
every minute while a cell is still running, and at the end a table of wall
time and peak resident memory of each notebook's kernel, with the cell that
set the peak and how much of it was memory-mapped files (also saved to
``data/artifacts/executed/run_summary.json``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import threading
import time
from pathlib import Path

from helpers.paths import REPO_ROOT as ROOT, artifacts_dir

TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def parse_params(items: list[str]) -> dict:
    """``NAME=VALUE`` pairs, values read as Python literals where they are."""
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--param {item!r}: expected NAME=VALUE, e.g. --param W=1")
        if name == "FULL" and value.lower() in TRUE | FALSE:
            params[name] = value.lower() in TRUE  # make tutorial FULL=1
            continue
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value
    if not isinstance(params.get("FULL", False), bool):
        raise SystemExit(f"FULL={params['FULL']!r}: use FULL=True or FULL=False "
                         "(make tutorial FULL=1 for the full run).")
    return params


def _children(pid: int) -> list[int]:
    """Direct child pids, from ``/proc/<pid>/task/*/children`` (Linux)."""
    kids = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(p) for p in path.read_text().split()]
        except (OSError, ValueError):
            continue
    return kids


def memory_of_children() -> tuple[int, int]:
    """``(peak, file-backed)`` of the child with the largest peak resident memory, in bytes.

    The notebook's kernel is a child process; Linux keeps its high-water mark
    (``VmHWM``) in ``/proc/<pid>/status``, and next to it how much of what is
    resident *now* is file-backed (``RssFile``: memory-mapped files such as the
    datastore's keys, which the kernel can drop and read again, unlike
    ``RssAnon``).  ``(0, 0)`` where ``/proc`` does not exist.
    """
    best = (0, 0)
    for pid in _children(os.getpid()):
        try:
            fields = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            kib = lambda name: int(fields.get(name, "0 kB").split()[0]) * 1024
            best = max(best, (kib("VmHWM"), kib("RssFile")))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return best


class Progress:
    """Prints each code cell as it starts and a heartbeat while it runs; tracks peak memory.

    ``peak_cell`` is the code cell that was running (or had just run) when the
    kernel's peak last rose, and ``peak_file`` the file-backed part of what was
    resident then (sampled once a second, so it is close to, not exactly at,
    the peak).
    """

    def __init__(self, name: str, n_cells: int, every: float = 60.0):
        self.name, self.n_cells, self.every = name, n_cells, every
        self.cell, self.cell_start, self.peak = None, time.perf_counter(), 0
        self.last_cell, self.peak_cell, self.peak_file = None, None, 0
        self._lock = threading.Lock()  # the watcher and the end of a cell both sample
        self.last_beat = self.cell_start
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(1.0):
            self._sample()
            now = time.perf_counter()
            if self.cell is not None and now - self.last_beat >= self.every:
                self.last_beat = now
                print(f"      ... cell {self.cell} still running: {now - self.cell_start:.0f} s "
                      f"(notebook {now - self.start:.0f} s)", flush=True)

    def _sample(self):
        with self._lock:
            peak, file_backed = memory_of_children()
            if peak > self.peak:
                self.peak, self.peak_file = peak, file_backed
                self.peak_cell = self.cell if self.cell is not None else self.last_cell

    def on_cell_start(self, cell, cell_index, **_):
        if cell.cell_type != "code":
            return
        lines = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")]
        first = (lines[0] if lines else "").strip()
        self.cell = cell_index
        self.cell_start = self.last_beat = time.perf_counter()
        print(f"   [{self.name} cell {cell_index}/{self.n_cells - 1}, "
              f"{time.perf_counter() - self.start:4.0f} s] {first[:70]}", flush=True)

    def on_cell_executed(self, cell, cell_index, **_):
        took = time.perf_counter() - self.cell_start
        if cell.cell_type == "code" and took >= 20:
            print(f"      cell {cell_index} took {took:.0f} s", flush=True)
        if cell.cell_type == "code":
            self._sample()  # before the next cell starts: a rise is this cell's
            self.last_cell = cell_index
        self.cell = None


def main() -> int:
    import nbformat
    import papermill as pm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full size (same as --param FULL=True)")
    ap.add_argument("--smoke", action="store_true", help="the tests' tiny configuration")
    ap.add_argument("--only", help="run only notebooks whose name starts with this")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    if args.smoke:
        os.environ["MEMDEC_SMOKE"] = "1"
    params = parse_params(args.param)
    if args.full:
        params["FULL"] = True
    size = "smoke" if args.smoke else "full" if params.get("FULL") else "quick"
    out_dir = artifacts_dir() / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name.startswith(args.only)]
    print(f"{len(notebooks)} notebook(s), {size} size"
          + (f", parameters {params}" if params else ""), flush=True)
    summary, tic0 = [], time.perf_counter()
    for nb in notebooks:
        tic = time.perf_counter()
        print(f"--> {nb.name}", flush=True)
        n_cells = len(nbformat.read(nb, as_version=4).cells)
        with Progress(nb.name[:2], n_cells) as progress:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params,
                                cwd=str(nb.parent), kernel_name="python3",
                                progress_bar=False, on_cell_start=progress.on_cell_start,
                                on_cell_executed=progress.on_cell_executed)
        seconds = time.perf_counter() - tic
        summary.append({"notebook": nb.name, "seconds": round(seconds, 1),
                        "peak_rss_mb": round(progress.peak / 2**20) or None,
                        "peak_cell": progress.peak_cell,
                        "peak_file_backed_mb": round(progress.peak_file / 2**20) or None})
        mem = (f", kernel peak memory {progress.peak / 2**30:.2f} GiB in cell {progress.peak_cell} "
               f"({progress.peak_file / 2**30:.2f} GiB of it memory-mapped files)"
               if progress.peak else "")
        print(f"    done in {seconds:.0f} s{mem} -> {out_dir / nb.name}", flush=True)
    total = time.perf_counter() - tic0
    print(f"\n{'notebook':32}{'wall time':>12}{'peak memory':>14}{'in cell':>9}")
    for row in summary:
        mem = f"{row['peak_rss_mb'] / 1024:.2f} GiB" if row["peak_rss_mb"] else "n/a"
        where = "" if row["peak_cell"] is None else str(row["peak_cell"])
        print(f"{row['notebook']:32}{row['seconds'] / 60:9.1f} min{mem:>14}{where:>9}")
    print(f"{'total':32}{total / 60:9.1f} min")
    (out_dir / "run_summary.json").write_text(json.dumps(
        {"size": size, "parameters": params, "total_seconds": round(total, 1),
         "notebooks": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
