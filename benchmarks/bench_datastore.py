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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factory", default="IVF1024,PQ64")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
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
