"""Stores larger than RAM: an IVF-PQ index with its inverted lists on disk.

Used by ``benchmarks/bench_datastore.py --large`` and the README's "Scaling
out"; the notebooks' default (an in-memory ``Flat`` or small IVF index from
``helpers.index``) is unchanged.

* :func:`build_ondisk_index` trains ``IVFn,PQm`` on a seeded sample of the
  keys, then adds them in chunks read from ``keys.npy`` through a memory map
  that is dropped after each chunk, so resident memory stays near one chunk
  whatever the store's size (float16 keys on disk work as float32 ones).
  Each chunk's codes go to a block file; ``faiss.contrib.ondisk.merge_ondisk``
  then writes every list into one ``.ivfdata`` file beside the index.
* :func:`load_ondisk_index` reads the index with ``IO_FLAG_ONDISK_SAME_DIR``:
  the lists are memory-mapped from the ``.ivfdata`` next to it, so a search
  reads the pages of the ``nprobe`` lists it visits and nothing else.  A list
  file that was moved, truncated or swapped for another is refused, with
  what to do.
* :func:`exact_knn` is the chunked exact search that recall is measured
  against, and :func:`refine` re-ranks approximate candidates with exact
  distances read from the memory-mapped keys (again chunk-free: only the
  candidate rows are read).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .cpu import import_faiss
from .datastore import Datastore
from .paths import CorruptFile, atomic_file, read_json, sha256_file
from .validate import check_int, check_str


class OnDiskIndexError(RuntimeError):
    """The on-disk index or its list file is missing, moved, truncated or foreign."""


def ondisk_files(store: Datastore, factory: str) -> tuple[Path, Path, Path]:
    """``(index file, list file, JSON sidecar)`` of ``factory``'s on-disk index in the store."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")
    base = store.path / f"index-{slug}-ondisk"
    return base.with_suffix(".faiss"), base.with_suffix(".ivfdata"), base.with_suffix(".json")


def key_chunks(store: Datastore, chunk_rows: int = 131_072, start: int = 0,
               stop: int | None = None):
    """``(first row, float32 keys)`` chunks of ``store``; each through a map of its own.

    ``np.load(mmap_mode="r")`` per chunk, dropped before the next: the pages
    read leave this process's resident set with the map (the page cache keeps
    them for the kernel to reclaim), so peak memory is one chunk, not the store.
    """
    stop = len(store) if stop is None else stop
    for i in range(start, stop, chunk_rows):
        keys = np.load(store.path / "keys.npy", mmap_mode="r")
        block = np.array(keys[i:min(i + chunk_rows, stop)], dtype=np.float32)
        del keys
        yield i, block


def read_rows(store: Datastore, rows: np.ndarray) -> np.ndarray:
    """float32 keys of ``rows`` (any order), read with ``pread``: no memory map.

    A map would not do here: each scattered row faults in its neighbours too
    (the kernel maps pages around a fault), so a few hundred thousand random
    rows of a 5M-key store map most of it into this process (measured: 9.8 GB
    resident).  Reads go to the page cache, which the kernel can drop.
    """
    rows = np.asarray(rows, dtype=np.int64)
    with open(store.path / "keys.npy", "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = read_header(f)
        start, dim = f.tell(), shape[1]
        width = dim * dtype.itemsize
        if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
            raise IndexError(f"rows must lie in [0, {shape[0]}); got {rows.min()}..{rows.max()}.")
        out = np.empty((len(rows), dim), np.float32)
        fd = f.fileno()
        for j in np.argsort(rows, kind="stable"):  # in file order
            out[j] = np.frombuffer(os.pread(fd, width, start + int(rows[j]) * width), dtype)
    return out


def _sample_digest(path: Path, blocks: int = 16, size: int = 1 << 16) -> str:
    """sha256 of ``blocks`` evenly spread 64 KiB pieces of ``path`` (cheap at any size)."""
    total = path.stat().st_size
    digest = hashlib.sha256(str(total).encode())
    with open(path, "rb") as f:
        for offset in np.linspace(0, max(0, total - size), blocks).astype(np.int64):
            f.seek(int(offset))
            digest.update(f.read(size))
    return digest.hexdigest()[:16]


def build_ondisk_index(store: Datastore, factory: str = "IVF1024,PQ64", *,
                       train_size: int = 65_536, seed: int = 0, chunk_rows: int = 131_072,
                       rows_per_block: int = 1_048_576, progress: bool = False):
    """Train ``factory`` on a sample, add every key in chunks, write lists to ``.ivfdata``.

    Returns the path of the index file; :func:`load_ondisk_index` opens it.
    Memory: the training sample (``train_size`` x dim float32), one chunk of
    keys and one block of codes (``rows_per_block`` x code size), whatever
    the number of keys.
    """
    faiss = import_faiss()
    from faiss.contrib.ondisk import merge_ondisk

    check_str("factory", factory, "IVF1024,PQ64")
    train_size = check_int("train_size", train_size, 1, example=65_536)
    chunk_rows = check_int("chunk_rows", chunk_rows, 1, example=131_072)
    rows_per_block = check_int("rows_per_block", rows_per_block, 1, example=1_048_576)
    if not factory.startswith("IVF"):
        raise ValueError(f"an on-disk index needs inverted lists: factory must start with "
                         f"'IVF' (e.g. 'IVF1024,PQ64'), not {factory!r}.")
    try:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"faiss does not understand the factory {factory!r} "
                         f"({str(err).splitlines()[0][:200]}); use e.g. 'IVF1024,PQ64'.") \
            from None
    ivf = faiss.extract_index_ivf(index)
    for part in (index, ivf):
        part = faiss.downcast_index(part)
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), min(train_size, len(store)), replace=False))
    index.train(read_rows(store, rows))
    target, lists, sidecar = ondisk_files(store, factory)
    work = target.with_name(f".{target.stem}.blocks")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trained = faiss.serialize_index(index)
    blocks = []
    try:
        starts = range(0, len(store), rows_per_block)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="index blocks", unit="block")
        for first in starts:
            block = faiss.deserialize_index(trained)
            stop = min(first + rows_per_block, len(store))
            for i, keys in key_chunks(store, chunk_rows, first, stop):
                block.add_with_ids(keys, np.arange(i, i + len(keys), dtype=np.int64))
            blocks.append(work / f"block_{len(blocks):05d}.faiss")
            faiss.write_index(block, str(blocks[-1]))
            del block
        empty = faiss.deserialize_index(trained)
        tmp_lists = work / lists.name
        merge_ondisk(empty, [str(b) for b in blocks], str(tmp_lists))
        # the index records the list file by name; read with IO_FLAG_ONDISK_SAME_DIR it is
        # looked up beside the index, so the folder can move as a whole
        faiss.write_index(empty, str(work / target.name))
        del empty
        meta = {"factory": factory, "ntotal": len(store), "dim": store.dim,
                "store_fingerprint": store.fingerprint, "store_count": len(store),
                "index_sha256": sha256_file(work / target.name),
                "ivfdata_bytes": tmp_lists.stat().st_size,
                "ivfdata_sample_digest": _sample_digest(tmp_lists)}
        os.replace(tmp_lists, lists)
        os.replace(work / target.name, target)
        with atomic_file(sidecar) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_ondisk_index(store: Datastore, factory: str = "IVF1024,PQ64", nprobe: int = 32):
    """Open the on-disk index of ``store``: lists memory-mapped, checked against the sidecar."""
    faiss = import_faiss()
    nprobe = check_int("nprobe", nprobe, 1, example=32)
    target, lists, sidecar = ondisk_files(store, factory)
    advice = (f"Rebuild it: build_ondisk_index(store, {factory!r}) (benchmarks/"
              "bench_datastore.py --large does).")
    if not (target.is_file() and sidecar.is_file()):
        raise FileNotFoundError(f"no on-disk {factory} index in {store.path}. {advice}")
    try:
        meta = read_json(sidecar, advice, ("ivfdata_bytes", "index_sha256"))
    except CorruptFile as err:
        raise OnDiskIndexError(str(err)) from None
    if not lists.is_file():
        raise OnDiskIndexError(
            f"the inverted lists of {target.name} are missing: {lists} is not there (moved or "
            f"deleted?). Put {lists.name} back beside {target.name} (they move together), "
            f"or: {advice}")
    size = lists.stat().st_size
    if size != meta["ivfdata_bytes"]:
        raise OnDiskIndexError(
            f"{lists} holds {size:,} bytes but {meta['ivfdata_bytes']:,} were written: it is "
            f"truncated or another index's. {advice}")
    if _sample_digest(lists) != meta.get("ivfdata_sample_digest"):
        raise OnDiskIndexError(f"{lists} is not the list file written with {target.name} "
                               f"(its content differs). {advice}")
    if sha256_file(target) != meta["index_sha256"]:
        raise OnDiskIndexError(f"{target} is corrupt or truncated (sha256 differs). {advice}")
    if meta.get("store_fingerprint") != store.fingerprint or meta["ntotal"] != len(store):
        raise OnDiskIndexError(f"{target} was built from another datastore: its ids would "
                               f"point at the wrong rows. {advice}")
    try:  # the list file is looked up beside the index, whatever path it was written at
        index = faiss.read_index(str(target.resolve()), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as err:
        raise OnDiskIndexError(f"{target} cannot be read ({str(err)[:200]}). {advice}") \
            from None
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def exact_knn(store: Datastore, queries: np.ndarray, k: int,
              chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 ``(distances, ids)`` of ``queries`` over every key, a chunk at a time."""
    faiss = import_faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k)
    for i, keys in key_chunks(store, chunk_rows):
        d, ids = faiss.knn(queries, keys, min(k, len(keys)))
        if d.shape[1] < k:
            pad = k - d.shape[1]
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1 - i)
        heap.add_result(d, ids + i)
    heap.finalize()
    return heap.D, heap.I


def refine(store: Datastore, queries: np.ndarray, candidates: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``candidates (Q, K')`` by exact distance (keys read from disk); keep ``k``."""
    queries = np.asarray(queries, dtype=np.float32)
    out_d = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 64):  # 64 queries' candidates at a time
        cand = candidates[s:s + 64]
        flat = cand.ravel()
        valid = flat >= 0
        keys = np.zeros((len(flat), store.dim), np.float32)
        keys[valid] = read_rows(store, flat[valid])
        keys = keys.reshape(*cand.shape, store.dim)
        d = ((keys - queries[s:s + 64, None, :]) ** 2).sum(-1)  # (q, K')
        d[cand < 0] = np.inf
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        out_d[s:s + 64] = np.take_along_axis(d, order, 1)
        out_i[s:s + 64] = np.take_along_axis(cand, order, 1)
    return out_d, out_i


def _npy_writer(path: Path, shape: tuple, dtype):
    """An open ``.npy`` file with its header written; append the rows in order."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return f


def knn_targets_chunked(store: Datastore, index, k: int = 256, temperature: float = 500.0,
                        batch_size: int = 4096, progress: bool = False,
                        keep_self: bool = False):
    """The kNN targets of every stored key, computed with bounded memory: keys read a batch at
    a time, targets appended to their files (no memory map of the output), the same folder and
    metadata as ``precompute_knn_targets``, which checks its cache and then calls this.

    So ``precompute_knn_targets(store, index, k, temperature)`` and notebook 03
    reuse what this writes.  Resident memory: one batch of keys and results,
    plus the store's ``values`` (8 bytes a row) for the neighbours' tokens.
    """
    from .knn import knn_distribution, search
    from .paths import atomic_dir
    from .train_decoder import (TARGET_FILES, _open_targets, check_keep_self,
                                targets_folder_and_meta)
    from .validate import check_float

    k = check_int("k", k, 1, example=256)
    temperature = check_float("temperature", temperature, example=500.0)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}. Pass e.g. 500.0.")
    batch_size = check_int("batch_size", batch_size, 1, example=4096)
    if index.ntotal != len(store):
        raise ValueError(f"the index holds {index.ntotal} keys but the store {len(store)}; "
                         "rebuild it for this store (build_ondisk_index).")
    keep_self = check_keep_self(keep_self)
    folder, meta = targets_folder_and_meta(store, index, k, temperature, keep_self)
    values = np.load(store.path / "values.npy")  # (N,) int64, in RAM: 8 B a row
    chunks = key_chunks(store, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, total=-(-len(store) // batch_size), desc="kNN targets",
                      unit="batch")
    with atomic_dir(folder, TARGET_FILES, "a kNN-targets") as tmp:
        with _npy_writer(tmp / "ids.npy", (len(store), k), np.int32) as f_ids, \
                _npy_writer(tmp / "probs.npy", (len(store), k), np.float16) as f_probs:
            for i, keys in chunks:
                distances, neighbours = search(
                    index, keys, k, exclude=None if keep_self else np.arange(i, i + len(keys)))
                nv = np.where(neighbours >= 0, values[np.maximum(neighbours, 0)], -1)
                ids, probs = knn_distribution(distances, nv, temperature)
                f_ids.write(np.ascontiguousarray(ids, np.int32).tobytes())
                f_probs.write(np.ascontiguousarray(probs, np.float16).tobytes())
        (tmp / "targets.json").write_text(json.dumps(meta, indent=2))
    return _open_targets(folder, meta)
