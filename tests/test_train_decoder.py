"""Training the Memory Decoder on a datastore (helpers.train_decoder), notebook 03."""

import copy
import json

import numpy as np
import pytest
import torch

import helpers.knn as knn
from helpers.datastore import Datastore
from helpers.decoder import DecoderConfig, MemoryDecoder, load_decoder
from helpers.index import build_index
from helpers.knn import knn_distribution, lookup_values, search
from helpers.train_decoder import (decoder_target_probs, memdec_loss,
                                   precompute_knn_targets, train_decoder, window_batch)

TOKENS = (3, 5, 8, 13, 21)  # the only next tokens in the tiny store
VOCAB = 40                  # base vocabulary size


pytestmark = pytest.mark.usefixtures("one_thread")


def make_store(folder, n=240, dim=32, n_docs=6, values=None, seed=0, **manifest):
    """A datastore whose keys cluster by next token, written like build_datastore."""
    rng = np.random.default_rng(seed)
    values = rng.choice(TOKENS, n) if values is None else np.asarray(values)
    centres = 3.0 * rng.standard_normal((values.max() + 1, dim))
    keys = (centres[values] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    doc = np.repeat(np.arange(n_docs, dtype=np.int32), n // n_docs)
    pos = np.concatenate([np.arange(n // n_docs, dtype=np.int32)] * n_docs)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in {"keys": keys, "values": values.astype(np.int64), "doc": doc,
                        "pos": pos}.items():
        np.save(folder / f"{name}.npy", array)
    manifest = {"count": n, "dim": dim, "key_dtype": "float32", "model_name": "tiny-gemma",
                "layer": -1, "tokenizer_fingerprint": "0123abcd",
                "corpus_fingerprint": "c0ffee", **manifest}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Datastore.open(folder)


def tiny_decoder(store, seed=0, **knobs):
    torch.manual_seed(seed)
    knobs = {"dim": 32, "n_layers": 2, "n_heads": 4, "window": 2, "dropout": 0.1, **knobs}
    return MemoryDecoder(DecoderConfig.from_store(store, VOCAB, **knobs))


@pytest.fixture()
def setup(tmp_path):
    """(store, index, targets) for 240 rows in 6 documents."""
    store = make_store(tmp_path / "store")
    index = build_index(store, use_gpu=False)
    return store, index, precompute_knn_targets(store, index, k=8, temperature=10.0)


def test_targets_never_contain_the_querys_own_row(tmp_path):
    store = make_store(tmp_path / "s", n=60, values=np.arange(60))  # value = row id
    index = build_index(store, use_gpu=False)
    own = search(index, np.asarray(store.keys), 1)[1][:, 0]
    assert (own == np.arange(60)).all()  # without exclusion a key finds itself
    targets = precompute_knn_targets(store, index, k=5, temperature=10.0)
    assert not (targets.ids == np.arange(60)[:, None]).any()


def test_keep_self_targets_keep_the_own_row_in_their_own_cache(setup):
    store, index, paper = setup
    kept = precompute_knn_targets(store, index, k=8, temperature=10.0, keep_self=True)
    distances, neighbours = search(index, np.asarray(store.keys), 8)  # no exclusion
    ids, probs = knn_distribution(distances, lookup_values(store, neighbours), 10.0)
    np.testing.assert_array_equal(kept.ids, ids)
    np.testing.assert_allclose(kept.probs, probs, atol=1e-3)
    assert kept.path == store.path / "targets_k8_t10_self" and paper.path != kept.path
    assert json.loads((kept.path / "targets.json").read_text())["keep_self"] is True
    true = np.asarray(store.values)[:, None]
    want = ((kept.ids == true) * kept.probs.astype(np.float32)).sum(1)
    np.testing.assert_allclose(kept.p_stored(store), want)
    np.testing.assert_allclose(kept.p_stored(store, [3, 7]), want[[3, 7]])
    assert (kept.p_stored(store) >= paper.p_stored(store) - 1e-3).all()  # its own token gains
    again = precompute_knn_targets(store, index, k=8, temperature=10.0)  # the paper's, reused
    assert again.path == paper.path
    np.testing.assert_array_equal(again.ids, paper.ids)


def test_keep_self_must_be_a_bool(setup):
    store, index, _ = setup
    with pytest.raises(TypeError, match="keep_self must be True or False"):
        precompute_knn_targets(store, index, k=8, temperature=10.0, keep_self="yes")


def test_targets_are_the_sparse_knn_distribution_stored_compactly(setup):
    store, index, targets = setup
    rows = np.arange(len(store))
    ids, probs = knn_distribution(*_excluded(index, store, rows), 10.0)
    assert targets.ids.dtype == np.int32 and targets.probs.dtype == np.float16
    assert targets.ids.shape == targets.probs.shape == (len(store), 8)
    np.testing.assert_array_equal(targets.ids, ids)
    np.testing.assert_allclose(targets.probs, probs, atol=1e-3)
    meta = json.loads((targets.path / "targets.json").read_text())
    assert targets.path == store.path / "targets_k8_t10"
    assert (meta["k"], meta["count"], meta["corpus_fingerprint"]) == (8, 240, "c0ffee")


def test_the_target_search_reads_the_keys_through_maps_of_its_own(tmp_path):
    """Notebook 03 trains with the store open after the search: had the search read
    ``store.keys``, every key's page would stay resident in that map (456 MiB at the full
    size). It reads batches through maps of its own, with the same targets."""
    store = make_store(tmp_path / "s")
    index = build_index(store, use_gpu=False)
    keys = np.array(store.keys)
    assert store.fingerprint  # from a sample of the keys, cached, as the index's check does

    class Unread:  # store.keys, failing the test if anything reads it
        shape, dtype = keys.shape, keys.dtype

        def __getitem__(self, item):
            raise AssertionError(f"precompute_knn_targets read store.keys[{item!r}]")

        def __array__(self, *args, **kwargs):
            raise AssertionError("precompute_knn_targets read store.keys")

    store.keys = Unread()
    targets = precompute_knn_targets(store, index, k=8, temperature=10.0, batch_size=50)
    distances, neighbours = search(index, keys, 8, exclude=np.arange(len(keys)))  # 240 rows
    ids, probs = knn_distribution(distances, lookup_values(store, neighbours), 10.0)
    np.testing.assert_array_equal(targets.ids, ids)
    np.testing.assert_allclose(targets.probs, probs, atol=1e-3)


def _excluded(index, store, rows):
    distances, neighbours = search(index, np.asarray(store.keys)[rows], 8, exclude=rows)
    return distances, lookup_values(store, neighbours)


def test_targets_are_reused_from_disk_without_searching(setup, monkeypatch):
    store, index, targets = setup
    calls = []
    monkeypatch.setattr(knn, "search", lambda *a, **kw: calls.append(1) or search(*a, **kw))
    again = precompute_knn_targets(store, index, k=8, temperature=10.0)
    assert calls == [] and isinstance(again.ids, np.memmap)
    np.testing.assert_array_equal(again.ids, targets.ids)
    precompute_knn_targets(store, index, k=4, temperature=10.0)  # other k: computed
    assert calls


def test_window_batch_respects_document_boundaries(setup):
    store = setup[0]  # 6 documents of 40 rows
    rows = np.array([0, 1, 40, 42, 239])
    x, pad = window_batch(store.keys, store.doc, rows, W=3)
    assert x.shape == (5, 3, 32) and x.dtype == torch.float32
    assert pad.tolist() == [[True, True, False], [True, False, False],
                            [True, True, False], [False, False, False],
                            [False, False, False]]
    keys = torch.from_numpy(np.array(store.keys))
    assert torch.equal(x[3], keys[40:43]) and torch.equal(x[1, 1:], keys[0:2])
    assert (x[pad] == 0).all()


def small_loss_example():
    """Head vocabulary [2, 5, 7]: two rows with sparse targets and next tokens."""
    decoder = MemoryDecoder(DecoderConfig(key_dim=4, base_vocab_size=10, dim=8, n_layers=1,
                                          n_heads=2, vocab_ids=[7, 2, 5]))
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    ids = np.array([[5, 2, -1], [7, -1, -1]])
    probs = np.array([[0.75, 0.25, 0.0], [1.0, 0.0, 0.0]], np.float16)
    return logits, ids, probs, np.array([5, 2]), decoder


def test_loss_equals_a_hand_computation():
    logits, ids, probs, nxt, decoder = small_loss_example()
    logq = np.log(np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True))
    # columns: 2 -> 0, 5 -> 1, 7 -> 2
    kl = (0.75 * (np.log(0.75) - logq[0, 1]) + 0.25 * (np.log(0.25) - logq[0, 0])
          + 1.0 * (0.0 - logq[1, 2])) / 2
    ce = -(logq[0, 1] + logq[1, 0]) / 2
    loss, got_kl, got_ce = memdec_loss(logits, ids, probs, nxt, decoder, beta=0.3)
    assert got_kl.item() == pytest.approx(kl, rel=1e-5)
    assert got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)


def test_beta_zero_is_pure_cross_entropy_and_beta_one_pure_kl():
    logits, ids, probs, nxt, decoder = small_loss_example()
    loss, kl, ce = memdec_loss(logits, ids, probs, nxt, decoder, beta=0.0)
    assert loss.item() == ce.item()
    loss, kl, ce = memdec_loss(logits, ids, probs, nxt, decoder, beta=1.0)
    assert loss.item() == kl.item()


def test_loss_refuses_tokens_outside_the_head_vocabulary():
    logits, ids, probs, nxt, decoder = small_loss_example()
    with pytest.raises(ValueError, match="DecoderConfig.from_store"):
        memdec_loss(logits, ids, probs, np.array([5, 9]), decoder)


def test_training_lowers_the_loss(setup):
    store, _, targets = setup
    decoder = tiny_decoder(store)
    history = train_decoder(decoder, store, targets, epochs=4, batch_size=32, lr=3e-3,
                            progress=False)
    loss = history["loss"]
    assert len(loss) == 4 * 8 and history["stopped"] is None
    assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5])
    assert not decoder.training  # handed back ready for evaluation


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_weights(setup):
    """On a CPU without native bf16 autocast is slower, not wrong: the losses must
    follow the float32 run closely without being bit-identical (so bf16 ran)."""
    store, _, targets = setup
    runs = {}
    for dtype in (None, torch.bfloat16):
        decoder = tiny_decoder(store, dropout=0.0)
        runs[dtype] = train_decoder(decoder, store, targets, epochs=2, batch_size=32, lr=3e-3,
                                    progress=False, autocast=dtype)["loss"]
        assert all(p.dtype == torch.float32 for p in decoder.parameters())
    fp32, bf16 = np.array(runs[None]), np.array(runs[torch.bfloat16])
    assert np.isfinite(bf16).all() and bf16[-4:].mean() < 0.8 * bf16[:4].mean()
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        train_decoder(tiny_decoder(store), store, targets, epochs=1, progress=False,
                      autocast="bf16")


def test_learning_rate_warms_up_then_decays_to_zero(setup):
    store, _, targets = setup
    history = train_decoder(tiny_decoder(store), store, targets, epochs=2, batch_size=24,
                            lr=1e-2, warmup_frac=0.2, progress=False)
    lr = history["lr"]  # 20 steps, 4 of warm-up
    assert lr[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert all(a > b for a, b in zip(lr[4:], lr[5:])) and lr[-1] < 1e-3


def test_the_same_seed_gives_the_same_history(setup):
    store, _, targets = setup
    decoder = tiny_decoder(store)  # with dropout
    runs = []
    for global_seed in (10, 20):  # the caller's RNG state must not matter
        torch.manual_seed(global_seed)
        runs.append(train_decoder(copy.deepcopy(decoder), store, targets, batch_size=32,
                                  max_steps=6, seed=1, progress=False))
    assert runs[0] == runs[1]


def test_the_seed_shuffles_the_rows(setup):
    store, _, targets = setup
    decoder = tiny_decoder(store, dropout=0.0)
    losses = [train_decoder(copy.deepcopy(decoder), store, targets, batch_size=32,
                            max_steps=3, seed=seed, progress=False)["loss"]
              for seed in (1, 2)]
    assert losses[0] != losses[1]


def test_early_stopping_keeps_and_checkpoints_the_best_epoch(setup, tmp_path):
    store, _, targets = setup
    decoder = tiny_decoder(store)
    scores, states = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8]), []

    def eval_fn(model):
        states.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    history = train_decoder(decoder, store, targets, epochs=6, batch_size=60, patience=3,
                            eval_fn=eval_fn, checkpoint_dir=tmp_path / "ckpt",
                            progress=False)
    assert history["eval"] == [3.0, 2.0, 2.5, 2.6, 2.7]
    assert (history["best_epoch"], history["best_eval"]) == (2, 2.0)
    assert "early stop" in history["stopped"]
    for state in (decoder.state_dict(), load_decoder(tmp_path / "ckpt").state_dict()):
        assert all(torch.equal(state[k], states[1][k]) for k in state)


def test_nan_loss_stops_training_and_restores_good_weights(setup):
    store, _, targets = setup
    decoder = tiny_decoder(store)
    good = []
    calls = []

    def poison(module, args):  # the 6th training step (epoch 2) sees a NaN weight
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                module.inp.weight[0, 0] = float("nan")

    decoder.register_forward_pre_hook(poison)
    with pytest.warns(UserWarning, match="nan"):
        history = train_decoder(decoder, store, targets, epochs=3, batch_size=60,
                                eval_fn=lambda m: good.append(copy.deepcopy(
                                    m.state_dict())) or 1.0, progress=False)
    assert "nan" in history["stopped"] and "DECODER_LR" in history["stopped"]
    assert len(history["loss"]) == 5 and len(good) == 1
    state = decoder.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(torch.equal(state[k], good[0][k]) for k in state)


def test_decoder_target_probs_read_the_true_token_from_the_full_distribution(setup):
    store, _, _ = setup
    decoder = tiny_decoder(store, window=3).eval()
    values = np.asarray(store.values).copy()
    values[7] = 30  # a token the store head lacks
    p = decoder_target_probs(decoder, store.keys, store.doc, values, batch_size=50)
    x, pad = window_batch(store.keys, store.doc, np.arange(len(store)), 3)
    with torch.no_grad():
        full = decoder.log_probs_full(x, pad).exp()
    expect = full[torch.arange(len(store)), torch.from_numpy(values)].numpy()
    assert p.dtype == np.float32 and p.shape == (len(store),)
    np.testing.assert_allclose(p, expect, rtol=1e-5)
    assert p[7] == pytest.approx(np.exp(-30.0))


def test_decoder_target_probs_of_some_rows_equal_those_rows_of_all(setup):
    """Scoring a subset (e.g. the test half) reads each window from the full arrays."""
    store, _, _ = setup
    decoder = tiny_decoder(store, window=3).eval()
    rows = np.array([0, 5, 6, 31, len(store) - 1])
    every = decoder_target_probs(decoder, store.keys, store.doc, store.values, batch_size=7)
    some = decoder_target_probs(decoder, store.keys, store.doc, store.values, batch_size=2,
                                rows=rows)
    np.testing.assert_allclose(some, every[rows], rtol=1e-6)
