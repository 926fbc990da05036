"""Project metadata: the two dependency lists must not drift apart."""

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dev dependency)
    import tomli as tomllib

import yaml
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_exactly_the_pyproject_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [s for s in pip_section if s != "-e ."]
    assert sorted(listed) == sorted(wanted)


def test_every_required_package_of_the_design_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(s) for s in meta["dependencies"] + meta["optional-dependencies"]["dev"]}
    for pkg in ["torch", "transformers", "faiss-cpu", "numpy", "datasets",
                "ipywidgets", "matplotlib", "nbval", "gguf", "accelerate"]:
        assert pkg in names
