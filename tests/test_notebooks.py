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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebooks_are_valid_have_cell_ids_and_no_outputs(path):
    """Cell ids are required from nbformat 4.5 on (a warning today, an error later);
    outputs are stripped in git, so every learner starts from a clean notebook."""
    import nbformat
    text = path.read_text()
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    ids = [c.get("id") for c in json.loads(text)["cells"]]  # raw: no ids filled in by reading
    assert all(ids) and len(set(ids)) == len(ids), "every cell needs a unique id"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} has outputs: clear them before committing"
