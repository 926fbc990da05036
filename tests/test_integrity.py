"""Nothing silent: caches keyed by what changes them, damaged files named and rebuilt,
indexes tied to their store, NaN refused, offline failures fast."""

import functools
import json
import time
import warnings

import numpy as np
import pytest
import torch

from helpers import evaluation
from helpers.index import IndexCorrupt, build_index, load_index, load_or_build_index, save_index
from helpers.paths import CorruptFile
from helpers.train_decoder import precompute_knn_targets
from test_index import random_store


# --- an index records its store -------------------------------------------------------

def copy_index(src, dst):
    for name in ("index.faiss", "index.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_an_index_of_another_store_of_the_same_size_is_refused(tmp_path):
    a, b = random_store(tmp_path / "a", seed=0), random_store(tmp_path / "b", seed=1)
    save_index(build_index(a), a)
    copy_index(a.path, b.path)
    with pytest.raises(IndexCorrupt, match="built from another datastore.*Delete"):
        load_index(b)


def test_load_or_build_index_rebuilds_an_index_of_another_store(tmp_path):
    a, b = random_store(tmp_path / "a", seed=0), random_store(tmp_path / "b", seed=1)
    save_index(build_index(a), a)
    copy_index(a.path, b.path)
    with pytest.warns(UserWarning, match="another datastore.*Rebuilding"):
        index = load_or_build_index(b, use_gpu=False)
    _, ids = index.search(np.asarray(b.keys[:50]), 1)
    assert (ids[:, 0] == np.arange(50)).all()  # each key is its own nearest neighbour
    load_index(b)  # the rebuilt one is accepted


# --- kNN-target cache: one key per thing that changes it --------------------------------

@pytest.fixture()
def store(tmp_path):
    return random_store(tmp_path / "s", n=400)


def targets_folder_meta(store, index):
    precompute_knn_targets(store, index, k=8, temperature=10.0)
    return json.loads((store.path / "targets_k8_t10" / "targets.json").read_text())


def test_targets_from_an_approximate_index_are_not_reused_for_an_exact_one(store):
    exact = build_index(store, "Flat", use_gpu=False)
    ivf = build_index(store, "IVF4,Flat", nprobe=1, use_gpu=False)
    exact_ids = precompute_knn_targets(store, exact, k=8, temperature=10.0).ids[:].copy()
    approx = precompute_knn_targets(store, ivf, k=8, temperature=10.0)
    assert json.loads((approx.path / "targets.json").read_text())["index"].startswith(
        "IndexIVFFlat")
    again = precompute_knn_targets(store, exact, k=8, temperature=10.0)
    np.testing.assert_array_equal(again.ids, exact_ids)


def test_targets_are_recomputed_when_nprobe_changes(store, monkeypatch):
    from helpers import knn
    ivf = build_index(store, "IVF4,Flat", nprobe=1, use_gpu=False)
    precompute_knn_targets(store, ivf, k=8, temperature=10.0)
    from helpers.index import set_nprobe
    set_nprobe(ivf, 4)
    calls = []
    real = knn.search  # what the target search calls (helpers.large.knn_targets_chunked)
    monkeypatch.setattr(knn, "search", lambda *a, **k: calls.append(1) or real(*a, **k))
    precompute_knn_targets(store, ivf, k=8, temperature=10.0)
    assert calls  # searched again, not served from the nprobe=1 cache
    meta = json.loads((store.path / "targets_k8_t10" / "targets.json").read_text())
    assert meta["nprobe"] == 4


def test_damaged_targets_are_computed_again(store):
    index = build_index(store, use_gpu=False)
    first = precompute_knn_targets(store, index, k=8, temperature=10.0)
    good = np.array(first.ids)
    ids = store.path / "targets_k8_t10" / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:200])  # truncated
    with pytest.warns(UserWarning, match="ids.npy is truncated.*computing the targets"):
        again = precompute_knn_targets(store, index, k=8, temperature=10.0)
    np.testing.assert_array_equal(again.ids, good)


# --- held-out cache: model dtype and weights are part of the key ------------------------

TEXTS = ["Title: a\nQuestion: b\nAnswer: the data subject shall have the right"]


def test_heldout_cache_is_not_served_to_a_fine_tuned_model_of_the_same_name(tiny, data_dir):
    from conftest import make_model
    model, tok = tiny
    base = evaluation.heldout_eval(model, tok, TEXTS, "tiny", progress=False)
    tuned = make_model(len(tok), seed=1)  # same name, other weights
    other = evaluation.heldout_eval(tuned, tok, TEXTS, "tiny", progress=False)
    assert not np.allclose(base.p_base, other.p_base)
    assert len(list((data_dir / "cache" / "eval").glob("*.npz"))) == 2


def test_heldout_cache_is_keyed_by_dtype(tiny, data_dir):
    from conftest import make_model
    model, tok = tiny
    evaluation.heldout_eval(model, tok, TEXTS, "tiny", progress=False)
    half = make_model(len(tok)).to(torch.bfloat16)
    evaluation.heldout_eval(half, tok, TEXTS, "tiny", progress=False)
    names = sorted(p.name for p in (data_dir / "cache" / "eval").glob("*.npz"))
    assert len(names) == 2 and any("bfloat16" in n for n in names)


def test_a_damaged_heldout_cache_entry_is_computed_again(tiny, data_dir):
    model, tok = tiny
    good = evaluation.heldout_eval(model, tok, TEXTS, "tiny", progress=False)
    (entry,) = (data_dir / "cache" / "eval").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="npz.*computing the held-out pass again"):
        again = evaluation.heldout_eval(model, tok, TEXTS, "tiny", progress=False)
    np.testing.assert_array_equal(again.p_base, good.p_base)


# --- damaged files say which and what to do ----------------------------------------------

def test_a_truncated_store_array_is_named_with_advice(tmp_path):
    from helpers.datastore import Datastore
    store = random_store(tmp_path / "s")
    keys = store.path / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:500])
    with pytest.raises(CorruptFile, match="keys.npy is truncated.*delete the folder"):
        Datastore.open(store.path)


def test_a_store_with_a_broken_manifest_is_rebuilt(tiny, tmp_path):
    from helpers.datastore import build_datastore
    model, tok = tiny
    kw = dict(model_name="m", corpus_name="c")
    first = build_datastore(model, tok, ["the data subject shall"], tmp_path / "s", **kw)
    count = len(first)
    (tmp_path / "s" / "manifest.json").write_text('{"count": ')
    with pytest.warns(UserWarning, match="manifest.json is unreadable.*Rebuilding"):
        again = build_datastore(model, tok, ["the data subject shall"], tmp_path / "s", **kw)
    assert len(again) == count


def test_a_damaged_shard_of_an_interrupted_build_is_extracted_again(tiny, tmp_path,
                                                                    monkeypatch):
    from helpers import datastore
    model, tok = tiny
    texts = ["the data subject shall", "the right to obtain"]
    kw = dict(model_name="m", corpus_name="c", shard_docs=1)
    real = datastore._concatenate
    monkeypatch.setattr(datastore, "_concatenate", lambda *a: 1 / 0)  # interrupted
    with pytest.raises(ZeroDivisionError):
        datastore.build_datastore(model, tok, texts, tmp_path / "s", **kw)
    monkeypatch.setattr(datastore, "_concatenate", real)
    shard = tmp_path / "s.partial" / "shard_00000.npz"
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.warns(UserWarning, match="shard_00000.npz.*extracting that shard again"):
        store = datastore.build_datastore(model, tok, texts, tmp_path / "s", **kw)
    assert set(np.asarray(store.doc)) == {0, 1}


def test_a_truncated_decoder_checkpoint_is_named_with_advice(tmp_path):
    from test_saves import small_decoder
    from helpers.decoder import load_decoder, save_decoder
    save_decoder(small_decoder(), tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CorruptFile, match="model.safetensors cannot be loaded.*train the"):
        load_decoder(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(CorruptFile, match="lacks key_dim.*delete"):
        load_decoder(tmp_path / "d")


def test_from_pretrained_runs_load_decoders_checks_strictly(tmp_path):
    from test_saves import small_decoder
    from helpers.decoder import DecoderMismatch, MemoryDecoder, save_decoder
    from safetensors.torch import load_file, save_file
    dec = small_decoder()
    save_decoder(dec, tmp_path / "d")
    with pytest.raises(DecoderMismatch, match="base_vocab_size"):
        MemoryDecoder.from_pretrained(tmp_path / "d", vocab_size=99)
    weights = load_file(tmp_path / "d" / "model.safetensors")
    weights.pop("inp.weight")  # a checkpoint that lacks a tensor: never random weights
    save_file(weights, tmp_path / "d" / "model.safetensors")
    with pytest.raises(CorruptFile, match="inp.weight"):
        MemoryDecoder.from_pretrained(tmp_path / "d")


def test_a_gate_trained_without_a_decoder_is_refused_for_a_decoder():
    from test_gate import two_domains
    from test_saves import small_decoder
    from helpers.gate import GateMismatch, check_gate, train_gate
    gate, _ = train_gate(list(two_domains(n=20)), steps=2)
    with pytest.raises(GateMismatch, match="does not record which decoder.*decoder=decoder"):
        check_gate(gate, small_decoder())


# --- no silent NaN -------------------------------------------------------------------------

def test_a_dtype_that_gives_nan_logits_is_refused_at_load(tiny, tmp_path):
    from helpers.model import ModelLoadError, load_base_model
    model, tok = tiny
    broken = tmp_path / "m"
    with torch.no_grad():
        saved = model.model.embed_tokens.weight.clone()
        model.model.embed_tokens.weight.fill_(6e4)  # overflows float16 in the first layer
        model.save_pretrained(broken)
        model.model.embed_tokens.weight.copy_(saved)
    tok.save_pretrained(broken)
    with pytest.raises(ModelLoadError, match="float16.*NaN.*dtype=torch.float32"):
        load_base_model(str(broken), device="cpu", dtype=torch.float16)


def test_sampling_from_a_nan_distribution_stops_with_advice():
    from helpers.sampling import sample_next
    logp = torch.full((10,), float("nan"))
    for temperature in (0.0, 0.7):
        with pytest.raises(FloatingPointError, match="NaN.*dtype=torch.float32"):
            sample_next(logp, temperature)


def test_generation_stops_when_the_model_gives_nan(tiny, monkeypatch):
    from helpers.sampling import generate_text
    model, tok = tiny
    real = model.forward

    @functools.wraps(real)  # keeps the signature, so generate passes the cache by its current name
    def nan_forward(*a, **k):
        out = real(*a, **k)
        out.logits.fill_(float("nan"))
        return out

    monkeypatch.setattr(model, "forward", nan_forward)
    with pytest.raises(FloatingPointError, match="NaN"):
        generate_text(model, tok, "the data", max_new_tokens=3, temperature=0, top_k=None)


# --- offline: Hub names fail fast -----------------------------------------------------------

@pytest.fixture()
def no_network(monkeypatch):
    """Every connection attempt fails at once, like a machine without network."""
    import socket

    from helpers import model
    monkeypatch.setattr(model, "_HUB_REACHABLE", {})

    def refuse(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def test_an_unknown_model_name_fails_within_seconds_offline(no_network):
    from helpers.model import ModelLoadError, load_base_model
    tic = time.perf_counter()
    with pytest.raises(ModelLoadError,
                       match="(?s)unreachable.*load_base_model\\('gemma-3-270m'\\)"):
        load_base_model("no-such-org/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - tic < 5


def test_a_hub_corpus_id_fails_within_seconds_offline(no_network):
    from helpers.corpus import CorpusError, load_corpus
    tic = time.perf_counter()
    with pytest.raises(CorpusError, match="unreachable.*load_corpus\\('eu-law'\\)"):
        load_corpus("someone/some-dataset")
    assert time.perf_counter() - tic < 5


def test_the_reachability_check_is_bounded_when_dns_hangs(monkeypatch):
    import socket

    from helpers import model
    monkeypatch.setattr(model, "_HUB_REACHABLE", {})
    def hang(*args, **kwargs):  # a DNS lookup that never answers, then gives up
        time.sleep(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    tic = time.perf_counter()
    assert model.hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - tic < 2


def test_a_damaged_converted_model_is_converted_again(tiny, data_dir, monkeypatch):
    from helpers import model as model_mod
    from helpers.paths import atomic_dir
    model, tok = tiny

    def convert(target):  # stands in for the minute-long GGUF dequantization
        with atomic_dir(target, model_mod.CONVERTED_FILES) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

    monkeypatch.setattr(model_mod, "_convert_embedded", convert)
    folder = model_mod.embedded_model_dir()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a full disk
    with pytest.warns(UserWarning, match="damaged.*converting it again"):
        loaded, _ = model_mod.load_base_model(device="cpu")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
