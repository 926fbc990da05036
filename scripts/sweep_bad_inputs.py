"""Run every bad input of ``tests/bad_inputs.py`` through the public helpers and count.

    python scripts/sweep_bad_inputs.py [--show unclear,silent,lost,hang]

Prints one line per case that is not ``clear`` (an error naming the problem and the
next step) or ``recovered`` (a damaged cache rebuilt, with a correct result), then
the counts.  Runs offline on the tiny random model of ``tests/conftest.py``, in a
temporary data folder (``MEMDEC_DATA_DIR``), in about a minute on one core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", default="unclear,silent,lost,hang",
                        help="outcomes to list case by case")
    parser.add_argument("--json", help="also write the outcomes to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MEMDEC_DATA_DIR"] = tmp
        import bad_inputs
        tic = time.perf_counter()
        ctx = bad_inputs.make_context(Path(tmp))
        outcomes = [bad_inputs.run_case(case, ctx) for case in bad_inputs.all_cases()]
        total = time.perf_counter() - tic
    shown = set(args.show.split(","))
    for o in outcomes:
        if o.kind in shown:
            print(f"{o.kind:9s} {o.case.id}: {o.message[:300]}")
    counts = collections.Counter(o.kind for o in outcomes)
    errors = counts["clear"] + counts["unclear"]
    offline = [o.seconds for o in outcomes if "offline" in o.case.tags]
    print(f"\n{len(outcomes)} bad inputs in {total:.0f} s: " + ", ".join(
        f"{k} {counts[k]}" for k in ("clear", "unclear", "recovered", "silent", "lost",
                                     "hang")))
    print(f"errors that name the problem and the next step: {counts['clear']} of {errors} "
          f"({counts['clear'] / max(errors, 1):.1%}); slowest offline failure "
          f"{max(offline, default=0):.2f} s")
    for tag in ("argument", "file", "save", "mismatch", "offline"):
        group = collections.Counter(o.kind for o in outcomes if tag in o.case.tags)
        print(f"  {tag:9s} {sum(group.values()):4d}: " + ", ".join(
            f"{k} {n}" for k, n in sorted(group.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"case": o.case.id, "outcome": o.kind, "seconds": round(o.seconds, 3),
              "message": o.message} for o in outcomes], indent=1))
    return 0 if not (counts["silent"] or counts["lost"] or counts["hang"]) else 1


if __name__ == "__main__":
    sys.exit(main())
