"""Benchmark: datastore build time, flat search latency, IVF-PQ at scale.

    python benchmarks/bench_datastore.py [--synthetic 1000000] [--queries 1000]

Part 1 (real store, built by notebook 02 or here): build time split into
extraction (from the manifest) and indexing, and flat search latency for a
batch of held-out queries.
Part 2 (scale): a synthetic store of ``--synthetic`` keys of the real key
dimension -- each a random convex mix of two real keys plus 5% noise, so it
keeps the real keys' geometry without duplicating them -- indexed flat
(exact) and with IVF-PQ; memory, recall and queries/s against exact search.
Writes ``data/artifacts/bench_datastore.json``.

    python benchmarks/bench_datastore.py --large 5000000 [--queries 500]

``--large N`` instead (no model, parts 1-2 skipped): a store larger than this
machine's RAM budget.  ``N`` synthetic keys, made as in part 2 from the quick
store's real keys, are written to disk in chunks as float16; an IVF-PQ index
is trained on a sample, filled in chunks and its lists merged into an on-disk
``.ivfdata`` (``helpers/large.py``); then build time, index size, resident
memory (peak of each stage, from ``/proc/self/status``), queries/s, and
1-recall@k / k-recall@k against a chunked exact search on ``--queries``
held-out synthetic queries, with and without exact re-ranking of
``--refine`` candidates read from the float16 keys on disk.  The synthetic
store is deleted afterwards (``--keep`` keeps it).  Writes
``data/artifacts/bench_datastore_large.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, build_datastore, default_store_path
from helpers.hidden import extract_keys
from helpers.index import build_index
from helpers.knn import search
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.paths import write_results


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def index_bytes(index) -> int:
    """Serialized size of a FAISS index (what it costs in memory, roughly)."""
    return int(faiss.serialize_index(index).nbytes)


def synthetic_store(real: np.ndarray, n: int, seed: int = 0) -> Datastore:
    """``n`` keys mixed from pairs of real keys, plus noise."""
    rng = np.random.default_rng(seed)
    keys = np.empty((n, real.shape[1]), np.float32)
    scale = 0.05 * real.std(axis=0)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        a, b = rng.integers(0, len(real), (2, m))
        w = rng.uniform(0, 1, (m, 1)).astype(np.float32)
        keys[i:i + m] = (w * real[a] + (1 - w) * real[b]
                         + scale * rng.standard_normal((m, real.shape[1]), np.float32))
    zeros = np.zeros(n, np.int64)
    return Datastore(Path("synthetic"), {"count": n, "dim": real.shape[1]},
                     {"keys": keys, "values": zeros, "doc": zeros, "pos": zeros})


def _peak_rss_mib(reset: bool = False) -> float:
    """This process's peak resident memory (VmHWM) in MiB since the last reset."""
    status = Path("/proc/self/status").read_text()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024
    if reset:  # "5" resets the peak to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def write_synthetic(real: np.ndarray, values: np.ndarray, n: int, folder: Path,
                    chunk: int = 100_000, seed: int = 0) -> Datastore:
    """``synthetic_store``'s keys, written to ``folder`` in chunks as float16 (a store on disk)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = 0.05 * real.std(axis=0)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
              "fortran_order": False, "shape": (n, real.shape[1])}
    vals = np.empty(n, np.int64)
    with open(folder / "keys.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            a, b = rng.integers(0, len(real), (2, m))
            w = rng.uniform(0, 1, (m, 1)).astype(np.float32)
            keys = (w * real[a] + (1 - w) * real[b]
                    + scale * rng.standard_normal((m, real.shape[1]), np.float32))
            f.write(keys.astype(np.float16).tobytes())
            vals[i:i + m] = np.where(w[:, 0] >= 0.5, values[a], values[b])
    np.save(folder / "values.npy", vals)
    np.save(folder / "doc.npy", np.zeros(n, np.int32))
    np.save(folder / "pos.npy", np.arange(n, dtype=np.int32))
    (folder / "manifest.json").write_text(json.dumps(
        {"count": n, "dim": real.shape[1], "key_dtype": "float16", "model_name": "synthetic",
         "layer": -1, "tokenizer_fingerprint": "-", "corpus_fingerprint": f"synthetic{n}"}))
    return Datastore.open(folder)


def large(args) -> None:
    """``--large N``: build and search an on-disk IVF-PQ over N float16 keys on disk."""
    import os
    import shutil
    import tempfile

    import faiss

    from helpers.large import build_ondisk_index, exact_knn, load_ondisk_index, ondisk_files, refine

    res: dict = {"cpus": os.cpu_count()}
    if args.real_keys:  # e.g. a sample of the quick store's keys, carried to another machine
        real = np.load(args.real_keys).astype(np.float32)
        values = np.load(args.real_keys.replace("keys", "values"))
        source = f"{args.real_keys} (a sample of the quick store's keys)"
    else:
        real_store = Datastore.open(default_store_path(EMBEDDED_MODEL, "eu-law", tag="quick"))
        real, values = np.asarray(real_store.keys, np.float32), np.asarray(real_store.values)
        source = real_store.path.name
    res["synthetic_from"] = (f"{source}: {len(real):,} real keys of Gemma 3 270M; each "
                             "synthetic key a random convex mix of two of them + noise of 5% "
                             "of each dimension's std")
    folder = Path(args.large_dir or tempfile.mkdtemp(prefix="bench_large_"))
    res["keys"], res["dim"], res["key_dtype_on_disk"] = args.large, real.shape[1], "float16"
    _peak_rss_mib(reset=True)
    try:
        store, res["write_keys_s"] = timed(lambda: write_synthetic(real, values, args.large,
                                                                   folder / "store"))
        res["keys_bytes_on_disk"] = (store.path / "keys.npy").stat().st_size
        queries = np.asarray(synthetic_store(real, args.queries, seed=1).keys, np.float32)
        del real
        res["peak_rss_mib_write"] = _peak_rss_mib(reset=True)
        print({k: v for k, v in res.items() if k != "synthetic_from"}, flush=True)
        _, res["index_build_s"] = timed(lambda: build_ondisk_index(
            store, args.large_factory, train_size=args.train_size, progress=True))
        res["peak_rss_mib_build"] = _peak_rss_mib(reset=True)
        print({k: v for k, v in res.items() if k != "synthetic_from"}, flush=True)
        res["index_factory"] = args.large_factory
        files = ondisk_files(store, args.large_factory)
        res["index_file_bytes"] = files[0].stat().st_size
        res["ivfdata_bytes"] = files[1].stat().st_size
        (_, truth), res["exact_search_s"] = timed(lambda: exact_knn(store, queries, args.k))
        res["exact_qps"] = len(queries) / res["exact_search_s"]
        res["peak_rss_mib_exact"] = _peak_rss_mib(reset=True)
        print({k: v for k, v in res.items() if k != "synthetic_from"}, flush=True)
        rss = lambda: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                               if l.startswith("VmRSS")).split()[1]) / 1024
        before = rss()
        index, res["index_load_s"] = timed(lambda: load_ondisk_index(store, args.large_factory))
        res["rss_mib_added_by_load"] = rss() - before
        k = args.k

        def recalls(got, tag):
            res[f"{tag}_recall1_at{k}"] = float((got == truth[:, :1]).any(1).mean())
            res[f"{tag}_recall{k}_at{k}"] = float(np.mean(
                [len(np.intersect1d(g, t)) / k for g, t in zip(got, truth)]))

        for nprobe in args.nprobe:
            faiss.extract_index_ivf(index).nprobe = nprobe
            (_, got), s = timed(lambda: index.search(queries, k))
            res[f"nprobe{nprobe}_qps"] = len(queries) / s
            recalls(got, f"nprobe{nprobe}")
            (_, cand), s1 = timed(lambda: index.search(queries, args.refine))
            (_, got), s2 = timed(lambda: refine(store, queries, cand, k))
            res[f"nprobe{nprobe}_refine{args.refine}_qps"] = len(queries) / (s1 + s2)
            recalls(got, f"nprobe{nprobe}_refine{args.refine}")
        res["peak_rss_mib_search"] = _peak_rss_mib(reset=True)
        # (getrusage's ru_maxrss is lowered by the resets too: the stages' maximum it is)
        res["peak_rss_mib"] = max(v for k, v in res.items() if k.startswith("peak_rss_mib_"))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    res["queries"] = len(queries)
    write_results("bench_datastore_large", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", type=int, help="only the on-disk benchmark, with this many keys")
    ap.add_argument("--large-dir", help="where the synthetic store goes (default: a temp dir)")
    ap.add_argument("--large-factory", default="IVF1024,PQ64")
    ap.add_argument("--train-size", type=int, default=65_536)
    ap.add_argument("--refine", type=int, default=256, help="candidates re-ranked exactly")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic store")
    ap.add_argument("--real-keys", help="a .npy of real keys to mix from (values in the "
                                        "same name with 'values'); default: the quick store")
    ap.add_argument("--synthetic", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factory", default="IVF1024,PQ64")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    if args.large:
        return large(args)
    res: dict = {}

    model, tok = load_base_model()
    split = split_by_document(load_corpus())
    path = default_store_path(EMBEDDED_MODEL, "eu-law")
    store, build_s = timed(lambda: build_datastore(
        model, tok, list(split["train"]["text"]), path, model_name=EMBEDDED_MODEL,
        corpus_name="eu-law", progress=True))
    res["store_keys"] = len(store)
    res["extraction_s"] = store.manifest["extraction_seconds"]
    flat, res["flat_index_s"] = timed(lambda: build_index(store, "Flat"))
    queries = extract_keys(model, tok, list(split["heldout"]["text"])[:8]).keys[: args.queries]
    _, s = timed(lambda: search(flat, queries, 256))
    res["flat_search_queries"] = len(queries)
    res["flat_search_ms_per_query_k256"] = 1e3 * s / len(queries)

    big = synthetic_store(np.asarray(store.keys, np.float32), args.synthetic)
    q = synthetic_store(np.asarray(store.keys, np.float32), args.queries, seed=1).keys
    res["synthetic_keys"], res["dim"] = args.synthetic, big.dim
    exact, res["synthetic_flat_index_s"] = timed(lambda: build_index(big, "Flat"))
    (_, truth), s = timed(lambda: exact.search(q, args.k))
    res["flat_bytes"] = index_bytes(exact)
    res["flat_qps"] = len(q) / s
    exact = None  # free 2.5 GB before building IVF-PQ
    ivf, res["ivfpq_build_s"] = timed(lambda: build_index(big, args.factory))
    res["ivfpq_factory"], res["ivfpq_bytes"] = args.factory, index_bytes(ivf)
    res["ivfpq_memory_ratio"] = res["ivfpq_bytes"] / res["flat_bytes"]
    for nprobe in args.nprobe:
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        (_, got), s = timed(lambda: ivf.search(q, args.k))
        res[f"nprobe{nprobe}_qps"] = len(q) / s
        # 1-recall@k: the exact nearest neighbour is among the k returned
        res[f"nprobe{nprobe}_recall1_at{args.k}"] = float((got == truth[:, :1]).any(1).mean())
        # k-recall@k: share of the exact top-k that the approximate top-k finds
        res[f"nprobe{nprobe}_recall{args.k}_at{args.k}"] = float(np.mean(
            [len(np.intersect1d(g, t)) / args.k for g, t in zip(got, truth)]))
    write_results("bench_datastore", res)


if __name__ == "__main__":
    main()
