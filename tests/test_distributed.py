"""Sharded datastore builds (helpers.distributed, scripts/build_datastore.py) under accelerate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers.datastore as ds
from helpers.datastore import DatastoreMismatch, build_datastore
from helpers.distributed import (ShardMissing, StoreLocked, acquire_lock, build_datastore_sharded,
                                 build_part, doc_range, lock_path, merge_parts, part_path,
                                 release_lock, shards_dir)

from conftest import STORE_TEXTS, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = STORE_TEXTS + [t[::-1].strip() or "the" for t in STORE_TEXTS[:3]]  # 11 docs
SETTINGS = dict(model_name="tiny-gemma", corpus_name="words", layer=-1, window=16,
                overlap=4, batch_size=3, key_dtype="float32")

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_store(a, b):
    for name in ("values", "doc", "pos"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.keys, b.keys, rtol=0, atol=1e-5)
    for k in ("count", "dim", "key_dtype", "model_name", "layer", "tokenizer_fingerprint",
              "corpus_fingerprint", "num_docs"):
        assert a.manifest[k] == b.manifest[k], k


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The one-process build of TEXTS (3 docs a block)."""
    model, tok = tiny
    torch.set_num_threads(1)
    return build_datastore(model, tok, TEXTS, tmp_path_factory.mktemp("ref") / "store",
                           shard_docs=3, **SETTINGS)


def test_doc_ranges_cover_every_block_once():
    for n, block, world in [(11, 3, 2), (11, 3, 5), (2, 3, 4), (100, 7, 3)]:
        ranges = [doc_range(n, block, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % block == 0 for lo, hi in ranges if lo < hi)


def test_parts_merge_into_the_one_process_store(tiny, reference, tmp_path):
    model, tok = tiny
    out = tmp_path / "store"
    for rank in (1, 0):  # any order
        build_part(model, tok, TEXTS, out, rank, 2, shard_docs=3, **SETTINGS)
    merged = merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS)
    assert_same_store(merged, reference)
    assert merged.manifest["built_in_parts"] == 2
    assert not shards_dir(out).exists()
    # the notebook's call opens the merged store instead of extracting again
    again = build_datastore(model, tok, TEXTS, out, shard_docs=3, **SETTINGS)
    assert again.manifest["built_in_parts"] == 2


def test_a_missing_part_is_refused_with_the_command_to_make_it(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "store"
    build_part(model, tok, TEXTS, out, 0, 2, shard_docs=3, **SETTINGS)
    with pytest.raises(ShardMissing, match=r"part 1 of 2 .*--rank 1 --world-size 2"):
        merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS)
    assert not out.exists()


@pytest.mark.parametrize("change, word", [
    ({"layer": 1}, "layer"), ({"model_name": "other-model"}, "model_name"),
    ({"key_dtype": "float16"}, "key_dtype"), ("tokenizer", "tokenizer_fingerprint")])
def test_a_part_from_another_model_tokenizer_or_layer_is_refused(tiny, tmp_path, change, word):
    model, tok = tiny
    out = tmp_path / "store"
    for rank in (0, 1):
        build_part(model, tok, TEXTS, out, rank, 2, shard_docs=3, **SETTINGS)
    # part 1 rebuilt by a launch with other settings
    import shutil
    shutil.rmtree(part_path(out, 1, 2))
    other_tok = tok
    settings = dict(SETTINGS)
    if change == "tokenizer":
        other_tok = make_tokenizer()
        other_tok.add_tokens(["extra"])
    else:
        settings.update(change)
    build_part(model, other_tok, TEXTS, out, 1, 2, shard_docs=3, **settings)
    with pytest.raises(DatastoreMismatch, match=rf"part 1 of 2 .*{word} is .*Delete"):
        merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS)
    assert not out.exists()


def test_parts_of_other_texts_are_refused(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "store"
    for rank in (0, 1):
        build_part(model, tok, TEXTS[:8], out, rank, 2, shard_docs=3, **SETTINGS)
    with pytest.raises(DatastoreMismatch, match="other texts"):
        merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS)


def test_a_second_launch_on_the_same_store_is_refused(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "store"
    acquire_lock(out)  # this (live) process is "the other launch"
    try:
        with pytest.raises(StoreLocked, match=r"another launch .*pid \d+.*delete .*\.lock"):
            build_datastore_sharded(model, tok, TEXTS, out, shard_docs=3, **SETTINGS)
        assert not shards_dir(out).exists() and not out.exists()  # nothing written
    finally:
        release_lock(out)
    assert not lock_path(out).exists()


def test_a_lock_left_by_a_killed_launch_is_taken_over(tiny, reference, tmp_path):
    model, tok = tiny
    out = tmp_path / "store"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock_path(out).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    store = build_datastore_sharded(model, tok, TEXTS, out, shard_docs=3, **SETTINGS)
    assert_same_store(store, reference)
    assert not lock_path(out).exists()


def test_killed_mid_part_resumes_without_duplicate_or_lost_rows(tiny, reference, tmp_path,
                                                                monkeypatch):
    model, tok = tiny
    out = tmp_path / "store"
    build_part(model, tok, TEXTS, out, 0, 2, shard_docs=3, **SETTINGS)
    real, calls = ds._extract_shard, []

    def dies_on_second_block(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(ds, "_extract_shard", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        build_part(model, tok, TEXTS, out, 1, 2, shard_docs=3, **SETTINGS)
    part = part_path(out, 1, 2)
    assert not part.with_suffix(".json").exists()  # unfinished: merging refuses it
    with pytest.raises(ShardMissing, match="unfinished"):
        merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS)
    saved = sorted(p.name for p in part.with_name(part.name + ".partial").glob("shard_*.npz"))
    assert saved == ["shard_00000.npz"]
    # a half-written block file: redone, not trusted
    (part.with_name(part.name + ".partial") / "shard_00001.npz").write_bytes(b"PK\x03\x04")
    calls.clear()
    monkeypatch.setattr(ds, "_extract_shard", lambda *a, **kw: (calls.append(1),
                                                                real(*a, **kw))[1])
    with pytest.warns(UserWarning, match="truncated"):
        build_part(model, tok, TEXTS, out, 1, 2, shard_docs=3, **SETTINGS)
    assert len(calls) == 1  # part 1 has 2 blocks (docs 6..10): only the unsaved one is redone
    # rank 0's finished part is skipped too
    calls.clear()
    build_part(model, tok, TEXTS, out, 0, 2, shard_docs=3, **SETTINGS)
    assert calls == []
    assert_same_store(merge_parts(model, tok, TEXTS, out, 2, shard_docs=3, **SETTINGS),
                      reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n: int, script: str, *args: str, timeout: int = 300):
    """``accelerate launch`` of ``n`` CPU processes (gloo); fails the test with the output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / script), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model and tokenizer saved like a Hub model, and TEXTS as .jsonl."""
    folder = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return folder


def test_two_gloo_processes_build_the_one_process_store(tiny_folder, tmp_path):
    from helpers.datastore import Datastore
    from helpers.model import load_base_model

    model, tok = load_base_model(str(tiny_folder / "model"), device="cpu",
                                 dtype=torch.float32)
    ref = build_datastore(model, tok, TEXTS, tmp_path / "ref", shard_docs=3, model_name="tiny",
                          corpus_name="texts", window=16, overlap=4, batch_size=3)
    args = ["--model", str(tiny_folder / "model"), "--model-name", "tiny", "--texts",
            str(tiny_folder / "texts.jsonl"), "--window", "16", "--overlap", "4",
            "--batch-size", "3", "--shard-docs", "3", "--out", str(tmp_path / "store")]
    run = accelerate_launch(2, "scripts/build_datastore.py", *args)
    assert "Datastore(" in run.stdout, run.stdout
    merged = Datastore.open(tmp_path / "store")
    assert merged.manifest["built_in_parts"] == 2
    assert_same_store(merged, ref)
    assert not lock_path(tmp_path / "store").exists()


# --- data-parallel decoder training ---------------------------------------------------------

DEC = dict(dim=32, n_layers=2, n_heads=4, window=2, dropout=0.0)
TRAIN = dict(epochs=2, lr=3e-3, batch_size=49, beta=0.5, seed=0)  # 49 rows: 25 + 24


def small_store(folder, n=240, dim=16, n_docs=6, seed=0):
    """A store whose keys cluster by next token (written as build_datastore writes one)."""
    from helpers.datastore import Datastore

    rng = np.random.default_rng(seed)
    values = rng.choice([3, 5, 8, 13, 21], n)
    keys = (3.0 * rng.standard_normal((22, dim))[values]
            + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    folder.mkdir(parents=True)
    arrays = {"keys": keys, "values": values.astype(np.int64),
              "doc": np.repeat(np.arange(n_docs, dtype=np.int32), n // n_docs),
              "pos": np.tile(np.arange(n // n_docs, dtype=np.int32), n_docs)}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    (folder / "manifest.json").write_text(json.dumps({
        "count": n, "dim": dim, "key_dtype": "float32", "model_name": "tiny-gemma",
        "layer": -1, "tokenizer_fingerprint": "0123abcd", "corpus_fingerprint": "c0ffee"}))
    return Datastore.open(folder)


def one_process_run(store, data_parallel: bool):
    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.distributed import train_decoder_data_parallel
    from helpers.index import load_or_build_index
    from helpers.train_decoder import precompute_knn_targets, train_decoder

    targets = precompute_knn_targets(store, load_or_build_index(store, use_gpu=False), k=8,
                                     temperature=10.0)
    torch.manual_seed(0)
    decoder = MemoryDecoder(DecoderConfig.from_store(store, 40, **DEC))
    if data_parallel:
        from accelerate import Accelerator
        history = train_decoder_data_parallel(decoder, store, targets, Accelerator(cpu=True),
                                              progress=False, **TRAIN)
    else:
        history = train_decoder(decoder, store, targets, progress=False, **TRAIN)
    return decoder, history


def test_data_parallel_loop_on_one_process_is_train_decoder(tmp_path):
    store = small_store(tmp_path / "store")
    dp, h_dp = one_process_run(store, True)
    ref, h_ref = one_process_run(store, False)
    assert len(h_dp["loss"]) == len(h_ref["loss"]) == 2 * 5
    np.testing.assert_allclose(h_dp["loss"], h_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(h_dp["lr"], h_ref["lr"], rtol=1e-7)
    for (name, a), b in zip(dp.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_train_the_one_process_decoder(tmp_path):
    from safetensors.torch import load_file

    store = small_store(tmp_path / "store")
    ref, h_ref = one_process_run(store, True)
    accelerate_launch(2, "scripts/train_decoder.py", "--store", str(store.path), "--out",
                      str(tmp_path / "dec"), "--base-vocab-size", "40", "--k", "8",
                      "--temperature", "10", "--dim", "32", "--layers", "2", "--heads", "4",
                      "--window", "2", "--dropout", "0", "--epochs", "2", "--lr", "3e-3",
                      "--batch-size", "49", "--seed", "0")
    run = json.loads((tmp_path / "dec" / "run.json").read_text())
    assert run["processes"] == 2 and run["history"]["global_batch"] == 49
    np.testing.assert_allclose(run["history"]["loss"], h_ref["loss"], rtol=1e-4)
    got = load_file(tmp_path / "dec" / "model.safetensors")
    for name, want in ref.state_dict().items():
        have = got[name]
        if name.endswith("in_proj_bias"):
            # the key bias (middle third) cannot change any attention weight: its true
            # gradient is 0, and Adam scales the rounding noise left in its place up to
            # steps of size ~lr. Bounded, but not 1e-5: checked apart.
            d = DEC["dim"]
            torch.testing.assert_close(have[d:2 * d], want[d:2 * d], rtol=0, atol=1e-3)
            have, want = torch.cat([have[:d], have[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
        torch.testing.assert_close(have, want, rtol=1e-4, atol=3e-5, msg=name)
    torch.manual_seed(0)  # and training did move the weights away from the start
    from helpers.decoder import DecoderConfig, MemoryDecoder
    start = MemoryDecoder(DecoderConfig.from_store(store, 40, **DEC)).state_dict()
    moved = max(float((got[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
