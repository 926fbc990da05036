"""The notebooks' ``parameters`` cells: every literal knob can be overridden.

``python scripts/run_tutorial.py --param W=4`` (papermill) injects overrides
after the ``parameters`` cell.  Papermill only lists the assignments it can
parse, and warns "Passed unknown parameter" for the rest; a comment holding
``=`` is enough to hide a knob.  Knobs that depend on SMOKE are expressions
and are exempt.
"""

import ast
import json
from pathlib import Path

import pytest
from papermill.translators import PythonTranslator

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))


def _parameters_source(path: Path) -> str:
    cells = [c for c in json.loads(path.read_text())["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_literal_knob_is_seen_by_papermill(path):
    source = _parameters_source(path)
    literal = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue  # e.g. `12 if SMOKE else None`: not overridable by design
            literal.append(node.targets[0].id)
    seen = {p.name for p in PythonTranslator.inspect({"source": source})}
    assert literal, "no literal knobs found: is this the parameters cell?"
    assert not set(literal) - seen, (f"papermill cannot parse {sorted(set(literal) - seen)}; "
                                     "keep '=' out of their comments")
