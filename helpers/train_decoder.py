"""Training the Memory Decoder on a datastore: targets, batches, loss, loop.

Explained in ``notebooks/03_train_memory_decoder.ipynb``.

For every stored key the target is the kNN distribution of its neighbours
(its own row excluded: it holds the answer).  The decoder minimises::

    loss = beta * KL(p_kNN || p_dec) + (1 - beta) * CE(p_dec, next token)

``precompute_knn_targets`` searches once and caches the sparse targets next
to the store, so training epochs never touch the FAISS index.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import MemoryDecoder, save_decoder
from .paths import CorruptFile, load_array, read_json
from .validate import ArgumentTypeError, check_float, check_int


@dataclass
class KnnTargets:
    """Sparse ``p_kNN`` for every store row: token ``ids`` and their ``probs``."""
    ids: np.ndarray     # (N, k) int32 base token ids, -1 = unused slot
    probs: np.ndarray   # (N, k) float16, each row sums to ~1
    k: int
    temperature: float
    path: Path

    def __len__(self) -> int:
        return len(self.ids)

    def p_stored(self, store, rows=None) -> np.ndarray:
        """``(R,)``: how much of each row's target sits on its own stored next token
        (``rows`` default: all).  Near 1 with ``keep_self`` (notebook 03, section 2)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        stored = np.asarray(store.values)[rows][:, None]              # (R, 1)
        return ((self.ids[rows] == stored) * self.probs[rows].astype(np.float32)).sum(1)


TARGET_FILES = ("ids.npy", "probs.npy", "targets.json")


def _open_targets(folder: Path, meta: dict, advice: str = "") -> KnnTargets:
    advice = advice or (f"delete the folder {folder} and rerun precompute_knn_targets "
                        "(notebook 03) to compute it again.")
    ids = load_array(folder / "ids.npy", advice)
    probs = load_array(folder / "probs.npy", advice)
    want = (meta["count"], meta["k"])
    if ids.shape != want or probs.shape != want:
        raise CorruptFile(f"{folder} holds targets of shape {ids.shape} / {probs.shape}, "
                          f"not {want}; {advice}")
    return KnnTargets(ids, probs, meta["k"], meta["temperature"], folder)


def targets_folder_and_meta(store, index, k: int, temperature: float,
                            keep_self: bool = False) -> tuple[Path, dict]:
    """Where the kNN targets of ``store`` live, and what they were computed with: a
    cache is reused only while its ``targets.json`` equals this ``meta``."""
    from .index import index_signature  # lazily: it loads faiss
    m = store.manifest
    meta = {"k": k, "temperature": float(temperature), "count": len(store),
            "corpus_fingerprint": m.get("corpus_fingerprint"),
            "model_name": m.get("model_name"), "layer": m.get("layer"),
            "store_fingerprint": store.fingerprint, **index_signature(index),
            **({"keep_self": True} if keep_self else {})}
    return store.path / f"targets_k{k}_t{temperature:g}{'_self' if keep_self else ''}", meta


def check_keep_self(keep_self) -> bool:
    """``keep_self`` as a bool; anything but True/False is refused with advice."""
    if not isinstance(keep_self, (bool, np.bool_)):
        raise ArgumentTypeError(f"keep_self must be True or False; got {keep_self!r} "
                                f"({type(keep_self).__name__}). False drops each row's own "
                                "neighbour, as the Memory Decoder paper does.")
    return bool(keep_self)


def precompute_knn_targets(store, index, k: int = 256, temperature: float = 500.0,
                           batch_size: int = 4096, progress: bool = False,
                           keep_self: bool = False) -> KnnTargets:
    """``p_kNN`` of every stored key from its ``k`` neighbours (itself excluded, by default).

    Saved in ``<store>/targets_k{k}_t{T}/`` and reused while it matches the
    store (its fingerprint) and the index (structure and ``nprobe``: targets
    from an approximate search are not those of an exact one).  A damaged
    cache is computed again.

    ``keep_self=True`` keeps each row's own key among its neighbours (folder
    ``..._self/``).  At distance 0 it outweighs the rest, so the target is
    nearly the stored next token itself: a decoder trained on it learns the
    stored text (it recites), where the paper's targets (``False``, the
    default; ``--ignore_first True`` in LUMIA-Group/MemoryDecoder) teach what
    *similar* contexts continue with.  Notebook 03 and ``bench_recite.py``
    compare the two.
    """
    k = check_int("k", k, 1, example=256)
    temperature = check_float("temperature", temperature, example=500.0)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}. Pass e.g. "
                         "temperature=500.0.")
    batch_size = check_int("batch_size", batch_size, 1, example=4096)
    keep_self = check_keep_self(keep_self)
    folder, meta = targets_folder_and_meta(store, index, k, temperature, keep_self)
    if (folder / "targets.json").is_file():
        try:
            if read_json(folder / "targets.json", "computing the targets again.") == meta:
                return _open_targets(folder, meta, "computing the targets again.")
        except CorruptFile as err:
            warnings.warn(str(err), stacklevel=2)
    if index.ntotal != len(store):
        raise ValueError(f"the index holds {index.ntotal} keys but the store {len(store)}; "
                         "rebuild it with load_or_build_index(store).")
    from .large import knn_targets_chunked
    # One batch of keys at a time, each read through a map of its own and dropped before the
    # next, the targets appended to their files: the pages the search read do not stay resident
    # in store.keys' map while notebook 03 goes on (456 MiB at the full size).
    return knn_targets_chunked(store, index, k, temperature, batch_size, progress, keep_self)


def window_batch(keys, doc, rows, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``r-W+1 .. r`` of each row's own document: ``x (B, W, D)``, ``pad (B, W)``.

    Rows of a document are contiguous and in position order, so row ``r - j``
    belongs to the window exactly when ``doc[r - j] == doc[r]``.  Slots before
    the document start are zeros with ``pad = True``.
    """
    W = check_int("W", W, 1, example=1)
    rows = np.asarray(rows, dtype=np.int64)                  # (B,)
    src = rows[:, None] - np.arange(W - 1, -1, -1)           # (B, W), last slot = r
    safe = np.clip(src, 0, None)
    doc = np.asarray(doc)
    pad = (src < 0) | (doc[safe] != doc[rows][:, None])      # (B, W)
    x = np.asarray(keys[safe.ravel()], dtype=np.float32).reshape(len(rows), W, -1)
    x[pad] = 0.0
    return torch.from_numpy(x), torch.from_numpy(pad)


def memdec_loss(logits_head, target_ids, target_probs, next_token,
                decoder: MemoryDecoder, beta: float = 0.5):
    """``(loss, kl, ce)``: ``beta * KL(p_kNN || p_dec) + (1 - beta) * CE``.

    ``target_ids (B, k)`` are base token ids (-1 = unused slot) with
    ``target_probs (B, k)``; KL sums ``p (log p - log q)`` over slots with
    ``p > 0``, nothing renormalised.  Both terms are batch means.
    """
    beta = check_float("beta", beta, example=0.5)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be between 0 and 1; got {beta}.")
    logq = torch.log_softmax(logits_head.float(), dim=-1)               # (B, Vh)
    device = logq.device
    p = torch.as_tensor(target_probs, device=device).float()            # (B, k)
    col = decoder.head_index(target_ids).to(device)                     # (B, k)
    nxt = decoder.head_index(next_token).to(device)                     # (B,)
    used = p > 0
    if (used & (col < 0)).any() or (nxt < 0).any():
        raise ValueError("some target tokens are not in the decoder's head vocabulary; "
                         "build its config from this datastore with "
                         "DecoderConfig.from_store(store, vocab_size).")
    logq_t = logq.gather(1, col.clamp(min=0))                           # (B, k)
    logp = torch.log(torch.where(used, p, 1.0))
    kl = torch.where(used, p * (logp - logq_t), 0.0).sum(1).mean()
    ce = F.nll_loss(logq, nxt)
    return beta * kl + (1.0 - beta) * ce, kl, ce


def _lr_lambda(total: int, warmup: int):
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    return factor


def optimizer_and_schedule(params, lr: float, weight_decay: float, warmup_frac: float,
                           total: int):
    """AdamW (no weight decay on biases and norms) and its warm-up + cosine schedule
    over ``total`` steps: the decoder's optimiser, on one process or several."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    try:  # the fused kernel updates all ~80 tensors in one pass (CPU: ~20 -> ~9 ms a step)
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # this torch has no fused AdamW for the device
        optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))


def _snapshot(decoder) -> dict:
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}


def check_training_args(*, epochs, batch_size, seed, lr, beta, weight_decay, warmup_frac,
                        max_steps=None, eval_fn=None, example_epochs: int = 10,
                        example_batch: int = 256) -> tuple:
    """The argument checks every decoder training loop shares (one process, data
    parallel, token-level); returns ``(epochs, batch_size, seed, lr, beta,
    weight_decay, warmup_frac, max_steps)`` checked and normalised."""
    epochs = check_int("epochs", epochs, 1, example=example_epochs)
    batch_size = check_int("batch_size", batch_size, 1, example=example_batch)
    seed = check_int("seed", seed, 0, example=0)
    lr = check_float("lr", lr, example=1e-3)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}. Pass e.g. lr=1e-3.")
    beta = check_float("beta", beta, 0.0, 1.0, example=0.5)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, example=0.01)
    warmup_frac = check_float("warmup_frac", warmup_frac, 0.0, 1.0, example=0.05)
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, 1, example=100)
    if eval_fn is not None and not callable(eval_fn):
        raise ArgumentTypeError(f"eval_fn must be a function of the decoder returning a "
                                f"number (lower is better); got {eval_fn!r}.")
    return epochs, batch_size, seed, lr, beta, weight_decay, warmup_frac, max_steps


def optimizer_step(loss, kl, ce, params, optimizer, scheduler, history: dict) -> None:
    """One update from ``loss``: gradients clipped to norm 1, the schedule advanced, and
    ``loss``/``kl``/``ce`` (and the learning rate, where ``history`` has ``"lr"``) recorded."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    if "lr" in history:
        history["lr"].append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    for name, term in (("loss", loss), ("kl", kl), ("ce", ce)):
        history[name].append(term.item())


def evaluate_epoch(decoder, eval_fn, history: dict):
    """After an epoch: ``decoder`` to eval mode and, with an ``eval_fn``, its score
    (lower is better) recorded in ``history["eval"]`` and returned; else ``None``."""
    decoder.eval()
    if eval_fn is None:
        return None
    with torch.no_grad():
        value = float(eval_fn(decoder))
    history["eval"].append(value)
    return value


def train_decoder(decoder: MemoryDecoder, store, targets: KnnTargets, *, epochs: int = 10,
                  lr: float = 1e-3, batch_size: int = 256, beta: float = 0.5,
                  weight_decay: float = 0.01, warmup_frac: float = 0.05, eval_fn=None,
                  patience: int = 3, seed: int = 0, checkpoint_dir=None,
                  progress: bool = True, max_steps: int | None = None,
                  autocast: torch.dtype | None = None) -> dict:
    """Train on every store row; return the history and keep the best weights.

    ``eval_fn(decoder) -> float`` (lower is better, e.g. held-out perplexity)
    runs after each epoch; training stops early after ``patience`` epochs
    without improvement.  Without it the latest epoch counts as the best.  A
    NaN/inf loss stops training (``history["stopped"]`` says why) and the
    best weights so far are restored.  The same ``seed`` gives the same history.
    ``autocast=torch.bfloat16`` runs the forward's matmuls in bf16 (weights,
    optimizer and loss stay float32): faster only where the hardware has native
    bf16 (``helpers.cpu.autocast_dtype`` says where), slower elsewhere.
    """
    from tqdm.auto import tqdm
    epochs, batch_size, seed, lr, beta, weight_decay, warmup_frac, max_steps = \
        check_training_args(epochs=epochs, batch_size=batch_size, seed=seed, lr=lr, beta=beta,
                            weight_decay=weight_decay, warmup_frac=warmup_frac,
                            max_steps=max_steps, eval_fn=eval_fn)
    patience = check_int("patience", patience, 1, example=3)
    n, W = len(store), decoder.config.window
    if len(targets) != n or decoder.config.key_dim != store.dim:
        raise ValueError(f"store ({n} rows of dim {store.dim}), targets ({len(targets)} "
                         f"rows) and decoder (key_dim {decoder.config.key_dim}) do not "
                         "fit; recompute targets with precompute_knn_targets(store, index) "
                         "and build the decoder with DecoderConfig.from_store(store, ...).")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"epochs, batch_size and patience must be >= 1; got {epochs}, "
                         f"{batch_size}, {patience}.")
    device = next(decoder.parameters()).device
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast={autocast!r}: pass None (float32), torch.bfloat16 or, on a "
                         "GPU, torch.float16; helpers.cpu.autocast_dtype(device) picks one.")
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps,
                                                                    epochs * steps_per_epoch)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, lr, weight_decay, warmup_frac, total)
    history = {"loss": [], "kl": [], "ce": [], "lr": [], "eval": [], "best_epoch": None,
               "best_eval": None, "steps_per_epoch": steps_per_epoch, "stopped": None}
    best_state, best, waited, step = _snapshot(decoder), math.inf, 0, 0
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress)
    devices = ([torch.cuda.current_device() if device.index is None else device.index]
               if device.type == "cuda" else [])
    with torch.random.fork_rng(devices=devices):  # seeded dropout; caller's RNG untouched
        torch.manual_seed(seed)
        for epoch in range(epochs):
            decoder.train()
            order = torch.randperm(n, generator=generator).numpy()
            for i in range(0, n, batch_size):
                if step >= total:
                    break
                rows = np.sort(order[i:i + batch_size])  # sorted: faster memmap reads
                x, pad = window_batch(store.keys, store.doc, rows, W)
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                    enabled=autocast is not None):
                    logits = decoder(x.to(device), pad.to(device))
                loss, kl, ce = memdec_loss(logits, targets.ids[rows], targets.probs[rows],
                                           store.values[rows], decoder, beta)
                if not torch.isfinite(loss):
                    history["stopped"] = (f"loss became {loss.item()} at step {step} (epoch "
                                          f"{epoch + 1}); restored the best weights so far. "
                                          "Lower DECODER_LR or check the keys for NaN/inf.")
                    warnings.warn(history["stopped"], stacklevel=2)
                    break
                optimizer_step(loss, kl, ce, params, optimizer, scheduler, history)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if history["stopped"]:
                break
            value = evaluate_epoch(decoder, eval_fn, history)
            if eval_fn is None or value < best:  # without eval_fn the latest is best
                best, waited, best_state = value, 0, _snapshot(decoder)
                history["best_epoch"], history["best_eval"] = epoch + 1, value
                if checkpoint_dir is not None:
                    save_decoder(decoder, checkpoint_dir)
            else:
                waited += 1
                if waited >= patience:
                    history["stopped"] = (f"early stop after epoch {epoch + 1}: no "
                                          f"improvement for {patience} epochs.")
                    break
            if step >= total:
                break
    bar.close()
    decoder.load_state_dict(best_state)
    decoder.eval()
    return history


@torch.inference_mode()
def decoder_target_probs(decoder: MemoryDecoder, keys, doc, values, W: int | None = None,
                         batch_size: int = 1024, rows=None) -> np.ndarray:
    """``p_dec(true next token)`` float32 for each of ``rows`` (default: every row).

    ``keys``/``doc``/``values`` as in ``helpers.hidden.Extraction`` (rows in
    document and position order; each window reads the rows before it, so
    pass the full arrays and select with ``rows``).  Tokens the head lacks
    get ``exp(-30)``.
    """
    W = decoder.config.window if W is None else check_int("W", W, 1, example=1)
    batch_size = check_int("batch_size", batch_size, 1, example=1024)
    if W != decoder.config.window:
        raise ValueError(f"W={W} but the decoder reads windows of "
                         f"{decoder.config.window}; pass W=decoder.config.window.")
    device = next(decoder.parameters()).device
    was_training = decoder.training
    decoder.eval()
    wanted = np.arange(len(values)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.empty(len(wanted), np.float32)
    for i in range(0, len(wanted), batch_size):
        batch = wanted[i:i + batch_size]
        x, pad = window_batch(keys, doc, batch, W)
        target = torch.as_tensor(np.asarray(values)[batch], dtype=torch.long)
        logp = decoder.log_prob_of(x.to(device), target, pad.to(device))
        out[i:i + len(batch)] = logp.exp().cpu().numpy()
    decoder.train(was_training)
    return out
