"""Past one machine: a datastore extracted in shards by N processes, merged by one.

Used by ``scripts/build_datastore.py`` (the README's "Scaling out"); the
notebooks keep calling :func:`helpers.datastore.build_datastore` in one process.

The documents are cut into blocks of ``shard_docs`` (the same blocks a
one-process build extracts one at a time) and rank ``r`` of ``N`` takes a
contiguous run of blocks.  Each rank builds its part with ``build_datastore``
itself, into ``<store>.shards/part-0000r-of-0000N/``: a store with its own
manifest (model, tokenizer fingerprint, layer, dtype, the fingerprint of its
texts), plus ``part-....json`` naming its document range, written once the
part is complete.  So a finished part is skipped on a rerun and a
half-written one resumes from its last saved block.  Rank 0 checks every part
against the settings of the launch and copies them, in document order, into
one store: the same rows in the same order as a one-process build.

``<store>.lock`` keeps a second launch off a store that is being written; a
lock left behind by a killed launch on this host is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .datastore import (ARRAYS, STORE_FILES, Datastore, DatastoreMismatch, _same_config,
                        _store_config, build_datastore)
from .paths import CorruptFile, atomic_dir, atomic_file, read_json
from .validate import check_int

SCRIPT = "scripts/build_datastore.py"
# what a part's manifest must share with the launch that merges it
PART_KEYS = ("model_name", "tokenizer_fingerprint", "layer", "dim", "key_dtype", "window",
             "overlap", "corpus_fingerprint", "num_docs")


class StoreLocked(RuntimeError):
    """Another launch is writing this store."""


class ShardMissing(FileNotFoundError):
    """A part of a sharded build is absent or unfinished when merging."""


def doc_range(n_docs: int, shard_docs: int, rank: int, world: int) -> tuple[int, int]:
    """Documents ``[lo, hi)`` of ``rank``: a contiguous run of whole blocks of ``shard_docs``."""
    blocks = -(-n_docs // shard_docs)
    first, last = rank * blocks // world, (rank + 1) * blocks // world
    return min(first * shard_docs, n_docs), min(last * shard_docs, n_docs)


def shards_dir(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".shards")


def part_path(path, rank: int, world: int) -> Path:
    return shards_dir(path) / f"part-{rank:05d}-of-{world:05d}"


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path) -> Path:
    """Create ``<path>.lock`` (exclusively) or raise ``StoreLocked`` saying who holds it.

    A lock whose process is gone (same host, dead pid: a killed launch) is taken over.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                held, pid, host = {}, -1, "?"
            if host == me["host"] and pid > 0 and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # its launch was killed: take it over
                continue
            raise StoreLocked(
                f"{path} is being written by another launch (lock {lock}: pid {pid} on host "
                f"{host}, since {held.get('started', '?')}). Wait for it to finish, or write "
                f"elsewhere (--out). If no such launch is running any more, delete {lock} "
                "and run again: finished shards are kept.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise StoreLocked(f"could not take the lock {lock}; delete it and run again.")


def release_lock(path) -> None:
    """Remove ``<path>.lock`` if this process holds it."""
    lock = lock_path(path)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def store_lock(path):
    """``acquire_lock`` ... ``release_lock``, also on errors."""
    acquire_lock(path)
    try:
        yield
    finally:
        release_lock(path)


def _config(model, tokenizer, texts, settings: dict) -> dict:
    """``build_datastore``'s manifest config for these settings (its defaults filled in)."""
    kw = {"split": "train", "layer": -1, "window": 256, "overlap": 64, "key_dtype": "float32",
          **{k: v for k, v in settings.items() if k != "batch_size"}}
    return _store_config(model, tokenizer, texts, **kw)


def build_part(model, tokenizer, texts, path, rank: int, world: int, *, shard_docs: int = 32,
               progress: bool = False, **settings) -> Datastore:
    """Rank ``rank`` of ``world``: extract its documents into its part (resumable)."""
    texts = list(texts)
    lo, hi = doc_range(len(texts), shard_docs, rank, world)
    part = part_path(path, rank, world)
    info = {"rank": rank, "world": world, "first_doc": lo, "end_doc": hi,
            "num_docs_total": len(texts), "shard_docs": shard_docs}
    sidecar = part.with_suffix(".json")
    if lo == hi:  # more ranks than blocks: nothing to do
        store = None
    else:
        store = build_datastore(model, tokenizer, texts[lo:hi], part, shard_docs=shard_docs,
                                progress=progress, **settings)
    with atomic_file(sidecar) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return store


def merge_parts(model, tokenizer, texts, path, world: int, *, shard_docs: int = 32,
                keep_parts: bool = False, chunk_rows: int = 65_536, **settings) -> Datastore:
    """Check every part against these settings and write them, in order, as one store.

    ``settings`` are ``build_datastore``'s (model_name, corpus_name, split,
    layer, window, overlap, key_dtype); the parts must have been built with
    the same ones.  The result's manifest is a one-process build's, so
    ``build_datastore`` with these settings opens it instead of rebuilding.
    """
    texts, path = list(texts), Path(path)
    config = _config(model, tokenizer, texts, settings)
    def rerun(rank: int) -> str:
        return (f"run the same launch again ({SCRIPT}; finished parts are skipped), or build "
                f"just that part in one process: python {SCRIPT} <the same arguments> --rank "
                f"{rank} --world-size {world}")

    parts = []
    for rank in range(world):
        lo, hi = doc_range(len(texts), shard_docs, rank, world)
        part = part_path(path, rank, world)
        sidecar = part.with_suffix(".json")
        if not sidecar.is_file():
            raise ShardMissing(f"part {rank} of {world} (documents {lo}..{hi - 1}) is missing "
                               f"or unfinished: no {sidecar}. To make it, {rerun(rank)}.")
        info = read_json(sidecar, f"delete it and {rerun(rank)}.")
        want = {"first_doc": lo, "end_doc": hi, "num_docs_total": len(texts)}
        if any(info.get(k) != v for k, v in want.items()):
            raise DatastoreMismatch(
                f"part {rank} of {world} at {part} covers documents {info.get('first_doc')}.."
                f"{info.get('end_doc')} of {info.get('num_docs_total')}, not {lo}..{hi} of "
                f"{len(texts)}: it was built from other texts or another --shard-docs. Delete "
                f"{shards_dir(path)} and run the launch again with the same texts.")
        if lo == hi:
            continue
        try:
            store = Datastore.open(part)
        except (FileNotFoundError, CorruptFile) as err:
            raise ShardMissing(f"part {rank} of {world} at {part} cannot be opened ({err}). "
                               f"Delete {part} and {sidecar}, then "
                               f"{rerun(rank)}.") from None
        expect = _config(model, tokenizer, texts[lo:hi], settings)
        diffs = [f"{k} is {store.manifest.get(k)!r} there but {expect[k]!r} here"
                 for k in PART_KEYS if store.manifest.get(k) != expect[k]]
        if diffs:
            raise DatastoreMismatch(
                f"part {rank} of {world} at {part} was built with other settings: "
                + "; ".join(diffs) + f". Delete {part} and {sidecar} and run the launch "
                "again with the settings you want (every part must use the same model, "
                "tokenizer, layer and key dtype).")
        parts.append((lo, store))
    n = sum(len(s) for _, s in parts)
    seconds = sum(float(s.manifest.get("extraction_seconds", 0)) for _, s in parts)
    processed = sum(int(s.manifest.get("tokens_processed", 0)) for _, s in parts)
    with atomic_dir(path, STORE_FILES, "a datastore") as tmp:
        layout = {"keys": ((n, config["dim"]), np.dtype(config["key_dtype"])),
                  "values": ((n,), np.dtype(np.int64)), "doc": ((n,), np.dtype(np.int32)),
                  "pos": ((n,), np.dtype(np.int32))}
        for name in ARRAYS:
            shape, dtype = layout[name]
            with open(tmp / f"{name}.npy", "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                        "shape": shape})
                for lo, store in parts:
                    for i in range(0, len(store), chunk_rows):
                        # a fresh map per chunk: pages read are dropped with it (bounded RSS)
                        src = np.load(store.path / f"{name}.npy", mmap_mode="r")
                        block = np.asarray(src[i:i + chunk_rows], dtype=dtype)
                        del src
                        if name == "doc":
                            block = block + np.int32(lo)
                        f.write(np.ascontiguousarray(block).tobytes())
        manifest = {**config, "count": n, "extraction_seconds": round(seconds, 3),
                    "tokens_processed": processed, "built_in_parts": world}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if not keep_parts:
        shutil.rmtree(shards_dir(path), ignore_errors=True)
    return Datastore.open(path)


def build_datastore_sharded(model, tokenizer, texts, path, *, rank: int = 0, world: int = 1,
                            state=None, shard_docs: int = 32, progress: bool = False,
                            keep_parts: bool = False, **settings) -> Datastore:
    """The sharded build as one call, for every process of a launch.

    ``state``: an ``accelerate.PartialState`` (its rank, size and barriers), or
    None for one process building part ``rank`` of ``world`` on its own
    (``world`` > 1 then stops after the part; the last rank to finish merges
    by running again with ``--merge-only``).  Rank 0 holds ``<path>.lock``
    from start to merge.
    """
    from .validate import ArgumentTypeError

    if isinstance(texts, (str, bytes)):
        raise ArgumentTypeError("texts must be a list of strings (one per document).")
    texts, path = list(texts), Path(path)
    if state is not None:
        rank, world = state.process_index, state.num_processes
    rank = check_int("rank", rank, 0, example=0)
    world = check_int("world", world, 1, example=2)
    shard_docs = check_int("shard_docs", shard_docs, 1, example=32)
    if rank >= world:
        raise ValueError(f"rank {rank} does not exist in a launch of {world} processes; "
                         f"pass --rank 0..{world - 1}.")
    if not texts:
        raise ValueError("texts is empty: a datastore needs at least one text.")

    def done() -> bool:
        try:
            store = Datastore.open(path)
        except (FileNotFoundError, CorruptFile):
            return False
        return _same_config(store.manifest, _config(model, tokenizer, texts, settings))

    verdict = [None]
    if rank == 0:
        try:
            if done():
                verdict[0] = "done"
            else:
                acquire_lock(path)
                verdict[0] = "go"
        except StoreLocked as err:
            verdict[0] = str(err)
    if state is not None and world > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(verdict, from_process=0)
    elif rank != 0:  # a lone process building one part: the launch's rank 0 holds the lock
        verdict[0] = "go"
    if verdict[0] == "done":
        return Datastore.open(path)
    if verdict[0] != "go":
        raise StoreLocked(verdict[0])
    try:
        build_part(model, tokenizer, texts, path, rank, world, shard_docs=shard_docs,
                   progress=progress and rank == 0, **settings)
        if state is not None:
            state.wait_for_everyone()
        elif world > 1:
            return None
        if rank == 0:
            merge_parts(model, tokenizer, texts, path, world, shard_docs=shard_docs,
                        keep_parts=keep_parts, **settings)
    finally:
        if rank == 0:
            release_lock(path)
    if state is not None:
        state.wait_for_everyone()
    return Datastore.open(path)


def train_decoder_data_parallel(decoder, store, targets, accelerator=None, *, epochs: int = 10,
                                lr: float = 1e-3, batch_size: int = 256, beta: float = 0.5,
                                weight_decay: float = 0.01, warmup_frac: float = 0.05,
                                seed: int = 0, max_steps: int | None = None,
                                progress: bool = True) -> dict:
    """``train_decoder``'s loop, data parallel over an ``accelerate.Accelerator``'s processes.

    ``batch_size`` is the *global* batch: every process draws the same seeded
    order (as ``train_decoder`` does), takes its slice of each batch, and the
    gradients are averaged with each slice weighted by its share of the batch,
    so a step is the one-process step on the whole batch.  With ``dropout=0``
    the weights equal a one-process run's up to float rounding (the test
    checks it); with dropout each process draws its own masks, equal only in
    distribution.  No ``eval_fn``/early stopping: evaluate the saved decoder
    afterwards.  Returns the history (losses are means over the global batch).
    """
    import math

    import torch

    from .train_decoder import (check_training_args, memdec_loss, optimizer_and_schedule,
                                window_batch)

    if accelerator is None:
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    epochs, batch_size, seed, lr, beta, weight_decay, warmup_frac, max_steps = \
        check_training_args(epochs=epochs, batch_size=batch_size, seed=seed, lr=lr, beta=beta,
                            weight_decay=weight_decay, warmup_frac=warmup_frac,
                            max_steps=max_steps)
    n, W = len(store), decoder.config.window
    if len(targets) != n or decoder.config.key_dim != store.dim:
        raise ValueError(f"store ({n} rows of dim {store.dim}), targets ({len(targets)} rows) "
                         f"and decoder (key_dim {decoder.config.key_dim}) do not fit; "
                         "recompute the targets and build the decoder from this store.")
    rank, world = accelerator.process_index, accelerator.num_processes
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps,
                                                                    epochs * steps_per_epoch)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, lr, weight_decay, warmup_frac, total)
    # DDP starts every process from rank 0's weights; the scheduler is left out of
    # prepare(), which would step it once per process
    model, optimizer = accelerator.prepare(decoder, optimizer)
    inner = accelerator.unwrap_model(model)
    device = accelerator.device
    history = {"loss": [], "kl": [], "ce": [], "lr": [], "steps_per_epoch": steps_per_epoch,
               "processes": world, "global_batch": batch_size, "stopped": None}
    generator = torch.Generator().manual_seed(seed)
    step = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="training", unit="step",
               disable=not (progress and accelerator.is_main_process))
    torch.manual_seed(seed + rank)  # dropout masks: one stream per process
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator).numpy()
        for i in range(0, n, batch_size):
            if step >= total:
                break
            rows = np.sort(order[i:i + batch_size])
            mine = np.array_split(rows, world)[rank]
            share = len(mine) * world / len(rows)  # DDP averages: weight by share of the batch
            if len(mine):
                x, pad = window_batch(store.keys, store.doc, mine, W)
                logits = model(x.to(device), pad.to(device))
                loss, kl, ce = memdec_loss(logits, targets.ids[mine], targets.probs[mine],
                                           store.values[mine], inner, beta)
            else:  # more processes than rows: take part in the gradient average with zeros
                loss = kl = ce = sum(p.sum() for p in model.parameters()) * 0.0
            terms = torch.stack([loss.detach(), kl.detach(), ce.detach()]).float()
            terms = accelerator.reduce(terms * len(mine), "sum") / len(rows)  # global means
            if not torch.isfinite(terms[0]):
                history["stopped"] = (f"loss became {terms[0].item()} at step {step}; lower "
                                      "the learning rate or check the keys for NaN/inf.")
                break
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss * share)
            accelerator.clip_grad_norm_(params, 1.0)
            history["lr"].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            step += 1
            for name, term in zip(("loss", "kl", "ce"), terms.tolist()):
                history[name].append(term)
            bar.update()
        if history["stopped"] or step >= total:
            break
    bar.close()
    inner.eval()
    accelerator.wait_for_everyone()
    return history
