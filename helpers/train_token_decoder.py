"""Training the token-level Memory Decoder on a datastore's kNN targets.

To be explained in notebook 06 (issue 18).  The targets are the hidden-state
decoder's (``precompute_knn_targets``), and so is the loss::

    loss = beta * KL(p_kNN || p_dec) + (1 - beta) * CE(p_dec, next token)

**Alignment with the store.**  Row ``r`` says: in text ``doc[r]``, the token
at position ``pos[r] + 1`` is ``values[r]``.  Rows of a text are contiguous
and in position order from ``pos = 0`` (``extract_keys``), so the text's
first row is ``s = r - pos[r]`` and its tokens are::

    token 0     = bos_id              (not stored: no row predicts it)
    token q > 0 = values[s + q - 1]

``extract_keys`` tokenizes with the tokenizer's special tokens, so for Gemma
(and the tests' tiny tokenizer) token 0 is ``tokenizer.bos_token_id``; the
config records it as ``bos_id``.  The decoder reads tokens ``0 .. pos[r]``
and its output at ``pos[r]`` is trained towards row ``r``'s targets.

**Whole chunks.**  Rather than one target per sequence, training reads
chunks of up to ``context`` tokens of one text, and *every* position of a
chunk is a target -- each store row exactly once per epoch.  A text longer
than ``context`` is cut like ``extract_keys`` cuts it: each later chunk
repeats ``overlap`` tokens as left context and predicts only after them
(a quarter of the context unless given: 64 of 256, as ``extract_keys``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .token_decoder import TokenMemoryDecoder
from .train_decoder import (KnnTargets, _snapshot, check_training_args, evaluate_epoch,
                            memdec_loss, optimizer_and_schedule, optimizer_step)
from .validate import check_int


def _first_rows(rows_like, rows: np.ndarray) -> np.ndarray:
    """First row ``r - pos[r]`` of each row's text, checked to be that text's ``pos = 0``."""
    doc, pos = np.asarray(rows_like.doc), np.asarray(rows_like.pos)
    first = rows - pos[rows]
    if (first < 0).any() or (doc[first] != doc[rows]).any() or (pos[first] != 0).any():
        raise ValueError("the rows are not laid out as extract_keys writes them (the rows "
                         "of a text contiguous, in position order from 0); rebuild the "
                         "datastore with build_datastore(...).")
    return first


def _tokens(values: np.ndarray, first: np.ndarray, q: np.ndarray, bos_id: int) -> np.ndarray:
    """Token at position ``q`` of the text whose first row is ``first`` (broadcast)."""
    got = values[np.clip(first + q - 1, 0, len(values) - 1)]
    return np.where(q == 0, bos_id, got)


def _check_bos(bos_id) -> int:
    if bos_id is None:
        raise ValueError("bos_id is None: the token decoder needs the token every stored "
                         "text starts with (the tokenizer's BOS, which extract_keys adds). "
                         "Pass bos_id=tokenizer.bos_token_id; a tokenizer without one is "
                         "not supported yet.")
    return check_int("bos_id", bos_id, 0, example=2)


def token_windows(store, rows, context: int, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that predict each of ``rows``: ``ids (B, T)`` and target position ``at (B,)``.

    Row ``r``'s window holds the last ``min(pos[r] + 1, context)`` tokens of
    its text up to position ``pos[r]``, left-aligned (``T = context``); the
    decoder's output at ``at[b]`` predicts ``values[r]``.  Slots after it are
    ``-1`` (the unknown id; causal attention never reads them).  ``store``
    may be any object with ``values``, ``doc`` and ``pos`` (a ``HeldOut`` too).
    """
    T, bos_id = check_int("context", context, 1, example=256), _check_bos(bos_id)
    rows = np.asarray(rows, dtype=np.int64)                        # (B,)
    values = np.asarray(store.values)
    first = _first_rows(store, rows)
    p = rows - first                                               # (B,) = pos[rows]
    lo = np.maximum(0, p + 1 - T)                                  # (B,) window start
    q = lo[:, None] + np.arange(T)                                 # (B, T) positions
    ids = np.where(q <= p[:, None], _tokens(values, first[:, None], q, bos_id), -1)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(p - lo)


def chunk_plan(store, context: int, overlap: int | None = None) -> np.ndarray:
    """Chunks ``(first_row, start, first_target, end)`` ``(C, 4)`` covering every row once.

    A chunk reads positions ``start .. end-1`` of the text whose first row is
    ``first_row`` and is trained on positions ``first_target .. end-1``.
    """
    T = check_int("context", context, 2, example=256)
    overlap = T // 4 if overlap is None else check_int("overlap", overlap, 0, example=64)
    if overlap >= T:
        raise ValueError(f"overlap must be < context ({T}); got {overlap}. Pass e.g. "
                         f"overlap={T // 4}.")
    pos = np.asarray(store.pos)
    firsts = np.flatnonzero(pos == 0)
    _first_rows(store, np.arange(len(pos)))                        # layout check
    lengths = np.diff(np.append(firsts, len(pos)))                 # rows per text
    plan = []
    for s, n in zip(firsts.tolist(), lengths.tolist()):
        end = min(n, T)
        plan.append((s, 0, 0, end))
        while end < n:
            start = end - overlap
            plan.append((s, start, end, min(n, start + T)))
            end = plan[-1][3]
    return np.asarray(plan, dtype=np.int64).reshape(-1, 4)


def chunk_batch(store, plan: np.ndarray, context: int,
                bos_id: int) -> tuple[torch.Tensor, np.ndarray]:
    """``ids (B, T)`` of each chunk of ``plan`` and the store ``rows (B, T)`` it predicts.

    ``T`` is the longest chunk's length (at most ``context``): a batch of short
    texts is not padded to ``context``, which only cost time (causal attention
    never reads the padding).  ``rows[b, t] = -1`` where position ``t`` is
    context only or padding (padding ids are ``-1``, the unknown id).
    """
    bos_id = _check_bos(bos_id)
    context = check_int("context", context, 1, example=256)
    values = np.asarray(store.values)
    s, start, first_t, end = (plan[:, i:i + 1] for i in range(4))  # (B, 1) each
    width = min(context, int((end - start).max(initial=1)))       # longest chunk
    q = start + np.arange(width)                                   # (B, T) positions
    ids = np.where(q < end, _tokens(values, s, q, bos_id), -1)
    rows = np.where((q >= first_t) & (q < end), s + q, -1)
    return torch.from_numpy(ids.astype(np.int64)), rows


def train_token_decoder(decoder: TokenMemoryDecoder, store, targets: KnnTargets, *,
                        bos_id: int | None = None, epochs: int = 2, lr: float = 1e-3,
                        batch_size: int = 1, beta: float = 0.5, overlap: int | None = None,
                        weight_decay: float = 0.01, warmup_frac: float = 0.05,
                        eval_fn=None, seed: int = 0, max_steps: int | None = None,
                        progress: bool = True) -> dict:
    """Train on every store row, ``batch_size`` chunks a step; keep the best weights.

    One chunk a step (the default) is what fits a small store: at the quick
    size, 2 epochs of 402 steps of one chunk gave a test perplexity of 8.70
    (60 s), 52 steps of eight 10.12 (46 s) (``bench_token_decoder.py``).

    ``bos_id`` defaults to the decoder's ``config.bos_id``.  ``eval_fn(decoder)
    -> float`` (lower is better) runs after each epoch and picks the weights
    kept; without it the last epoch's are.  A NaN/inf loss stops training
    (``history["stopped"]``) and restores the best weights so far.
    """
    from tqdm.auto import tqdm
    epochs, batch_size, seed, lr, beta, weight_decay, warmup_frac, max_steps = \
        check_training_args(epochs=epochs, batch_size=batch_size, seed=seed, lr=lr, beta=beta,
                            weight_decay=weight_decay, warmup_frac=warmup_frac,
                            max_steps=max_steps, eval_fn=eval_fn, example_epochs=2,
                            example_batch=1)
    if len(targets) != len(store):
        raise ValueError(f"the store has {len(store)} rows but the targets {len(targets)}; "
                         "compute them for this store with precompute_knn_targets(store, "
                         "index).")
    c = decoder.config
    bos_id = _check_bos(c.bos_id if bos_id is None else bos_id)
    plan = chunk_plan(store, c.context, overlap)
    steps_per_epoch = math.ceil(len(plan) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps,
                                                                    epochs * steps_per_epoch)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, lr, weight_decay, warmup_frac, total)
    device = next(decoder.parameters()).device
    history = {"loss": [], "kl": [], "ce": [], "eval": [], "best_epoch": None,
               "chunks": len(plan), "steps_per_epoch": steps_per_epoch, "stopped": None}
    best_state, best, step = _snapshot(decoder), math.inf, 0
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress)
    with torch.random.fork_rng(devices=[]):  # seeded dropout; caller's RNG untouched
        torch.manual_seed(seed)
        for epoch in range(epochs):
            decoder.train()
            order = torch.randperm(len(plan), generator=generator).numpy()
            for i in range(0, len(plan), batch_size):
                if step >= total:
                    break
                ids, rows = chunk_batch(store, plan[order[i:i + batch_size]], c.context,
                                        bos_id)
                keep = rows >= 0                                       # (B, T) targets
                logits = decoder(ids.to(device))[torch.from_numpy(keep).to(device)]  # (N, V)
                r = rows[keep]                                         # (N,) store rows
                loss, kl, ce = memdec_loss(logits, targets.ids[r], targets.probs[r],
                                           np.asarray(store.values[r]), decoder, beta)
                if not torch.isfinite(loss):
                    history["stopped"] = (f"loss became {loss.item()} at step {step}; "
                                          "restored the best weights so far. Lower lr.")
                    warnings.warn(history["stopped"], stacklevel=2)
                    break
                optimizer_step(loss, kl, ce, params, optimizer, scheduler, history)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if history["stopped"]:
                break
            value = evaluate_epoch(decoder, eval_fn, history)
            if eval_fn is None or value < best:
                best, best_state, history["best_epoch"] = value, _snapshot(decoder), epoch + 1
            if step >= total:
                break
    bar.close()
    decoder.load_state_dict(best_state)
    decoder.eval()
    return history


def token_logp_rows(decoder: TokenMemoryDecoder, rows_like, plan: np.ndarray, wanted=None,
                    bos_id=None, batch_size: int = 16):
    """Yield ``(rows (n,), log p_dec (n, V))`` over ``rows_like``'s rows, reading the
    chunks of ``plan`` (``chunk_plan(rows_like, decoder.config.context, overlap)``, as in
    training) ``batch_size`` at a time, one yield per batch, in eval mode (call it under
    ``torch.inference_mode``).  ``wanted``: a boolean mask over the rows (None: all);
    batches without a wanted row yield nothing.  ``log p_dec`` stays on the decoder's device.
    """
    c = decoder.config
    bos_id = _check_bos(c.bos_id if bos_id is None else bos_id)
    device = next(decoder.parameters()).device
    was_training = decoder.training
    decoder.eval()
    try:
        for i in range(0, len(plan), batch_size):
            ids, rows = chunk_batch(rows_like, plan[i:i + batch_size], c.context, bos_id)
            keep = rows >= 0
            if wanted is not None:
                keep &= wanted[np.maximum(rows, 0)]
            if not keep.any():
                continue
            logp = torch.log_softmax(decoder(ids.to(device)).float(), -1)   # (B, T, V)
            yield rows[keep], logp[torch.from_numpy(keep).to(device)]       # (n,), (n, V)
    finally:
        decoder.train(was_training)


@torch.inference_mode()
def token_target_probs(decoder: TokenMemoryDecoder, rows_like, bos_id: int | None = None,
                       overlap: int | None = None, batch_size: int = 16,
                       floor: float = -30.0) -> np.ndarray:
    """``p_dec(true next token)`` float32 for every row of ``rows_like`` (a store or a
    ``HeldOut``), chunk by chunk like training.  Tokens the head lacks get ``exp(floor)``."""
    values = np.asarray(rows_like.values)
    out = np.full(len(values), np.nan, np.float32)
    plan = chunk_plan(rows_like, decoder.config.context, overlap)
    for r, logp in token_logp_rows(decoder, rows_like, plan, bos_id=bos_id,
                                   batch_size=batch_size):
        col = decoder.head_index(values[r]).to(logp.device)             # (N,)
        got = logp.gather(1, col.clamp(min=0)[:, None])[:, 0]
        out[r] = torch.where(col >= 0, got, floor).exp().cpu().numpy()
    return out
