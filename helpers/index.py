"""A FAISS index over a datastore's keys, saved next to it and verified on load.

Explained in ``notebooks/02_datastore_knn_lm.ipynb``.

``Flat`` searches exactly (fine up to a few million keys on a GPU); ``IVFn,PQm``
clusters the keys into ``n`` cells, compresses each to ``m`` bytes and visits
only ``nprobe`` cells per query.  ``index.faiss`` lives in the store folder with
an ``index.json`` holding its sha256, so a truncated file is caught on load.
faiss is imported inside the functions: importing helpers stays cheap.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from .cpu import import_faiss
from .datastore import Datastore
from .paths import CorruptFile, atomic_file, read_json, sha256_file
from .validate import check_int, check_str


class IndexCorrupt(RuntimeError):
    """``index.faiss`` is unreadable or does not belong to its datastore."""


_GPU_RESOURCES = None  # one StandardGpuResources, created on first GPU use


def _to_gpu(index, use_gpu):
    """Move ``index`` to the GPU when faiss sees one (``use_gpu="auto"``).

    With several GPUs the index is split over all of them (``index_cpu_to_all_gpus``
    with ``shard=True``: each holds 1/n of the keys, a search asks every shard and
    merges), so a store too big for one GPU's memory still searches on GPUs.
    """
    faiss = import_faiss()
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not has_gpu:
        raise RuntimeError("use_gpu=True but this faiss has no GPU (faiss-cpu, or no GPU "
                           "here); pass use_gpu='auto' to search on the CPU, or install "
                           "faiss-gpu-cu12 in place of faiss-cpu on a CUDA machine.")
    if use_gpu is False or not has_gpu:
        return index
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        if faiss.get_num_gpus() > 1:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            return faiss.index_cpu_to_all_gpus(index, co=options)
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except RuntimeError as err:  # e.g. HNSW, or a PQ size the GPU code lacks
        if use_gpu is True:
            raise
        warnings.warn(f"faiss cannot put {type(index).__name__} on the GPU ({err}); "
                      "searching on the CPU instead.", stacklevel=3)
        return index


def _gpu_part(index):
    """The first GPU index of ``index`` (itself, or a shard of one split over GPUs), or None."""
    if type(index).__name__ in ("IndexShards", "IndexReplicas"):
        if index.count() == 0:
            return None
        index = import_faiss().downcast_index(index.at(0))
    return index if type(index).__name__.startswith("Gpu") else None


def _on_gpu(index) -> bool:
    return _gpu_part(index) is not None


def set_nprobe(index, nprobe: int) -> None:
    """How many IVF cells a search visits (more: slower, more exact)."""
    faiss = import_faiss()
    if _on_gpu(index):  # GpuParameterSpace also reaches into every shard
        if "IVF" in type(_gpu_part(index)).__name__:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    elif (ivf := faiss.try_extract_index_ivf(index)) is not None:
        ivf.nprobe = nprobe


def _skip_polysemous_training(index) -> None:
    """Switch off PQ's polysemous step: ~10x slower, only Hamming search uses it."""
    faiss = import_faiss()
    for part in (index, faiss.try_extract_index_ivf(index)):
        if part is not None:
            part = faiss.downcast_index(part)
            if hasattr(part, "do_polysemous_training"):
                part.do_polysemous_training = False


def build_index(store: Datastore, factory: str = "Flat", nprobe: int = 16,
                use_gpu="auto", train_size: int = 100_000, seed: int = 0,
                batch_size: int = 65_536):
    """A FAISS L2 index over ``store.keys`` (trained on a seeded sample if needed)."""
    faiss = import_faiss()
    _check_factory(factory, nprobe)
    train_size = check_int("train_size", train_size, 1, example=100_000)
    batch_size = check_int("batch_size", batch_size, 1, example=65_536)
    try:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"faiss does not understand the factory {factory!r} "
                         f"({str(err).splitlines()[0][:200]}); use e.g. 'Flat' (exact) or "
                         "'IVF1024,PQ16' (see the FAISS wiki, 'The index factory').") from None
    _skip_polysemous_training(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(store), min(train_size, len(store)), replace=False))
        try:
            index.train(np.ascontiguousarray(store.keys[rows], dtype=np.float32))
        except RuntimeError as err:
            raise ValueError(f"could not train {factory!r} on {len(rows)} keys ({err}). "
                             "Use fewer IVF cells / PQ bits, or factory='Flat' for a "
                             "small store.") from None
    index = _to_gpu(index, use_gpu)
    for i in range(0, len(store), batch_size):
        index.add(np.ascontiguousarray(store.keys[i:i + batch_size], dtype=np.float32))
    set_nprobe(index, nprobe)
    return index


def _check_factory(factory, nprobe) -> None:
    check_str("factory", factory, "Flat")
    check_int("nprobe", nprobe, 1, example=16)


def index_signature(index) -> dict:
    """What changes an index's answers: its structure and ``nprobe`` (IVF only)."""
    faiss = import_faiss()
    nprobe = getattr(_gpu_part(index) or index, "nprobe", None)  # GPU IVF indexes carry it
    if nprobe is None and not _on_gpu(index):
        ivf = faiss.try_extract_index_ivf(index)
        nprobe = None if ivf is None else ivf.nprobe
    return {"index": describe_index(index), "nprobe": None if nprobe is None
            else int(nprobe), "ntotal": int(index.ntotal)}


def describe_index(index) -> str:
    """Structure of an index, e.g. ``"IndexIVFPQ nlist=4 pq=4x8"``."""
    faiss = import_faiss()
    parts = [type(index).__name__]
    if (ivf := faiss.try_extract_index_ivf(index)) is not None:
        parts.append(f"nlist={ivf.nlist}")
        if (pq := getattr(faiss.downcast_index(ivf), "pq", None)) is not None:
            parts.append(f"pq={pq.M}x{pq.nbits}")
    return " ".join(parts)


def _structure_on_disk(dim: int, factory: str) -> str:
    """What ``describe_index`` says after saving and loading an empty ``factory`` index."""
    faiss = import_faiss()
    empty = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    return describe_index(faiss.deserialize_index(faiss.serialize_index(empty)))


def index_files(store: Datastore, factory: str | None = None) -> tuple[Path, Path]:
    """``(index file, its JSON sidecar)`` in the store folder for ``factory``.

    ``Flat`` (the default) is ``index.faiss``; every other factory has files
    of its own, e.g. ``index-IVF1024_Flat.faiss``, so a fast approximate index
    for generation can sit next to the exact one used for evaluation.
    """
    if factory in (None, "Flat"):
        return store.path / "index.faiss", store.path / "index.json"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")
    return store.path / f"index-{slug}.faiss", store.path / f"index-{slug}.json"


def save_index(index, store: Datastore, factory: str | None = None) -> Path:
    """Write the index (+ a JSON sidecar with its sha256) into the store folder."""
    faiss = import_faiss()
    cpu = faiss.index_gpu_to_cpu(index) if _on_gpu(index) else index
    target, sidecar = index_files(store, factory)
    with atomic_file(target) as tmp:
        faiss.write_index(cpu, str(tmp))
        sha = sha256_file(tmp)
    meta = {"factory": factory, "ntotal": int(cpu.ntotal), "dim": int(cpu.d),
            "sha256": sha, "store_count": len(store), "store_fingerprint": store.fingerprint}
    with atomic_file(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return target


def load_index(store: Datastore, factory: str | None = None, nprobe: int = 16,
               use_gpu="auto"):
    """Read and verify the store's saved ``factory`` index; the store is never touched.

    An index file whose structure is not ``factory`` is refused.
    """
    faiss = import_faiss()
    _check_factory("Flat" if factory is None else factory, nprobe)
    file, meta_file = index_files(store, factory)
    if not (file.is_file() and meta_file.is_file()):
        raise FileNotFoundError(f"no saved {factory or 'Flat'} index in {store.path}; call "
                                f"build_index(store, {factory or 'Flat'!r}) then save_index("
                                f"index, store, {factory or 'Flat'!r}).")
    advice = (f"Delete {file} and call build_index(store) + save_index again "
              "(load_or_build_index does both).")
    try:
        meta = read_json(meta_file, advice, ("sha256",))
    except CorruptFile as err:
        raise IndexCorrupt(str(err)) from None
    if sha256_file(file) != meta["sha256"]:
        raise IndexCorrupt(f"{file} is corrupt or truncated (sha256 differs). {advice}")
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as err:
        raise IndexCorrupt(f"{file} cannot be read ({err}). {advice}") from None
    if index.ntotal != len(store) or index.d != store.dim:
        raise IndexCorrupt(f"{file} holds {index.ntotal} keys of dim {index.d} but the "
                           f"store has {len(store)} of dim {store.dim}. {advice}")
    if meta.get("store_fingerprint") != store.fingerprint:
        raise IndexCorrupt(f"{file} was built from another datastore (store fingerprint "
                           f"{meta.get('store_fingerprint', 'not recorded')!r}, this store "
                           f"{store.fingerprint!r}): its ids would point at the wrong rows. "
                           f"{advice}")
    if factory and describe_index(index) != _structure_on_disk(store.dim, factory):
        raise ValueError(f"the saved index is {describe_index(index)} (factory "
                         f"{meta.get('factory')!r}), not {factory!r}; pass that factory, or "
                         "build_index + save_index to replace it.")
    index = _to_gpu(index, use_gpu)
    set_nprobe(index, nprobe)
    return index


def load_or_build_index(store: Datastore, factory: str = "Flat", nprobe: int = 16,
                        use_gpu="auto"):
    """Load the saved index if it is valid and of ``factory``; else build and save."""
    try:
        return load_index(store, factory, nprobe, use_gpu)
    except IndexCorrupt as err:
        warnings.warn(f"{err} Rebuilding it now.", stacklevel=2)
    except (FileNotFoundError, ValueError):
        pass  # none saved yet, or a file of another structure: replace it
    index = build_index(store, factory, nprobe, use_gpu)
    save_index(index, store, factory)
    return index
