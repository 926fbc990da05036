"""scripts/colab_links.py: one repository address, every badge and setup cell from it."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import colab_links  # noqa: E402


@pytest.fixture()
def copy(tmp_path, monkeypatch):
    """A copy of README, pyproject and the notebooks that the script works on."""
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    monkeypatch.setattr(colab_links, "ROOT", tmp_path)
    monkeypatch.setattr(colab_links.read_repo, "__defaults__", (tmp_path / "pyproject.toml",))
    monkeypatch.setattr(colab_links.set_repo, "__defaults__", (tmp_path / "pyproject.toml",))
    return tmp_path


def test_badges_and_setup_cells_agree_with_pyproject():
    assert colab_links.main(["--check"]) == 0, "run `make colab-links`"


def test_setting_an_address_rewrites_every_badge_and_setup_cell(copy):
    assert colab_links.main(["--set", "alice/memdec"]) == 0
    assert 'Repository = "https://github.com/alice/memdec"' in (copy / "pyproject.toml").read_text()
    readme = (copy / "README.md").read_text()
    assert readme.count("colab.research.google.com/github/alice/memdec/blob/main/notebooks/") == 6
    for path in sorted((copy / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        assert "REPO = 'alice/memdec'" in text and "memdec-tutorial" not in text, path.name
    assert colab_links.main(["--check"]) == 0


def test_a_hand_edited_badge_is_reported(copy, capsys):
    readme = copy / "README.md"
    readme.write_text(readme.read_text().replace("github/memdec-tutorial/memory-decoder/blob/main/"
                                                 "notebooks/03", "github/bob/x/blob/main/notebooks/03"))
    assert colab_links.main(["--check"]) == 1
    assert "README.md disagrees" in capsys.readouterr().err


def test_an_address_that_is_not_owner_slash_name_is_refused(copy):
    with pytest.raises(SystemExit, match="expected owner/name"):
        colab_links.main(["--set", "https://github.com/alice/memdec"])


def _run_setup_cell_in_fake_colab(source: str, monkeypatch) -> list[str]:
    """Execute the setup cell as IPython would in Colab; return the shell commands it ran."""
    from IPython.core.inputtransformer2 import TransformerManager

    ran, widgets = [], []
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: widgets.append(1))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    shell = types.SimpleNamespace(system=ran.append, run_line_magic=lambda *a: ran.append(a))
    code = TransformerManager().transform_cell(source)
    try:
        exec(code, {"get_ipython": lambda: shell})
    finally:
        assert widgets, "the custom widget manager was not enabled"
    return ran


def test_with_the_placeholder_the_colab_setup_cell_says_what_to_do_and_clones_nothing(monkeypatch):
    source = colab_links.setup_source(colab_links.PLACEHOLDER)
    with pytest.raises(SystemExit, match="does not name a published repository.*Upload"):
        ran = _run_setup_cell_in_fake_colab(source, monkeypatch)
        assert not ran


def test_with_an_address_a_failed_clone_says_what_to_do(monkeypatch):
    source = colab_links.setup_source("alice/memdec")
    with pytest.raises(SystemExit, match="cloning github.com/alice/memdec failed"):
        _run_setup_cell_in_fake_colab(source, monkeypatch)


def test_outside_colab_the_setup_cell_does_nothing(monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    code = TransformerManager().transform_cell(colab_links.setup_source("alice/memdec"))
    exec(code, {"get_ipython": lambda: pytest.fail("ran a shell command outside Colab")})


def test_every_notebook_starts_with_the_same_setup_cell():
    cells = set()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        cells.add("".join(code[0]["source"]))
    assert len(cells) == 1
