"""kNN-LM: search the datastore, turn neighbours into a next-token distribution.

Explained in ``notebooks/02_datastore_knn_lm.ipynb``.

For a query hidden state ``q`` with neighbours ``(k_i, v_i)`` at squared L2
distance ``d_i``::

    p_kNN(y) = sum_{i: v_i = y} exp(-d_i / T) / sum_i exp(-d_i / T)
    p(y)     = (1 - lam) * p_base(y) + lam * p_kNN(y)

The notebook writes these formulas out; the functions here are the batched,
numerically careful versions that the evaluation and later notebooks reuse.
"""

from __future__ import annotations

import numpy as np
import torch

from .hidden import Extraction, extract_keys
from .validate import check_float, check_int

PROB_FLOOR = 1e-12  # perplexity clips probabilities here so log(0) stays finite


def search(index, queries: np.ndarray, k: int,
           exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest stored keys: squared L2 ``distances (Q, k)``, ``ids (Q, k)``.

    ``exclude (Q,)`` gives each query's own row in the store (when the queries
    are stored keys, e.g. training targets): it is dropped from the results.
    Approximate (IVF) indexes may return id ``-1`` when a query finds fewer
    than ``k`` keys in the cells it visits.
    """
    k = check_int("k", k, 1, example=32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must have shape (Q, {index.d}); got {queries.shape}.")
    if not np.isfinite(queries).all():
        bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
        raise ValueError(f"queries {bad[:5].tolist()} contain NaN/inf; check the model "
                         "output before searching.")
    extra = 0 if exclude is None else 1
    if extra:
        exclude = np.asarray(exclude, dtype=np.int64)  # (Q,)
        if exclude.shape != (len(queries),):
            raise ValueError(f"exclude must have shape ({len(queries)},): one store row "
                             f"per query; got {exclude.shape}.")
    if not 1 <= k <= index.ntotal - extra:
        raise ValueError(f"k={k} but the store holds {index.ntotal} keys; use 1 <= k <= "
                         f"{index.ntotal - extra}" + (" (one is the query's own row)."
                                                      if extra else "."))
    distances, ids = index.search(queries, k + extra)  # (Q, k+extra) each
    if exclude is None:
        return distances, ids
    return drop_own_rows(distances, ids, exclude)


def drop_own_rows(distances: np.ndarray, ids: np.ndarray,
                  own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``k + 1`` neighbours ``(Q, k+1)`` -> ``k`` without each query's own row ``own (Q,)``.

    A stored key's nearest neighbour is itself at distance 0; it would teach
    "predict your own next token".  If the own row is not among the results
    (ties, approximate search) the farthest neighbour is dropped instead, so
    every row keeps ``k``.  Written out in notebook 02 (``drop_self``).
    """
    ids = np.asarray(ids)
    drop = ids == np.asarray(own)[:, None]  # (Q, k+1): at most one True per row
    drop[~drop.any(axis=1), -1] = True      # own row not found: drop the farthest
    keep = ~drop
    q, k = ids.shape[0], ids.shape[1] - 1
    return np.asarray(distances)[keep].reshape(q, k), ids[keep].reshape(q, k)


def lookup_values(store, ids: np.ndarray) -> np.ndarray:
    """The stored next token of each neighbour ``(Q, k)``; ``-1`` where id is ``-1``."""
    ids = np.asarray(ids)
    return np.where(ids >= 0, np.asarray(store.values)[np.maximum(ids, 0)], -1)


def neighbour_weights(distances: np.ndarray, neighbour_values: np.ndarray,
                      temperature: float) -> np.ndarray:
    """``softmax(-d / T)`` over each row's neighbours ``(Q, k)`` float64.

    The row maximum is subtracted before ``exp`` so nothing overflows, and
    missing neighbours (value ``-1``) get weight 0.
    """
    temperature = check_float("temperature", temperature, example=300.0)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (e.g. 300.0; lower = trust the nearest "
                         f"neighbour more); got {temperature}.")
    valid = (np.asarray(neighbour_values) >= 0) & np.isfinite(distances)
    logits = np.where(valid, -np.asarray(distances, np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)                # (Q, 1)
    top[~np.isfinite(top)] = 0.0                           # rows with no neighbour
    weights = np.exp(logits - top)                         # (Q, k), max entry is 1
    total = weights.sum(axis=1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


def knn_distribution(distances: np.ndarray, neighbour_values: np.ndarray,
                     temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Sparse ``p_kNN``: ``ids (Q, k)`` int64 and ``probs (Q, k)`` float32.

    Neighbours with the same token are merged, so each token appears once per
    row, most probable first; unused slots hold id ``-1`` and probability 0.
    """
    values = np.asarray(neighbour_values, np.int64)         # (Q, k)
    weights = neighbour_weights(distances, values, temperature)
    q, k = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    values = np.take_along_axis(values, order, axis=1)      # equal tokens adjacent
    weights = np.take_along_axis(weights, order, axis=1)
    new = np.ones((q, k), bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    slot = np.cumsum(new, axis=1) - 1                       # (Q, k) merged slot
    rows = np.repeat(np.arange(q), k)
    ids = np.full((q, k), -1, np.int64)
    probs = np.zeros((q, k), np.float64)
    ids[rows, slot.ravel()] = values.ravel()
    np.add.at(probs, (rows, slot.ravel()), weights.ravel())
    ids[probs <= 0] = -1              # unused slots and missing neighbours (value -1)
    rank = np.argsort(-probs - (ids >= 0), axis=1, kind="stable")  # tokens by prob, then pad
    return (np.take_along_axis(ids, rank, axis=1),
            np.take_along_axis(probs, rank, axis=1).astype(np.float32))


def knn_prob_of(targets: np.ndarray, distances: np.ndarray,
                neighbour_values: np.ndarray, temperature: float) -> np.ndarray:
    """``p_kNN(target)`` per query ``(Q,)`` float32; 0 when no neighbour has it."""
    values = np.asarray(neighbour_values, np.int64)          # (Q, k)
    weights = neighbour_weights(distances, values, temperature)
    hit = values == np.asarray(targets, np.int64)[:, None]   # (Q, k)
    return (weights * hit).sum(axis=1).astype(np.float32)


def interpolate(p_base_target, p_knn_target, lam: float):
    """``(1 - lam) * p_base + lam * p_kNN``: the kNN-LM mixture."""
    lam = check_float("lam", lam, example=0.25)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be between 0 and 1; got {lam}. Pass e.g. lam=0.25 "
                         "(0 = base model only).")
    return (1.0 - lam) * p_base_target + lam * p_knn_target


def perplexity(probs_of_targets) -> float:
    """``exp(-mean log p)`` over target tokens.

    Probabilities are clipped at ``PROB_FLOOR`` (1e-12): a target that gets
    exactly 0 (pure kNN, ``lam=1``, token not among the neighbours) would make
    the perplexity infinite; clipped, it costs ~27.6 nats instead.
    """
    p = np.clip(np.asarray(probs_of_targets, np.float64), PROB_FLOOR, 1.0)
    return float(np.exp(-np.log(p).mean()))


def best_alpha(p_base, p_memory, valid, test, alphas) -> tuple[float, float, float]:
    """``(α, validation perplexity, test perplexity)`` of the probability blend whose α,
    from ``alphas``, is best on the ``valid`` rows (masks or indices over ``p_base``)."""
    p_base, p_memory = np.asarray(p_base), np.asarray(p_memory)
    if p_base.shape != p_memory.shape:
        raise ValueError(f"p_base {p_base.shape} and p_memory {p_memory.shape} must score the "
                         "same tokens; compute both on the same held-out pass.")
    curve = [perplexity(interpolate(p_base[valid], p_memory[valid], float(a))) for a in alphas]
    a = float(alphas[int(np.argmin(curve))])
    return a, float(min(curve)), perplexity(interpolate(p_base[test], p_memory[test], a))


_HEAD_BACKEND: dict = {}  # (shape, device, dtype) -> {"choice": ..., "seconds": {...}}


def head_backend(weight: torch.Tensor) -> dict:
    """Which library multiplies keys by a float32 CPU head ``weight (V, D)``, measured once.

    The 262,144-row head is most of a held-out pass on a CPU.  Which BLAS is
    faster at that shape depends on the machine: on an AMD EPYC (AVX2) numpy's
    OpenBLAS took 0.71 s for the product of 256 rows where torch's MKL took
    1.35 s (0.96 s against 1.69 with the log-softmax after it).  So the
    first call times both on 32 random rows (the best of two runs each) and
    keeps the faster, per head shape, for the rest of the process; the answer
    and the timings are returned.  A GPU or non-float32 head always uses torch.
    """
    key = (tuple(weight.shape), str(weight.device), str(weight.dtype))
    if key in _HEAD_BACKEND:
        return _HEAD_BACKEND[key]
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        _HEAD_BACKEND[key] = {"choice": "torch", "seconds": {}}
        return _HEAD_BACKEND[key]
    import time

    probe = torch.randn(32, weight.shape[1], generator=torch.Generator().manual_seed(0))
    w = weight.detach()
    runs = {"torch": lambda: torch.nn.functional.linear(probe, w),
            "numpy": lambda: probe.numpy() @ w.numpy().T}
    seconds = {}
    for name, run in runs.items():
        best = float("inf")
        for _ in range(2):
            tic = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - tic)
        seconds[name] = best
    _HEAD_BACKEND[key] = {"choice": min(seconds, key=seconds.get), "seconds": seconds}
    return _HEAD_BACKEND[key]


@torch.inference_mode()
def head_logits(model, keys) -> torch.Tensor:
    """The base model's next-token logits ``(..., V)`` float32 from final keys.

    What the model's own forward gives (to float32 rounding: the product may
    come from numpy's BLAS, see ``head_backend``): the LM head, then Gemma's
    final-logit soft cap when the config has one.
    """
    head = model.get_output_embeddings()
    h = torch.as_tensor(np.ascontiguousarray(keys))
    if (getattr(head, "bias", None) is None and head.weight.device.type == "cpu"
            and head_backend(head.weight)["choice"] == "numpy"):
        flat = np.ascontiguousarray(h.reshape(-1, h.shape[-1]).numpy(), dtype=np.float32)
        logits = torch.from_numpy(flat @ head.weight.detach().numpy().T)
        logits = logits.reshape(*h.shape[:-1], -1)
    else:
        logits = head(h.to(head.weight.device, head.weight.dtype)).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def base_target_probs(model, tokenizer, texts: list[str], window: int = 256,
                      overlap: int = 64, batch_size: int = 8, head_chunk: int = 256,
                      progress: bool = False) -> tuple[Extraction, np.ndarray]:
    """Keys and the base model's ``p(true next token)`` ``(N,)`` from one pass.

    Rows are in ``extract_keys`` order.  The LM head runs on ``head_chunk``
    keys at a time, so the ``(chunk, vocab)`` logits stay small.
    """
    ex = extract_keys(model, tokenizer, texts, layer=-1, window=window,
                      overlap=overlap, batch_size=batch_size, progress=progress)
    out = np.empty(len(ex.values), np.float32)
    starts = range(0, len(out), head_chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="base model's head", unit="chunk")
    for i in starts:
        logits = head_logits(model, ex.keys[i:i + head_chunk])  # (C, V)
        target = torch.from_numpy(ex.values[i:i + head_chunk]).to(logits.device)
        logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        out[i:i + head_chunk] = logp.exp().cpu().numpy()
    return ex, out
