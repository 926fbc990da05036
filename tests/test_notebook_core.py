"""The core ideas written out in the notebooks agree with the helpers the long runs use.

Each test runs a notebook cell's own code (found by its cell id, so the
notebook and the helper cannot drift apart) on small inputs and compares it
with the helper.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebook_cell(notebook: str, cell_id: str, **names) -> dict:
    """Run the code cell ``cell_id`` of ``notebook`` in a namespace of ``names``."""
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    source = [c for c in cells if c.get("id") == cell_id]
    assert len(source) == 1, f"{notebook} has no cell {cell_id}: was it moved or renamed?"
    namespace = {"np": np, "torch": torch, **names}
    exec(compile("".join(source[0]["source"]), f"{notebook}:{cell_id}", "exec"), namespace)
    return namespace


NB02 = "02_datastore_knn_lm.ipynb"


@pytest.mark.parametrize("temperature", [1.0, 30.0, 5000.0])
def test_knn_vote_of_notebook_02_equals_the_batched_knn_distribution(temperature):
    from helpers.knn import knn_distribution

    knn_vote = notebook_cell(NB02, "a3e51c03")["knn_vote"]
    rng = np.random.default_rng(0)
    distances = np.sort(rng.uniform(2000, 5000, (6, 16)), axis=1).astype(np.float32)
    values = rng.integers(0, 5, (6, 16))  # few tokens: many neighbours share one
    ids, probs = knn_distribution(distances, values, temperature)
    for q in range(len(values)):
        vote = knn_vote(distances[q], values[q], temperature)
        helper = {int(i): float(p) for i, p in zip(ids[q], probs[q]) if i >= 0}
        tokens = sorted(set(vote) | set(helper))  # a vote of weight 0 the helper leaves out
        assert np.allclose([vote.get(t, 0.0) for t in tokens],
                           [helper.get(t, 0.0) for t in tokens], atol=1e-6)
        assert list(vote)[0] == int(ids[q, 0])  # the same most probable token


def test_without_self_of_notebook_02_equals_search_with_exclude(store_index):
    from helpers.knn import search

    store, index = store_index
    without_self = notebook_cell(NB02, "a3e51c07")["without_self"]
    own = np.array([0, 3, 7, 20, len(store) - 1])
    queries = np.asarray(store.keys, np.float32)[own]
    k = 5
    d_all, i_all = search(index, queries, k + 1)
    d_ex, i_ex = search(index, queries, k, exclude=own)
    for r in range(len(own)):
        d, i = without_self(d_all[r], i_all[r], own[r])
        assert np.array_equal(i, i_ex[r]) and np.allclose(d, d_ex[r])


def test_without_self_of_notebook_02_drops_the_farthest_when_the_own_row_is_missing():
    from helpers.knn import drop_own_rows

    without_self = notebook_cell(NB02, "a3e51c07")["without_self"]
    distances, ids = np.array([[1.0, 2.0, 3.0]]), np.array([[4, 5, 6]])
    d, i = without_self(distances[0], ids[0], 9)
    want_d, want_i = drop_own_rows(distances, ids, np.array([9]))
    assert i.tolist() == want_i[0].tolist() == [4, 5] and np.allclose(d, want_d[0])


NB03 = "03_train_memory_decoder.ipynb"


def _small_decoder(window: int, seed: int = 0):
    from helpers.decoder import DecoderConfig, MemoryDecoder

    torch.manual_seed(seed)
    return MemoryDecoder(DecoderConfig(key_dim=4, base_vocab_size=12, dim=8, n_layers=2,
                                       n_heads=2, window=window, dropout=0.0,
                                       vocab_ids=[1, 3, 4, 7, 9, 11])).eval()


@pytest.mark.parametrize("window", [1, 3])
def test_decoder_forward_of_notebook_03_equals_memory_decoder_forward(window):
    from helpers.train_decoder import window_batch

    decoder_forward = notebook_cell(NB03, "b4f62d06")["decoder_forward"]
    dec = _small_decoder(window)
    keys = torch.randn(9, 4, generator=torch.Generator().manual_seed(1)).numpy()
    doc = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    x, pad = window_batch(keys, doc, np.arange(9), window)  # rows at document starts pad
    with torch.no_grad():
        assert torch.allclose(decoder_forward(dec, x, pad), dec(x, pad), atol=1e-5)
        assert torch.allclose(decoder_forward(dec, x), dec(x), atol=1e-5)


def test_training_step_of_notebook_03_takes_the_step_of_memdec_loss():
    from helpers.train_decoder import memdec_loss

    training_step = notebook_cell(NB03, "b4f62d09")["training_step"]
    mine, ref = _small_decoder(2).train(), _small_decoder(2).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 4, generator=gen)
    pad = torch.tensor([[True, False]] + [[False, False]] * 4)
    ids = np.array([[3, 7, -1], [1, -1, -1], [9, 11, 4], [4, 3, -1], [11, -1, -1]])
    probs = np.array([[.6, .4, 0], [1, 0, 0], [.5, .3, .2], [.9, .1, 0], [1, 0, 0]],
                     dtype=np.float32)
    nxt = np.array([3, 1, 9, 7, 11])

    loss, kl, ce = training_step(mine, torch.optim.SGD(mine.parameters(), lr=0.5),
                                 x, pad, ids, probs, nxt, 0.3)
    _assert_took_the_reference_step(mine, ref, (loss, kl, ce),
                                    memdec_loss(ref(x, pad), ids, probs, nxt, ref, 0.3),
                                    _small_decoder(2).head.weight)


def _assert_took_the_reference_step(mine, ref, got, want, untrained_head):
    """The notebook's step gave ``got`` = (loss, kl, ce) and left ``mine`` where one SGD step
    (lr 0.5, gradients clipped to norm 1) on ``want`` = memdec_loss(...) of ``ref`` leaves it."""
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt.zero_grad()
    want[0].backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    assert np.allclose(got, [t.item() for t in want], atol=1e-6)
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert not torch.equal(mine.head.weight, untrained_head)  # a step was taken


NB04 = "04_blended_sampling.ipynb"


@pytest.mark.parametrize("temperature, top_k", [(0.8, 5), (1.0, None), (0.0, 1)])
def test_blend_and_sample_of_notebook_04_picks_the_tokens_of_generate(tiny, one_thread,
                                                                      temperature, top_k):
    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.sampling import generate

    model, tok = tiny
    blend_and_sample = notebook_cell(NB04, "c5a73e06")["blend_and_sample"]
    torch.manual_seed(3)
    decoder = MemoryDecoder(DecoderConfig(
        key_dim=32, base_vocab_size=len(tok), dim=16, n_layers=1, n_heads=2, window=2,
        vocab_ids=list(range(4, len(tok), 2)))).eval()
    with torch.no_grad():
        decoder.head.weight.mul_(20)  # a confident memory, so the blend changes the choice
    prompt = "the data subject shall have the right"
    steps = list(generate(model, tok, prompt, mode="memdec", decoder=decoder, alpha=0.6,
                          blend="probs", temperature=temperature, top_k=top_k,
                          max_new_tokens=12, seed=4))
    mine = blend_and_sample(model, decoder, tok(prompt)["input_ids"], 0.6, temperature, top_k,
                            len(steps), 4)
    assert len(steps) >= 4, "generate stopped at an end token too soon to compare"
    assert mine == [s.token_id for s in steps]


NB05 = "05_chat_panel.ipynb"


def test_stream_of_notebook_05_shows_the_text_of_generate_text_token_by_token(tiny, one_thread):
    from helpers.sampling import generate, generate_text

    model, tok = tiny
    stream = notebook_cell(NB05, "d6b84f05")["stream"]
    kw = dict(temperature=0.9, top_k=5, max_new_tokens=10, seed=7)
    want, steps = generate_text(model, tok, "the data subject shall", **kw)
    shown = []
    got = stream(generate(model, tok, "the data subject shall", **kw), shown.append)
    assert got == want and shown == [s.text for s in steps]


def test_stream_of_notebook_05_raises_an_error_of_the_generator_in_the_reader():
    stream = notebook_cell(NB05, "d6b84f05")["stream"]

    def broken():
        yield type("Step", (), {"text": "a"})()
        raise RuntimeError("the model failed")
    shown = []
    with pytest.raises(RuntimeError, match="the model failed"):
        stream(broken(), shown.append)
    assert shown == ["a"]


NB06 = "06_token_memory.ipynb"


def _small_token_decoder(seed: int = 0):
    from helpers.token_decoder import TokenDecoderConfig, TokenMemoryDecoder

    torch.manual_seed(seed)
    return TokenMemoryDecoder(TokenDecoderConfig(base_vocab_size=100, vocab_ids=[3, 5, 7, 9],
                                                 bos_id=1, dim=16, n_layers=2, n_heads=4,
                                                 context=12, dropout=0.0)).eval()


def test_token_forward_of_notebook_06_equals_the_token_decoders_forward():
    import math

    token_forward = notebook_cell(NB06, _nb06_cell("def token_forward("), math=math)["token_forward"]
    dec = _small_token_decoder()
    ids = torch.tensor([[1, 3, 5, 7, 99, 9, 3, 5], [1, 9, -1, 7, 3, 3, 5, 1]])  # unknown ids too
    with torch.no_grad():
        assert torch.allclose(token_forward(dec, ids), dec(ids), atol=1e-5)


def test_training_step_of_notebook_06_takes_the_step_of_memdec_loss_over_chunk_targets(
        store_index):
    from helpers.token_decoder import TokenMemoryDecoder
    from helpers.train_decoder import memdec_loss, precompute_knn_targets
    from helpers.train_token_decoder import chunk_batch, chunk_plan
    from tests.conftest import make_tokenizer

    store, index = store_index
    targets = precompute_knn_targets(store, index, k=8, temperature=10.0)
    tok = make_tokenizer()
    training_step = notebook_cell(NB06, _nb06_cell("def training_step("), chunk_batch=chunk_batch,
                                  memdec_loss=memdec_loss)["training_step"]

    def fresh():
        torch.manual_seed(0)
        return TokenMemoryDecoder.from_store(store, len(tok), tok.bos_token_id, dim=16,
                                             n_layers=2, n_heads=4, context=16,
                                             dropout=0.0).train()
    mine, ref = fresh(), fresh()
    chunks = chunk_plan(store, 16, overlap=4)[:3]
    loss, kl, ce = training_step(mine, torch.optim.SGD(mine.parameters(), lr=0.5), store,
                                 targets, chunks, 0.3)
    ids, rows = chunk_batch(store, chunks, 16, tok.bos_token_id)
    keep = rows >= 0
    r = rows[keep]
    want = memdec_loss(ref(ids)[torch.from_numpy(keep)], targets.ids[r], targets.probs[r],
                       np.asarray(store.values)[r], ref, 0.3)
    _assert_took_the_reference_step(mine, ref, (loss, kl, ce), want, fresh().head.weight)


def _nb06_cell(defines: str) -> str:
    """The id of notebook 06's one code cell that contains ``defines`` (e.g. "def f(")."""
    cells = json.loads((NOTEBOOKS / NB06).read_text())["cells"]
    found = [c["id"] for c in cells if c["cell_type"] == "code"
             and defines in "".join(c["source"])]
    assert len(found) == 1, f"{NB06}: expected one code cell with {defines!r}, found {len(found)}"
    return found[0]
