"""The kNN-LM datastore on disk: keys, values and a manifest of how they were made.

Explained in ``notebooks/02_datastore_knn_lm.ipynb``.

A datastore folder holds one row per target token of a corpus::

    keys.npy      (N, D) float32 or float16  hidden state that predicts the token
    values.npy    (N,)   int64               the token that followed
    doc.npy       (N,)   int32               which text the row came from
    pos.npy       (N,)   int32               position of the key in that text
    manifest.json        what built it: model, layer, tokenizer, corpus, counts
    index.faiss          optional FAISS index over the keys (helpers.index)

The arrays are opened memory-mapped, so a store larger than RAM still works.
Building is resumable: every ``shard_docs`` texts are saved in
``<path>.partial/`` as soon as they are extracted, and the finished folder is
renamed into place in one step, so a reader never sees a half-written store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from .hidden import extract_keys
from .model import tokenizer_fingerprint
from .paths import (CorruptFile, atomic_dir, atomic_file, load_array, load_npz, make_dir,
                    read_json, refuse_foreign)
from .validate import ArgumentTypeError, check_int, check_str

FORMAT_VERSION = 1
ARRAYS = ("keys", "values", "doc", "pos")
NOTEBOOK = "notebooks/02_datastore_knn_lm.ipynb"
# what a store folder may hold: a rebuild replaces these and refuses anything else
STORE_FILES = ("keys.npy", "values.npy", "doc.npy", "pos.npy", "manifest.json",
               "index*.faiss", "index*.json", ".index*", "targets_k*", ".targets_k*")
MANIFEST_KEYS = ("count", "dim", "key_dtype", "model_name", "layer",
                 "tokenizer_fingerprint", "corpus_fingerprint")


class DatastoreMismatch(ValueError):
    """The datastore was built by a different model, layer or tokenizer."""


def corpus_fingerprint(texts: list[str]) -> str:
    """First 16 hex digits of a sha256 over the texts (order matters)."""
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text #{i} is empty. Drop empty records before "
                             "building a datastore (load_corpus already does).")
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


class Datastore:
    """A built datastore: memory-mapped ``keys``, ``values``, ``doc``, ``pos``."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.path, self.manifest = Path(path), manifest
        self.keys = arrays["keys"]      # (N, D) float32 / float16
        self.values = arrays["values"]  # (N,) int64
        self.doc = arrays["doc"]        # (N,) int32
        self.pos = arrays["pos"]        # (N,) int32

    @classmethod
    def open(cls, path) -> "Datastore":
        """Open a finished store; a missing or damaged one gets advice instead of a trace."""
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"no datastore at {path}; build it with "
                                    "build_datastore(model, tokenizer, texts, path, ...) "
                                    f"({NOTEBOOK}).")
        advice = (f"delete the folder {path} and build it again (build_datastore, "
                  f"{NOTEBOOK}).")
        manifest = read_json(path / "manifest.json", advice, ("count", "dim", "key_dtype"))
        arrays = {name: load_array(path / f"{name}.npy", advice) for name in ARRAYS}
        n, d = manifest["count"], manifest["dim"]
        if (arrays["keys"].shape != (n, d) or str(arrays["keys"].dtype) != manifest["key_dtype"]
                or any(arrays[a].shape != (n,) for a in ARRAYS[1:])):
            raise CorruptFile(f"the arrays in {path} do not match its manifest ({n} rows "
                              f"of dim {d}); {advice}")
        return cls(path, manifest, arrays)

    @property
    def fingerprint(self) -> str:
        """16 hex digits over the manifest, every value and a sample of the keys.

        Two stores of the same size from other texts, models or layers differ;
        an index records it (``helpers.index``) and is refused for another store.
        """
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256()
            ident = {k: self.manifest.get(k) for k in MANIFEST_KEYS}
            digest.update(json.dumps(ident, sort_keys=True).encode())
            digest.update(np.ascontiguousarray(self.values).tobytes())
            rows = np.unique(np.linspace(0, len(self) - 1, min(len(self), 1024)).astype(int))
            digest.update(np.ascontiguousarray(self.keys[rows]).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Datastore({len(self):,} keys x {self.dim} {m.get('key_dtype')}, "
                f"{m.get('model_name')} layer {m.get('layer')}, {self.path})")

    def check_compatible(self, model_name: str, layer: int, dim: int, tokenizer) -> None:
        """Raise ``DatastoreMismatch`` unless the store fits this model setup."""
        given = {"model_name": model_name, "layer": layer, "dim": dim,
                 "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
        diffs = [f"{k} is {self.manifest[k]!r} in the datastore but {v!r} here"
                 for k, v in given.items() if self.manifest[k] != v]
        if diffs:
            raise DatastoreMismatch(
                f"datastore {self.path} does not fit: " + "; ".join(diffs) +
                ". Rebuild it with build_datastore(...) for this model, or load the "
                "matching model.")


def _store_config(model, tokenizer, texts, *, model_name, corpus_name, split,
                  layer, window, overlap, key_dtype) -> dict:
    """Everything the manifest records that is known before extraction."""
    if key_dtype not in ("float32", "float16"):
        raise ValueError(f"key_dtype must be 'float32' or 'float16', not {key_dtype!r}.")
    return {"format_version": FORMAT_VERSION, "model_name": model_name, "layer": layer,
            "dim": model.config.get_text_config().hidden_size, "key_dtype": key_dtype,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "corpus_fingerprint": corpus_fingerprint(texts),
            "corpus_name": corpus_name, "split": split, "window": window,
            "overlap": overlap, "num_docs": len(texts)}


def _same_config(manifest: dict, config: dict) -> bool:
    return all(manifest.get(k) == v for k, v in config.items())


def _refuse_non_finite(keys: np.ndarray, doc: np.ndarray, first: int, advice: str) -> None:
    bad = ~np.isfinite(keys).all(axis=1)  # (N,)
    if bad.any():
        raise ValueError(f"NaN/inf keys for text #{first + int(doc[bad][0])} "
                         f"({int(bad.sum())} rows in this shard): {advice}.")


def _extract_shard(model, tokenizer, texts, first: int, key_dtype: str, **kw) -> dict:
    """Keys etc. for ``texts`` (global indices from ``first``), checked for NaN/inf."""
    ex = extract_keys(model, tokenizer, texts, **kw)
    _refuse_non_finite(ex.keys, ex.doc, first, "check the model weights and dtype")
    with np.errstate(over="ignore"):
        keys = ex.keys.astype(key_dtype)  # (N, D)
    _refuse_non_finite(keys, ex.doc, first, "they overflow float16; use key_dtype='float32'")
    return {"keys": keys, "values": ex.values, "doc": ex.doc + np.int32(first),
            "pos": ex.pos, "seconds": np.float64(ex.seconds),
            "tokens_processed": np.int64(ex.tokens_processed)}


def _save_shard(shard: dict, target: Path) -> None:
    """One ``.npz`` per shard, renamed into place: present means complete."""
    with atomic_file(target) as tmp, open(tmp, "wb") as f:
        np.savez(f, **shard)


def build_datastore(model, tokenizer, texts, path, *, model_name: str, corpus_name: str,
                    split: str = "train", layer: int = -1, window: int = 256,
                    overlap: int = 64, batch_size: int = 8, key_dtype: str = "float32",
                    shard_docs: int = 32, progress: bool = False) -> Datastore:
    """Extract a key for every target token of ``texts`` and save the store.

    Opens ``path`` instead if it already holds a store with the same config;
    resumes from ``<path>.partial/`` if an earlier build was interrupted.
    """
    if isinstance(texts, (str, bytes)):
        raise ArgumentTypeError("texts must be a list of strings (one per document), not "
                                "a single string; wrap it: [text].")
    texts, path = list(texts), Path(path)
    if not texts:
        raise ValueError("texts is empty: a datastore needs at least one text.")
    check_str("model_name", model_name, "gemma-3-270m")
    check_str("corpus_name", corpus_name, "eu-law")
    layer = check_int("layer", layer, example=-1)
    window = check_int("window", window, 2, example=256)
    overlap = check_int("overlap", overlap, 0, example=64)
    batch_size = check_int("batch_size", batch_size, 1, example=8)
    shard_docs = check_int("shard_docs", shard_docs, 1, example=32)
    config = _store_config(model, tokenizer, texts, model_name=model_name,
                           corpus_name=corpus_name, split=split, layer=layer,
                           window=window, overlap=overlap, key_dtype=key_dtype)
    if (path / "manifest.json").is_file():
        try:
            store = Datastore.open(path)
            if _same_config(store.manifest, config):
                return store
        except CorruptFile as err:
            warnings.warn(f"{err} Rebuilding it now.", stacklevel=2)
    refuse_foreign(path, STORE_FILES, "a datastore")  # before the work: nothing is deleted
    partial = path.with_name(path.name + ".partial")
    partial_config = {**config, "shard_docs": shard_docs}
    config_file = partial / "config.json"
    if partial.exists():
        try:
            same = read_json(config_file, "starting the build over.") == partial_config
        except (CorruptFile, FileNotFoundError):
            same = False
        if not same:  # built with other settings: start over
            refuse_foreign(partial, ("config.json", "shard_*.npz", ".shard_*", ".config.json*"),
                           "a datastore build's")
            shutil.rmtree(partial)
    make_dir(partial)
    with atomic_file(config_file) as tmp:
        tmp.write_text(json.dumps(partial_config, indent=2))

    starts = range(0, len(texts), shard_docs)
    shard_files = [partial / f"shard_{i // shard_docs:05d}.npz" for i in starts]
    todo = [(i, f) for i, f in zip(starts, shard_files) if not _shard_ok(f)]
    if progress:
        from tqdm.auto import tqdm
        todo = tqdm(todo, desc="datastore", unit="shard")
    for first, file in todo:
        shard = _extract_shard(model, tokenizer, texts[first:first + shard_docs], first,
                               key_dtype, layer=layer, window=window, overlap=overlap,
                               batch_size=batch_size)
        _save_shard(shard, file)

    with atomic_dir(path, STORE_FILES, "a datastore") as tmp:  # the old store or the new
        manifest = _concatenate(shard_files, tmp, config)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(partial)
    return Datastore.open(path)


SHARD_ARRAYS = (*ARRAYS, "seconds", "tokens_processed")


def _shard_ok(file: Path) -> bool:
    """True if ``file`` is a complete shard; a damaged one is deleted (and rebuilt)."""
    if not file.exists():
        return False
    try:
        load_npz(file, "extracting that shard again.", SHARD_ARRAYS)
        return True
    except CorruptFile as err:
        warnings.warn(str(err), stacklevel=3)
        file.unlink()
        return False


def _concatenate(shard_files: list[Path], folder: Path, config: dict) -> dict:
    """Copy the shards, one at a time, into memory-mapped ``.npy`` files."""
    counts = []
    for file in shard_files:
        with np.load(file) as z:
            counts.append(len(z["values"]))
    n, seconds, processed, row = sum(counts), 0.0, 0, 0
    layout = {"keys": ((n, config["dim"]), config["key_dtype"]),
              "values": ((n,), np.int64), "doc": ((n,), np.int32), "pos": ((n,), np.int32)}
    out = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+",
                                           shape=shape, dtype=dtype)
           for name, (shape, dtype) in layout.items()}
    for file, count in zip(shard_files, counts):
        with np.load(file) as z:
            for name in ARRAYS:
                out[name][row:row + count] = z[name]
            seconds += float(z["seconds"])
            processed += int(z["tokens_processed"])
        row += count
    for array in out.values():
        array.flush()
    return {**config, "count": n, "extraction_seconds": round(seconds, 3),
            "tokens_processed": processed}


def default_store_path(model_name: str, corpus_name: str, layer: int = -1,
                       key_dtype: str = "float32", tag: str = "") -> Path:
    """``data/cache/datastores/<model>-<corpus>-L<layer>-<dtype>[-tag]``."""
    from .paths import cache_dir

    def slug(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-." else "_" for c in str(text)).strip("_")

    name = f"{slug(model_name)}-{slug(Path(corpus_name).stem)}-L{layer}-{key_dtype}"
    return cache_dir("datastores") / (f"{name}-{slug(tag)}" if tag else name)
