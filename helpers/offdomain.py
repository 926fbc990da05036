"""Off-domain text: where the EU-law memory should keep quiet.

Explained in ``notebooks/04_blended_sampling.ipynb`` (section 6).  The
adaptive α gate (``helpers.gate``) has to see text on which the memory is
*not* relevant, and we need such text offline, without the Hugging Face Hub.
Two real sources come with every machine that runs this tutorial:

* **Python documentation**: the docstrings of ~55 standard-library modules
  (the module's own docstring, then the first paragraph of each public class
  and function), written by the Python developers.  Technical English, far
  from EU law.  Read from the running interpreter, so the text follows its
  version (recorded in each record's ``source``).
* **Software licences**: the licence texts Debian and Ubuntu ship in
  ``/usr/share/common-licenses`` (GPL, LGPL, Apache, MPL, GFDL, ...; Colab
  has them too).  Legal text from another legal domain: the harder case, the
  one a legal memory could mistake for its own.  Skipped where the folder
  does not exist (macOS, Windows).

Records have the corpus's shape (title, question, answer, text), so the base
model reads them in the same ``Title / Question / Answer`` format as the EU
articles: only the content is off-domain.  Each answer keeps its first
``max_chars`` characters (1,500 by default, ~350 tokens): the gate needs many
documents more than long ones.  ``split_offdomain`` holds out every other
document for testing the gate.
"""

from __future__ import annotations

import importlib
import inspect
import platform
from pathlib import Path

from .corpus import CorpusError, format_record
from .validate import check_int

STDLIB_MODULES = (
    "argparse", "base64", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "enum", "functools", "hashlib", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "locale", "logging", "mailbox", "os",
    "pprint", "random", "re", "sched", "shutil", "socket", "sqlite3", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "wave",
    "zipfile")
LICENCE_DIR = Path("/usr/share/common-licenses")
MIN_CHARS = 400  # shorter documents are skipped: too little text to score


def _module_doc(name: str) -> str:
    """A module's docstring, then ``name: first paragraph`` of its public API."""
    mod = importlib.import_module(name)
    parts = [inspect.cleandoc(mod.__doc__ or "")]
    names = getattr(mod, "__all__", None) or dir(mod)
    for attr in sorted(n for n in names if not n.startswith("_")):
        obj = getattr(mod, attr, None)
        if ((inspect.isclass(obj) or inspect.isfunction(obj))
                and getattr(obj, "__module__", None) == mod.__name__ and obj.__doc__):
            parts.append(f"{attr}: " + inspect.cleandoc(obj.__doc__).split("\n\n")[0])
    return "\n\n".join(p for p in parts if p)


def _python_docs():
    """``(module name, docstrings)`` for each standard-library module this Python has."""
    for name in STDLIB_MODULES:
        try:
            yield name, _module_doc(name)
        except ImportError:  # a minimal Python build may lack e.g. ssl or sqlite3
            continue


def _licence_texts(folder: Path):
    """``(file name, text)`` of each licence file in ``folder`` (links skipped)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():  # GPL -> GPL-3 etc.: once is enough
            continue
        yield path.name, path.read_text(encoding="utf-8", errors="replace").strip()


def _records(pairs, max_chars: int, doc_id, source, title, question) -> list[dict]:
    """Corpus records from ``(name, text)`` pairs; the str.format templates get ``name``."""
    return [dict(doc_id=doc_id.format(name=n), source=source, title=title.format(name=n),
                 question=question.format(name=n), answer=text[:max_chars])
            for n, text in pairs if len(text) >= MIN_CHARS]


def load_offdomain(max_chars: int = 1500, limit: int | None = None,
                   licence_dir: Path | str = LICENCE_DIR):
    """Off-domain records as a ``datasets.Dataset`` (title/question/answer/text/doc_id/source).

    Python documentation first, then software licences, each in a fixed
    order; ``limit`` keeps the first ``limit`` of each source.
    """
    from datasets import Dataset

    max_chars = check_int("max_chars", max_chars, example=1500)
    if limit is not None:
        limit = check_int("limit", limit, 1, example=20)
    if max_chars < MIN_CHARS:
        raise ValueError(f"max_chars must be >= {MIN_CHARS}; got {max_chars}.")
    python = _records(_python_docs(), max_chars, "python-{name}",
                      f"Python {platform.python_version()} standard library docstrings",
                      "Python standard library, module {name}",
                      "What does the Python module {name} provide?")
    licences = _records(_licence_texts(Path(licence_dir)), max_chars, "licence-{name}",
                        f"software licence ({licence_dir})", "Software licence {name}",
                        "What are the terms of the {name} licence?")
    records = python[:limit] + licences[:limit]
    if not records:
        raise CorpusError("No off-domain text found: the standard-library docstrings are "
                          "missing (python -OO strips them; run without -OO).")
    for r in records:
        r["text"] = format_record(r["title"], r["question"], r["answer"])
    return Dataset.from_list(records)


def split_offdomain(ds):
    """``{"gate": ..., "test": ...}``: even documents train the gate, odd ones test it.

    Alternating keeps both sources in both halves.
    """
    from datasets import DatasetDict

    if len(ds) < 2:
        raise ValueError("Need at least 2 off-domain documents to split.")
    return DatasetDict(gate=ds.select(range(0, len(ds), 2)),
                       test=ds.select(range(1, len(ds), 2)))


def offdomain_keys(model, tokenizer, size, limit: int | None = None):
    """``(halves, {"gate": Extraction, "test": Extraction})``: notebooks 04 and 06's off-domain
    text, split (``split_offdomain``), cut like ``size`` cuts held-out text, and the base
    model's last hidden states of each half.  No head pass: the gate's scoring pass runs
    the head once per row.  ``limit``: documents per source (default: ``size``'s)."""
    from .hidden import extract_keys

    halves = split_offdomain(load_offdomain(limit=size.offdomain_docs if limit is None
                                            else limit))
    return halves, {part: extract_keys(model, tokenizer,
                                       size.shorten(halves[part]["text"], tokenizer),
                                       layer=-1, progress=True) for part in ("gate", "test")}
