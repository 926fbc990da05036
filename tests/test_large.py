"""Stores larger than RAM (helpers.large): on-disk IVF-PQ lists, chunked exact search."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers.datastore import Datastore
from helpers.large import (OnDiskIndexError, build_ondisk_index, exact_knn, key_chunks,
                           load_ondisk_index, ondisk_files, refine)

FACTORY = "IVF16,PQ8"


def float16_store(folder, n=6000, dim=32, seed=0):
    """Clustered float16 keys on disk, as build_datastore(key_dtype='float16') writes them."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.standard_normal((40, dim))
    keys = (centres[rng.integers(0, 40, n)] + rng.standard_normal((n, dim))).astype(np.float16)
    folder.mkdir(parents=True)
    zeros = np.zeros(n, np.int64)
    for name, array in {"keys": keys, "values": zeros, "doc": zeros.astype(np.int32),
                        "pos": np.arange(n, dtype=np.int32)}.items():
        np.save(folder / f"{name}.npy", array)
    (folder / "manifest.json").write_text(json.dumps(
        {"count": n, "dim": dim, "key_dtype": "float16", "model_name": "synthetic",
         "layer": -1, "tokenizer_fingerprint": "-", "corpus_fingerprint": f"seed{seed}"}))
    return Datastore.open(folder)


@pytest.fixture()
def built(tmp_path):
    store = float16_store(tmp_path / "store")
    build_ondisk_index(store, FACTORY, train_size=3000, chunk_rows=1000, rows_per_block=2500)
    queries = np.asarray(store.keys[::300], np.float32) + 0.1
    return store, queries


def test_chunks_cover_the_keys_once_as_float32(tmp_path):
    store = float16_store(tmp_path / "s", n=1000)
    parts = list(key_chunks(store, 300))
    assert [i for i, _ in parts] == [0, 300, 600, 900]
    np.testing.assert_array_equal(np.concatenate([c for _, c in parts]),
                                  np.asarray(store.keys, np.float32))
    assert parts[0][1].dtype == np.float32


def test_ondisk_index_answers_like_the_in_memory_one(built):
    from helpers.index import build_index

    store, queries = built
    index = load_ondisk_index(store, FACTORY, nprobe=4)
    import faiss
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not read in
    memory = build_index(store, FACTORY, nprobe=4, use_gpu=False, train_size=3000)
    d1, i1 = index.search(queries, 10)
    d2, i2 = memory.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)
    assert index.ntotal == len(store)
    assert not any(p.name.startswith(".") for p in store.path.iterdir())  # no blocks left


def test_exact_knn_in_chunks_is_flat_search(built):
    import faiss

    store, queries = built
    flat = faiss.IndexFlatL2(store.dim)
    flat.add(np.asarray(store.keys, np.float32))
    d_ref, i_ref = flat.search(queries, 7)
    d, i = exact_knn(store, queries, 7, chunk_rows=1000)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5)


def test_refine_reranks_candidates_exactly(built):
    store, queries = built
    truth_d, truth = exact_knn(store, queries, 5)
    index = load_ondisk_index(store, FACTORY, nprobe=16)
    _, cand = index.search(queries, 200)
    d, ids = refine(store, queries, cand, 5)
    np.testing.assert_array_equal(ids, truth)  # 200 candidates from all 16 cells hold the top 5
    np.testing.assert_allclose(d, truth_d, rtol=1e-4)
    _, raw = index.search(queries, 5)
    assert (raw != truth).any()  # PQ alone gets the order wrong: refining did something


def test_the_store_folder_can_move_with_its_index(built, tmp_path):
    store, queries = built
    before = load_ondisk_index(store, FACTORY).search(queries, 5)[1]
    moved = shutil.move(str(store.path), str(tmp_path / "elsewhere"))
    after = load_ondisk_index(Datastore.open(moved), FACTORY).search(queries, 5)[1]
    np.testing.assert_array_equal(before, after)


def test_moved_truncated_or_foreign_lists_are_refused(built, tmp_path):
    store, _ = built
    _, lists, _ = ondisk_files(store, FACTORY)
    shutil.move(lists, tmp_path / "aside.ivfdata")
    with pytest.raises(OnDiskIndexError, match="missing.*Put .*ivfdata back"):
        load_ondisk_index(store, FACTORY)
    data = (tmp_path / "aside.ivfdata").read_bytes()
    lists.write_bytes(data[:-100])
    with pytest.raises(OnDiskIndexError, match="truncated.*Rebuild"):
        load_ondisk_index(store, FACTORY)
    lists.write_bytes(data[:-4096] + bytes(4096))  # same size, other content
    with pytest.raises(OnDiskIndexError, match="content differs"):
        load_ondisk_index(store, FACTORY)
    lists.write_bytes(data)
    load_ondisk_index(store, FACTORY)


def test_an_index_of_another_store_is_refused(built, tmp_path):
    store, _ = built
    other = float16_store(tmp_path / "other", seed=1)
    for path in ondisk_files(store, FACTORY):
        shutil.copy(path, other.path / path.name)
    with pytest.raises(OnDiskIndexError, match="another datastore"):
        load_ondisk_index(other, FACTORY)


def test_a_factory_without_lists_is_refused(built):
    store, _ = built
    with pytest.raises(ValueError, match="must start with 'IVF'"):
        build_ondisk_index(store, "Flat")


def test_chunked_targets_equal_precompute_knn_targets_and_are_reused(tmp_path):
    from helpers.large import knn_targets_chunked
    from helpers.train_decoder import precompute_knn_targets

    store = float16_store(tmp_path / "store", n=3000)
    np.save(store.path / "values.npy", np.random.default_rng(0).integers(0, 50, len(store)))
    store = Datastore.open(store.path)
    build_ondisk_index(store, FACTORY, train_size=3000, chunk_rows=1000)
    twin = Datastore.open(shutil.copytree(store.path, tmp_path / "twin"))
    index = load_ondisk_index(store, FACTORY, nprobe=4)
    got = knn_targets_chunked(store, index, k=8, temperature=10.0, batch_size=700)
    want = precompute_knn_targets(twin, index, k=8, temperature=10.0, batch_size=4096)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.probs, want.probs)
    assert (got.ids[:, 0] >= 0).all() and got.probs.dtype == np.float16
    stamp = (got.path / "ids.npy").stat().st_mtime_ns
    again = precompute_knn_targets(store, index, k=8, temperature=10.0)  # notebook 03's call
    assert again.path == got.path and (got.path / "ids.npy").stat().st_mtime_ns == stamp
    kept = knn_targets_chunked(store, index, k=8, temperature=10.0, batch_size=700,
                               keep_self=True)
    want = precompute_knn_targets(twin, index, k=8, temperature=10.0, keep_self=True)
    assert kept.path.name == want.path.name == "targets_k8_t10_self"
    np.testing.assert_array_equal(kept.ids, want.ids)
    np.testing.assert_array_equal(kept.probs, want.probs)
