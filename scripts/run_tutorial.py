"""Execute the numbered notebooks in order, headless, like a learner would.

    python scripts/run_tutorial.py [--smoke] [--only 01]

Executed copies (with outputs) go to ``data/artifacts/executed/``; the
notebooks in ``notebooks/`` stay output-free.  Each notebook's ``parameters``
cell can be overridden with papermill's ``-p``-style ``--param NAME=VALUE``.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

from helpers.paths import REPO_ROOT as ROOT, artifacts_dir


def main() -> int:
    import papermill as pm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small, fast configuration")
    ap.add_argument("--only", help="run only notebooks whose name starts with this")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    if args.smoke:
        os.environ["MEMDEC_SMOKE"] = "1"
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value
    out_dir = artifacts_dir() / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name.startswith(args.only)]
    for nb in notebooks:
        tic = time.perf_counter()
        print(f"--> {nb.name}", flush=True)
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params,
                            cwd=str(nb.parent), kernel_name="python3",
                            progress_bar=False)
        print(f"    done in {time.perf_counter() - tic:.0f} s -> {out_dir / nb.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
