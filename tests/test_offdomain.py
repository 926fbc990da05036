"""Off-domain text for the α gate (helpers.offdomain)."""

import pytest

from helpers.offdomain import MIN_CHARS, load_offdomain, split_offdomain


@pytest.fixture()
def licences(tmp_path):
    folder = tmp_path / "licenses"
    folder.mkdir()
    (folder / "Alpha-1.0").write_text("Permission is hereby granted to anyone " * 40)
    (folder / "Beta-2.0").write_text("The licensor grants you a worldwide licence " * 40)
    (folder / "Alpha").symlink_to(folder / "Alpha-1.0")   # Debian's GPL -> GPL-3
    (folder / "Tiny").write_text("too short")
    return folder


def test_both_sources_in_the_corpus_format_without_eu_law(licences):
    ds = load_offdomain(max_chars=600, licence_dir=licences)
    sources = set(ds["source"])
    assert any(s.startswith("Python") for s in sources)
    assert sum(s.startswith("software licence") for s in ds["source"]) == 2  # no link, no tiny
    assert all(t.startswith("Title: ") and "\nQuestion: " in t and "\nAnswer: " in t
               for t in ds["text"])
    assert all(MIN_CHARS <= len(a) <= 600 for a in ds["answer"])
    assert not any("Regulation (EU)" in t or "GDPR" in t for t in ds["text"])
    assert len(set(ds["doc_id"])) == len(ds)


def test_the_corpus_is_deterministic_and_limit_keeps_both_sources(licences):
    a = load_offdomain(licence_dir=licences)
    assert a["text"] == load_offdomain(licence_dir=licences)["text"]
    small = load_offdomain(limit=1, licence_dir=licences)
    assert len(small) == 2 and small["doc_id"][1] == "licence-Alpha-1.0"


def test_a_machine_without_licence_files_still_has_python_docs(tmp_path):
    ds = load_offdomain(licence_dir=tmp_path / "nowhere")
    assert len(ds) > 20 and all(s.startswith("Python") for s in ds["source"])


def test_the_split_alternates_and_is_disjoint(licences):
    ds = load_offdomain(licence_dir=licences)
    parts = split_offdomain(ds)
    gate, test = set(parts["gate"]["doc_id"]), set(parts["test"]["doc_id"])
    assert not gate & test and gate | test == set(ds["doc_id"])
    assert abs(len(gate) - len(test)) <= 1
    assert any(d.startswith("licence") for d in gate) and any(
        d.startswith("licence") for d in test)


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match=f">= {MIN_CHARS}"):
        load_offdomain(max_chars=10)
    with pytest.raises(ValueError, match="at least 2"):
        split_offdomain(load_offdomain(limit=1, licence_dir="/nowhere").select([0]))


def test_offdomain_keys_are_each_halfs_text_cut_to_the_size_and_extracted(tiny):
    """Notebooks 04 and 06 read the same off-domain halves and keys through one helper."""
    import numpy as np

    from helpers.hidden import extract_keys
    from helpers.offdomain import offdomain_keys
    from helpers.sizes import pick_size

    model, tok = tiny
    size = pick_size(False, True)                     # the smoke size: short texts
    halves, keys = offdomain_keys(model, tok, size, limit=2)
    assert set(keys) == {"gate", "test"}
    assert halves["gate"]["text"] == split_offdomain(load_offdomain(limit=2))["gate"]["text"]
    for part in ("gate", "test"):
        want = extract_keys(model, tok, size.shorten(halves[part]["text"], tok), layer=-1,
                            progress=False)
        np.testing.assert_array_equal(keys[part].values, want.values)
        np.testing.assert_allclose(keys[part].keys, want.keys, rtol=1e-5, atol=1e-6)
