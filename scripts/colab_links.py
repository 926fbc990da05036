"""The repository address in one place: ``[project.urls] Repository`` in pyproject.toml.

    python scripts/colab_links.py                  # rewrite badges and setup cells from it
    python scripts/colab_links.py --set owner/name # set it first (make colab-links REPO=owner/name)
    python scripts/colab_links.py --check          # exit 1 if anything disagrees (the tests)

Writes every "Open in Colab" badge (README.md and each notebook's first cell)
and each notebook's setup cell, which is the same cell in all six notebooks
(``SETUP`` below).  While the address is the placeholder, the setup cell does
not try to clone: it says how to bring the project into Colab instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "memdec-tutorial/memory-decoder"  # not published: `make colab-links REPO=...`
BADGE = re.compile(r"colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/")
URL_LINE = re.compile(r'^Repository = "https://github\.com/([\w.-]+/[\w.-]+)"$', re.M)

SETUP = '''\
# Setup: safe to re-run. In Colab this clones the project and installs it;
# locally, `make setup` (see README) has already installed `helpers`.
import os
import sys

REPO = {repo}  # written by `make colab-links REPO=owner/name`
if "google.colab" in sys.modules:
    from google.colab import output
    output.enable_custom_widget_manager()  # ipywidgets 8 (the chat panel) in Colab
    HOME = "/content/memory-decoder"
    if not os.path.isdir(HOME) and REPO:
        os.environ["GIT_TERMINAL_PROMPT"] = "0"  # a wrong address fails instead of asking
        !git clone -q --depth 1 https://github.com/{{REPO}} {{HOME}}
    if not os.path.isdir(HOME):
        raise SystemExit(
            f"The project is not in {{HOME}}: "
            + (f"cloning github.com/{{REPO}} failed. " if REPO else
               "this copy does not name a published repository. ")
            + "Upload the repository as a zip (Files panel), then `!unzip -q memory-decoder.zip "
            "-d /content` so that /content/memory-decoder/pyproject.toml exists, or copy it "
            "there from your Drive, and run this cell again.")
    %pip install -q -e {{HOME}}
    import site; site.main()  # pick up the fresh editable install without a restart
'''


def read_repo(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """``owner/name`` from ``[project.urls] Repository``."""
    found = URL_LINE.search(pyproject.read_text())
    if not found:
        raise SystemExit(f'{pyproject} needs a line Repository = "https://github.com/owner/name" '
                         "under [project.urls].")
    return found.group(1)


def set_repo(repo: str, pyproject: Path = ROOT / "pyproject.toml") -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise SystemExit(f"REPO={repo!r}: expected owner/name, e.g. REPO=alice/memory-decoder")
    read_repo(pyproject)  # the line must be there
    text = URL_LINE.sub(f'Repository = "https://github.com/{repo}"', pyproject.read_text())
    pyproject.write_text(text)


def setup_source(repo: str) -> str:
    return SETUP.format(repo="None" if repo == PLACEHOLDER else repr(repo))


def _badges(text: str, repo: str) -> str:
    return BADGE.sub(f"colab.research.google.com/github/{repo}/blob/", text)


def expected(repo: str) -> dict[Path, str]:
    """Every file this script writes, as it should read for ``repo``."""
    out = {ROOT / "README.md": _badges((ROOT / "README.md").read_text(), repo)}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        if not code or not "".join(code[0]["source"]).startswith("# Setup"):
            raise SystemExit(f"{path.name}: its first code cell should be the setup cell.")
        code[0]["source"] = setup_source(repo).splitlines(keepends=True)
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = _badges("".join(cell["source"]), repo).splitlines(keepends=True)
        out[path] = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", metavar="OWNER/NAME", help="the repository's GitHub address")
    ap.add_argument("--check", action="store_true", help="only report files that disagree")
    args = ap.parse_args(argv)
    if args.set:
        set_repo(args.set)
    repo = read_repo()
    stale = [p for p, text in expected(repo).items() if p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} disagrees with pyproject.toml's {repo}: run "
                  "`make colab-links`", file=sys.stderr)
        return 1 if stale else 0
    for p, text in expected(repo).items():
        if p in stale:
            p.write_text(text)
    print(f"{repo}{' (placeholder: setup cells will not clone)' if repo == PLACEHOLDER else ''}"
          f": rewrote {len(stale)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
