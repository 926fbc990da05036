"""FAISS index over a datastore (helpers.index) and search, taught in notebook 02."""

import json

import faiss
import numpy as np
import pytest

from helpers.datastore import Datastore
from helpers.index import (IndexCorrupt, build_index, index_files, load_index,
                           load_or_build_index, save_index)
from helpers.knn import search


def random_store(folder, n=300, dim=16, seed=0):
    """A datastore of random keys, written like build_datastore would."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"keys": rng.standard_normal((n, dim)).astype(np.float32),
              "values": rng.integers(0, 50, n), "doc": np.zeros(n, np.int32),
              "pos": np.arange(n, dtype=np.int32)}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    manifest = {"count": n, "dim": dim, "key_dtype": "float32"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Datastore.open(folder)


def test_saved_flat_index_round_trips(tmp_path):
    store = random_store(tmp_path / "s")
    index = build_index(store)
    save_index(index, store, "Flat")
    loaded = load_index(store, "Flat")
    queries = np.asarray(store.keys[:20]) + 0.1
    for a, b in zip(search(index, queries, 5), search(loaded, queries, 5)):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((tmp_path / "s" / "index.json").read_text())
    assert (meta["ntotal"], meta["dim"], meta["store_count"]) == (300, 16, 300)


def test_truncated_index_raises_index_corrupt_and_store_still_opens(tmp_path):
    store = random_store(tmp_path / "s")
    save_index(build_index(store), store)
    file = tmp_path / "s" / "index.faiss"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(IndexCorrupt, match="Delete .*build_index"):
        load_index(store)
    assert len(Datastore.open(tmp_path / "s")) == 300


def test_index_of_another_store_size_is_refused(tmp_path):
    big, small = random_store(tmp_path / "big", n=300), random_store(tmp_path / "small", n=200)
    save_index(build_index(big), big)
    for name in ("index.faiss", "index.json"):
        (tmp_path / "small" / name).write_bytes((tmp_path / "big" / name).read_bytes())
    with pytest.raises(IndexCorrupt, match="holds 300 keys .* store has 200"):
        load_index(small)


def test_load_index_refuses_a_file_of_another_factory(tmp_path):
    store = random_store(tmp_path / "s")
    ivf = save_index(build_index(store, "IVF4,Flat"), store, "IVF4,Flat")
    assert ivf.name == "index-IVF4_Flat.faiss"
    for flat, other in zip(index_files(store, "Flat"), index_files(store, "IVF4,Flat")):
        flat.write_bytes(other.read_bytes())  # an IVF index where the Flat one belongs
    with pytest.raises(ValueError, match="IndexIVFFlat nlist=4 .factory .IVF4,Flat.., not .Flat."):
        load_index(store, "Flat")


def test_missing_index_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved Flat index.*build_index\(store, 'Flat'\)"):
        load_index(random_store(tmp_path / "s"))


def test_load_or_build_index_builds_once_then_loads(tmp_path, monkeypatch):
    import helpers.index as ix
    store = random_store(tmp_path / "s")
    built = []
    monkeypatch.setattr(ix, "build_index", lambda *a: built.append(a) or build_index(*a))
    first = load_or_build_index(store)
    second = load_or_build_index(store)
    assert len(built) == 1 and first.ntotal == second.ntotal == 300
    load_or_build_index(store, "IVF4,Flat")  # another factory gets files of its own
    load_or_build_index(store)
    assert len(built) == 2 and all(f.is_file() for f in index_files(store, "IVF4,Flat"))
    assert len(built) == 2 and load_index(store, "IVF4,Flat").ntotal == 300


def test_ivf_pq_index_trains_on_a_sample_and_finds_each_key(tmp_path):
    store = random_store(tmp_path / "s", n=2000)
    index = build_index(store, "IVF4,PQ4", nprobe=3, train_size=1500)
    assert index.is_trained and index.ntotal == 2000
    assert faiss.extract_index_ivf(index).nprobe == 3
    _, ids = search(index, store.keys[:100], 5)
    assert (ids == np.arange(100)[:, None]).any(axis=1).mean() > 0.9


def test_too_few_keys_to_train_gets_advice(tmp_path):
    with pytest.raises(ValueError, match="factory='Flat' for a small store"):
        build_index(random_store(tmp_path / "s", n=100), "IVF4,PQ4")


def test_without_exclude_the_nearest_stored_key_is_itself(tmp_path):
    store = random_store(tmp_path / "s")
    distances, ids = search(build_index(store), store.keys[:50], 4)
    assert distances.shape == ids.shape == (50, 4) and ids.dtype == np.int64
    assert ids[:, 0].tolist() == list(range(50))
    np.testing.assert_allclose(distances[:, 0], 0, atol=1e-4)


def test_exclude_drops_each_querys_own_row(tmp_path):
    store = random_store(tmp_path / "s")
    index = build_index(store)
    distances, ids = search(index, store.keys[:50], 4, exclude=np.arange(50))
    plain_d, plain_ids = search(index, store.keys[:50], 5)
    assert not (ids == np.arange(50)[:, None]).any()
    np.testing.assert_array_equal(ids, plain_ids[:, 1:])
    np.testing.assert_array_equal(distances, plain_d[:, 1:])


def test_exclude_drops_the_farthest_when_own_row_is_not_found(tmp_path):
    store = random_store(tmp_path / "s")
    index = build_index(store)
    query = np.asarray(store.keys[:1])
    _, near = search(index, query, 4)
    far = search(index, -query, 1)[1][0]  # a row nowhere near the query
    _, ids = search(index, query, 3, exclude=far)
    np.testing.assert_array_equal(ids, near[:, :3])


def test_k_larger_than_the_store_is_refused_with_its_size(tmp_path):
    index = build_index(random_store(tmp_path / "s", n=30))
    query = np.zeros((1, 16), np.float32)
    with pytest.raises(ValueError, match="holds 30 keys; use 1 <= k <= 30"):
        search(index, query, 31)
    with pytest.raises(ValueError, match="k <= 29"):
        search(index, query, 30, exclude=np.array([0]))


def test_nan_query_is_refused(tmp_path):
    index = build_index(random_store(tmp_path / "s"))
    queries = np.zeros((3, 16), np.float32)
    queries[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"queries \[2\] contain NaN"):
        search(index, queries, 3)


def test_a_flipped_byte_in_the_index_is_caught_by_its_checksum(tmp_path):
    store = random_store(tmp_path / "s")
    save_index(build_index(store), store)
    file = tmp_path / "s" / "index.faiss"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored vectors: still a readable file
    file.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="sha256 differs"):
        load_index(store)


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_index_goes_to_one_gpu_or_is_split_over_all(monkeypatch, gpus):
    """faiss-cpu has no GPU code, so this stands in for faiss-gpu: with one GPU the
    index is copied to GPU 0; with several it is sharded over all of them."""
    import types

    import helpers.index as ix
    from helpers.cpu import import_faiss
    real, calls = import_faiss(), []

    class Options:
        shard = False

    fake = types.SimpleNamespace(
        StandardGpuResources=lambda: "resources", get_num_gpus=lambda: gpus,
        GpuMultipleClonerOptions=Options,
        index_cpu_to_gpu=lambda res, dev, index: calls.append(("one", res, dev)) or index,
        index_cpu_to_all_gpus=lambda index, co: calls.append(("all", co.shard)) or index)
    monkeypatch.setattr(ix, "import_faiss", lambda: fake)
    monkeypatch.setattr(ix, "_GPU_RESOURCES", None)
    flat = real.IndexFlatL2(4)
    assert ix._to_gpu(flat, "auto") is flat
    assert calls == ([("one", "resources", 0)] if gpus == 1 else [("all", True)])
    assert ix._to_gpu(flat, False) is flat and len(calls) == 1  # use_gpu=False: untouched


def test_an_index_split_over_cpu_shards_is_not_taken_for_a_gpu_one():
    from helpers.cpu import import_faiss
    from helpers.index import _on_gpu, index_signature
    faiss = import_faiss()
    shards = faiss.IndexShards(4)
    part = faiss.IndexFlatL2(4)
    shards.add_shard(part)
    assert not _on_gpu(shards) and not _on_gpu(faiss.IndexShards(4))
    assert index_signature(shards)["index"] == "IndexShards"
