"""helpers.earlier.run_earlier: a notebook that lacks an artifact runs the notebook that makes it."""

import json

import nbformat
import pytest

import helpers.earlier as earlier


def _notebook(folder, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("SIZE = 'quick'\nOUT = 'x'", metadata={
        "tags": ["parameters"]})] + [nbformat.v4.new_code_cell(c) for c in cells]
    (folder / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, folder / "notebooks" / "03_make.ipynb")


def test_the_earlier_notebook_runs_with_the_callers_knobs(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(earlier, "REPO_ROOT", tmp_path)
    monkeypatch.setenv(earlier.PARAMETERS_ENV, json.dumps({"03": {"EXTRA": 4}}))
    target = tmp_path / "made.json"
    _notebook(tmp_path, f"import json; open({str(target)!r}, 'w').write("
                        "json.dumps([SIZE, OUT, EXTRA]))")
    out = earlier.run_earlier("03_make", tag="smoke", SIZE="smoke", progress=False)
    assert json.loads(target.read_text()) == ["smoke", "x", 4]
    assert out == data_dir / "artifacts" / "smoke" / "executed" / "03_make.ipynb"


def test_a_failing_earlier_notebook_says_where_to_look(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(earlier, "REPO_ROOT", tmp_path)
    _notebook(tmp_path, "raise ValueError('no corpus here')")
    with pytest.raises(RuntimeError, match="03_make.ipynb stopped with ValueError: no corpus "
                                           "here.*run it yourself"):
        earlier.run_earlier("03_make", progress=False)


def test_a_missing_notebook_says_to_use_a_full_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(earlier, "REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="full copy of the project"):
        earlier.run_earlier("03_make")
