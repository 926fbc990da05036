"""The datastore on disk (helpers.datastore), taught in notebook 02."""

import json

import numpy as np
import pytest

import helpers.datastore as ds
from helpers.datastore import Datastore, DatastoreMismatch, build_datastore
from helpers.hidden import extract_keys, tokenize
from tests.conftest import make_tokenizer

TEXTS = [
    "the data subject shall have the right to obtain from the controller the erasure",
    "article 1 .",
    "personal data concerning him or her shall be erased without undue delay",
    "member states",
    "the commission shall have the right to obtain the data",
]
NAMES = dict(model_name="tiny-gemma", corpus_name="eu-law")


def build(tiny, path, texts=TEXTS, **kw):
    model, tok = tiny
    kw = {"window": 8, "overlap": 3, "shard_docs": 2, **NAMES, **kw}
    return build_datastore(model, tok, texts, path, **kw)


def count_extractions(monkeypatch, fail_on=None):
    """Patch the datastore's extract_keys to count calls (and fail on one)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return extract_keys(*args, **kwargs)

    monkeypatch.setattr(ds, "extract_keys", wrapped)
    return calls


def test_every_target_position_is_stored(tiny, tmp_path):
    store = build(tiny, tmp_path / "store")
    n = sum(len(ids) - 1 for ids in tokenize(tiny[1], TEXTS))
    assert len(store) == n
    assert store.keys.shape == (n, tiny[0].config.hidden_size)


def test_values_are_next_tokens_with_global_doc_indices(tiny, tmp_path):
    store = build(tiny, tmp_path / "store")
    for d, ids in enumerate(tokenize(tiny[1], TEXTS)):
        assert store.values[store.doc == d].tolist() == ids[1:]
        assert store.pos[store.doc == d].tolist() == list(range(len(ids) - 1))


def test_sharded_keys_equal_one_extraction_of_all_texts(tiny, tmp_path):
    store = build(tiny, tmp_path / "store")
    ex = extract_keys(*tiny, TEXTS, window=8, overlap=3)
    np.testing.assert_allclose(store.keys, ex.keys, atol=1e-5)


def test_arrays_open_memory_mapped_with_fixed_dtypes(tiny, tmp_path):
    store = Datastore.open(build(tiny, tmp_path / "store").path)
    assert all(isinstance(a, np.memmap) for a in (store.keys, store.values, store.doc, store.pos))
    assert (store.keys.dtype, store.values.dtype, store.doc.dtype, store.pos.dtype) == (
        np.float32, np.int64, np.int32, np.int32)


def test_manifest_records_how_the_store_was_built(tiny, tmp_path):
    store = build(tiny, tmp_path / "store", split="validation")
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m == store.manifest
    assert m["model_name"] == "tiny-gemma" and m["corpus_name"] == "eu-law"
    assert (m["layer"], m["dim"], m["key_dtype"], m["split"]) == (-1, 32, "float32", "validation")
    assert (m["window"], m["overlap"], m["num_docs"], m["count"]) == (8, 3, 5, len(store))
    assert m["tokenizer_fingerprint"] == ds.tokenizer_fingerprint(tiny[1])
    assert m["corpus_fingerprint"] == ds.corpus_fingerprint(TEXTS) != ds.corpus_fingerprint(
        TEXTS[::-1])
    assert m["format_version"] == ds.FORMAT_VERSION
    assert m["extraction_seconds"] >= 0 and m["tokens_processed"] >= len(store)


def test_float16_keys_take_half_the_bytes_and_stay_close(tiny, tmp_path):
    full = build(tiny, tmp_path / "fp32")
    half = build(tiny, tmp_path / "fp16", key_dtype="float16")
    assert half.keys.dtype == np.float16 and half.manifest["key_dtype"] == "float16"
    assert half.keys.nbytes * 2 == full.keys.nbytes
    np.testing.assert_allclose(half.keys.astype(np.float32), full.keys, rtol=2e-3, atol=2e-3)


def test_interrupted_build_leaves_no_store_and_keeps_finished_shards(tiny, tmp_path,
                                                                    monkeypatch):
    count_extractions(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in (tmp_path / "store.partial").iterdir()) == [
        "config.json", "shard_00000.npz"]
    with pytest.raises(FileNotFoundError, match="no datastore"):
        Datastore.open(tmp_path / "store")


def test_resumed_build_extracts_only_missing_shards_and_equals_a_clean_build(
        tiny, tmp_path, monkeypatch):
    count_extractions(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "store")
    calls = count_extractions(monkeypatch)
    resumed = build(tiny, tmp_path / "store")
    assert len(calls) == 2  # 3 shards of 2 texts, the first was already saved
    assert not (tmp_path / "store.partial").exists()
    clean = build(tiny, tmp_path / "clean")
    for name in ("keys", "values", "doc", "pos"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(clean, name))


def test_partial_build_with_other_settings_is_discarded(tiny, tmp_path, monkeypatch):
    count_extractions(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "store", window=8)
    calls = count_extractions(monkeypatch)
    store = build(tiny, tmp_path / "store", window=16)
    assert len(calls) == 3
    np.testing.assert_allclose(store.keys, extract_keys(*tiny, TEXTS, window=16,
                                                        overlap=3).keys, atol=1e-5)


def test_existing_store_with_same_config_is_opened_not_rebuilt(tiny, tmp_path, monkeypatch):
    first = build(tiny, tmp_path / "store")
    calls = count_extractions(monkeypatch)
    again = build(tiny, tmp_path / "store", batch_size=1)
    assert calls == [] and len(again) == len(first)


def test_existing_store_with_other_layer_is_rebuilt(tiny, tmp_path):
    build(tiny, tmp_path / "store")
    store = build(tiny, tmp_path / "store", layer=1)
    assert store.manifest["layer"] == 1
    np.testing.assert_allclose(store.keys, extract_keys(*tiny, TEXTS, layer=1, window=8,
                                                        overlap=3).keys, atol=1e-5)


def test_folder_that_is_not_a_datastore_is_not_overwritten(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a datastore"):
        build(tiny, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_nan_keys_are_refused_naming_the_text(tiny, tmp_path, monkeypatch):
    def poisoned(*args, **kwargs):
        ex = extract_keys(*args, **kwargs)
        ex.keys[ex.doc == 1] = np.nan  # second text of each shard
        return ex

    monkeypatch.setattr(ds, "extract_keys", poisoned)
    with pytest.raises(ValueError, match=r"NaN/inf keys for text #1 "):
        build(tiny, tmp_path / "store")


def test_float16_overflow_is_refused_with_advice(tiny, tmp_path, monkeypatch):
    def huge(*args, **kwargs):
        ex = extract_keys(*args, **kwargs)
        ex.keys[ex.doc == 0] = 1e6
        return ex

    monkeypatch.setattr(ds, "extract_keys", huge)
    with pytest.raises(ValueError, match="key_dtype='float32'"):
        build(tiny, tmp_path / "store", key_dtype="float16")


def test_opening_a_missing_store_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no datastore at .*build_datastore\("):
        Datastore.open(tmp_path / "nowhere")


SETUP = {"model_name": "tiny-gemma", "layer": -1, "dim": 32}


@pytest.mark.parametrize("field,value,stored", [
    ("model_name", "gemma-2b", "'tiny-gemma'"), ("layer", 3, "-1"), ("dim", 2048, "32")])
def test_check_compatible_names_the_differing_field_and_both_values(tiny, tmp_path, field,
                                                                    value, stored):
    store = build(tiny, tmp_path / "store")
    with pytest.raises(DatastoreMismatch) as err:
        store.check_compatible(**{**SETUP, field: value}, tokenizer=tiny[1])
    message = str(err.value)
    assert f"{field} is {stored} in the datastore but {value!r} here" in message
    assert "build_datastore" in message and "matching model" in message


def test_check_compatible_notices_a_different_tokenizer(tiny, tmp_path):
    store = build(tiny, tmp_path / "store")
    other = make_tokenizer()
    other.add_tokens(["brandnewword"])
    with pytest.raises(DatastoreMismatch, match="tokenizer_fingerprint") as err:
        store.check_compatible(**SETUP, tokenizer=other)
    assert store.manifest["tokenizer_fingerprint"] in str(err.value)
    assert ds.tokenizer_fingerprint(other) in str(err.value)


def test_check_compatible_accepts_the_model_that_built_the_store(tiny, tmp_path):
    store = build(tiny, tmp_path / "store")
    store.check_compatible(**SETUP, tokenizer=tiny[1])


def test_default_store_paths_differ_by_model_corpus_layer_and_tag(data_dir):
    from helpers.datastore import default_store_path
    a = default_store_path("google/gemma-2b", "eu-law", -1)
    assert a.parent == data_dir / "cache" / "datastores"
    assert "/" not in a.name and a.name.startswith("google_gemma-2b-eu-law-L-1")
    assert len({a, default_store_path("gemma-3-270m", "eu-law", -1),
                default_store_path("google/gemma-2b", "eu-law", 12),
                default_store_path("google/gemma-2b", "eu-law", -1, tag="smoke")}) == 4
