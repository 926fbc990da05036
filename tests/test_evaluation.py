"""Cached held-out evaluation (helpers.evaluation)."""

import numpy as np
import pytest

from helpers import evaluation
from helpers.evaluation import heldout_eval

from helpers.corpus import format_record

TEXTS = [format_record("article 1", "the data", "the data subject shall have the right"),
         format_record("article 2", "erasure", "personal data shall be erased"),
         format_record("article 3", "delay", "without undue delay")]


def test_heldout_eval_is_computed_once_then_read_from_the_cache(tiny, data_dir, monkeypatch):
    model, tok = tiny
    first = heldout_eval(model, tok, TEXTS, "tiny")
    calls = []
    monkeypatch.setattr(evaluation, "base_target_probs",
                        lambda *a, **k: calls.append(1))
    again = heldout_eval(model, tok, TEXTS, "tiny")
    assert calls == []
    np.testing.assert_array_equal(first.p_base, again.p_base)
    np.testing.assert_array_equal(first.keys, again.keys)


def test_answer_mask_marks_only_tokens_after_the_answer_label(tiny, data_dir):
    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS[:1], "tiny")
    # word tokens: <bos> Title: article 1 Question: the data Answer: | the data subject ...
    answer_start = 8
    assert ev.answer.tolist() == [int(p) + 1 >= answer_start for p in ev.pos]
    assert ev.answer.any() and not ev.answer.all()


def test_valid_and_test_halves_split_articles_not_tokens(tiny, data_dir):
    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS, "tiny")
    assert set(ev.doc[ev.valid]) == {0, 2} and set(ev.doc[ev.test]) == {1}


def test_blend_curves_at_alpha_zero_is_the_base_perplexity(tiny, data_dir):
    import torch

    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.evaluation import blend_curves
    from helpers.knn import perplexity

    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS, "tiny")
    torch.manual_seed(0)
    dec = MemoryDecoder(DecoderConfig(key_dim=32, base_vocab_size=len(tok), dim=32,
                                      n_heads=4, n_layers=1, head="full")).eval()
    rows = np.ones(len(ev.values), bool)
    curves = blend_curves(model, dec, ev, rows, [0.0, 0.5, 1.0], chunk=3)
    for mode in ("logits", "probs"):
        assert np.isclose(curves[mode][0], perplexity(ev.p_base), rtol=1e-4)
    assert np.isclose(curves["logits"][2], curves["probs"][2], rtol=1e-4)  # both = p_dec
    assert not np.isclose(curves["logits"][1], curves["probs"][1], rtol=1e-4)


@pytest.mark.parametrize("head", ["full", "store"])
def test_blend_curves_agree_with_blend_logits_token_by_token(tiny, data_dir, store_index,
                                                            head):
    import torch

    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.evaluation import blend_curves
    from helpers.knn import head_logits, perplexity
    from helpers.sampling import blend_logits
    from helpers.train_decoder import window_batch

    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS, "tiny")
    torch.manual_seed(0)
    dec = MemoryDecoder(DecoderConfig.from_store(store_index[0], len(tok), dim=32, n_heads=4,
                                                 n_layers=1, window=2, head=head)).eval()
    rows = ev.doc % 2 == 0
    got = blend_curves(model, dec, ev, rows, [0.3, 0.8], chunk=4)
    r = np.flatnonzero(rows)
    x, pad = window_batch(ev.keys, ev.doc, r, 2)
    mem, z = dec.log_probs_full(x, pad).detach(), head_logits(model, ev.keys[r])
    y = torch.as_tensor(ev.values[r])[:, None]
    for mode in ("logits", "probs"):
        want = [perplexity(blend_logits(z, mem, a, mode).gather(1, y)[:, 0].exp().numpy())
                for a in (0.3, 0.8)]
        np.testing.assert_allclose(got[mode], want, rtol=1e-4)


@pytest.mark.parametrize("head", ["full", "store"])
def test_one_scoring_pass_gives_the_curves_of_any_subset_and_the_gate_inputs(
        tiny, data_dir, store_index, head):
    """Notebook 04 scores every held-out row once and reads the validation curve,
    the test figures and the gate's inputs from that pass: each must equal what
    the separate helpers compute on their own."""
    import torch

    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.evaluation import blend_curves, blend_perplexities, score_rows
    from helpers.gate import gate_inputs

    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS, "tiny")
    torch.manual_seed(0)
    dec = MemoryDecoder(DecoderConfig.from_store(store_index[0], len(tok), dim=32, n_heads=4,
                                                 n_layers=1, window=2, head=head)).eval()
    grid = [0.0, 0.4, 1.0]
    scores = score_rows(model, dec, ev.keys, ev.doc, ev.values, grid, chunk=5, progress=False)
    for mask in (ev.valid, ev.test):
        alone = blend_curves(model, dec, ev, mask, grid, chunk=3, progress=False)
        shared = blend_perplexities(scores, mask)
        for mode in ("logits", "probs"):
            np.testing.assert_allclose(shared[mode], alone[mode], rtol=1e-5)
    assert not np.allclose(blend_perplexities(scores, ev.valid)["probs"],
                           blend_perplexities(scores, ev.test)["probs"])
    inputs = gate_inputs(model, dec, ev.keys, ev.doc, ev.values, chunk=4, progress=False)
    for k in ("features", "p_base", "p_dec"):
        np.testing.assert_allclose(scores[k], inputs[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["p_base"], ev.p_base, rtol=1e-5)
    # rows as indices or as a mask: the same rows
    by_index = score_rows(model, dec, ev.keys, ev.doc, ev.values, grid,
                          rows=np.flatnonzero(ev.test), progress=False)
    np.testing.assert_allclose(blend_perplexities(by_index)["logits"],
                               blend_perplexities(scores, ev.test)["logits"], rtol=1e-5)
    with pytest.raises(ValueError, match="no scored rows"):
        blend_perplexities(by_index, ev.valid)


def test_sparse_logit_blend_equals_the_dense_one_at_every_alpha():
    """score_rows's shortcut for a store-headed decoder (the memory is the floor outside
    its vocabulary, so that part of the normaliser is one scaled exp-sum of the base
    logits) gives the dense mixture's -log p(y), also where the base logits are far
    apart, the memory's top token is outside the base's top, or a row of the memory
    sits at the floor."""
    import torch

    from helpers.evaluation import _logit_blend_nll, _logit_blend_nll_sparse

    g = torch.Generator().manual_seed(0)
    C, V, floor = 6, 500, -30.0
    vocab = torch.tensor(sorted(torch.randperm(V, generator=g)[:40].tolist()))
    z = 8 * torch.randn(C, V, generator=g)
    z[0, 3] = 60.0                                                   # one dominant base logit
    mem_in = torch.log_softmax(3 * torch.randn(C, len(vocab), generator=g), -1)
    mem_in[1] = floor                                                # a memory at the floor
    dense = torch.full((C, V), floor)
    dense[:, vocab] = mem_in.clamp(min=floor)
    y = torch.randint(0, V, (C, 1), generator=g)
    y[2, 0] = vocab[5]                                               # a target inside vocab
    alphas = np.array([0.0, 0.25, 0.6, 1.0])
    z_y, mem_y, lse_z = z.gather(1, y)[:, 0], dense.gather(1, y)[:, 0], torch.logsumexp(z, -1)
    want, got = np.zeros((C, 4)), np.zeros((C, 4))
    _logit_blend_nll(want, alphas, z.clone(), z_y, lse_z, dense, mem_y)
    _logit_blend_nll_sparse(got, alphas, z.clone(), z.max(-1, keepdim=True).values, z_y, lse_z,
                            mem_in.clamp(min=floor), vocab, mem_y, floor)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.isfinite(got).all() and (got > 0).all()


def test_token_rows_score_each_row_from_its_own_tokens_and_the_base_head(tiny, data_dir,
                                                                        store_index):
    """Notebook 06's gate reads the token decoder the way notebook 04's reads the hidden-state
    one: for every held-out row, the base head's logits and the decoder's distribution
    after that row's tokens give p_base, p_dec, the gate's signals and the logit blend of
    each α, in ``rows`` order.  The decoder reads each text in chunks of its context, as
    in training (``token_target_probs``); a row in a text's first chunk has read its whole
    text so far, which ``token_windows`` gives one row at a time."""
    import torch

    from helpers.evaluation import score_token_rows
    from helpers.gate import gate_features
    from helpers.knn import head_logits
    from helpers.sampling import blend_logits
    from helpers.token_decoder import TokenMemoryDecoder
    from helpers.train_token_decoder import token_target_probs, token_windows

    model, tok = tiny
    ev = heldout_eval(model, tok, TEXTS, "tiny")
    torch.manual_seed(0)
    dec = TokenMemoryDecoder.from_store(store_index[0], len(tok), tok.bos_token_id, dim=32,
                                        n_layers=1, n_heads=4, context=6, dropout=0.0).eval()
    rows = np.flatnonzero(ev.doc % 2 == 0)[::-1]           # any order: kept in the result
    got = score_token_rows(model, dec, ev, [0.0, 0.4], rows=rows, chunk=3, batch_chunks=2,
                           overlap=2, progress=False)
    assert got["rows"].tolist() == rows.tolist()
    np.testing.assert_allclose(got["p_dec"], token_target_probs(dec, ev, overlap=2)[rows],
                               rtol=1e-4, atol=1e-12)
    first = ev.pos[rows] < 6                                # rows of a text's first chunk
    assert 0 < first.sum() < len(rows)                      # later chunks were read too
    rows = rows[first]
    got = {k: got[k][first] for k in ("p_base", "features", "logits_nll")}
    ids, at = token_windows(ev, rows, 6, tok.bos_token_id)                 # (R, 6), (R,)
    with torch.no_grad():
        mem = dec.log_probs_full(dec(ids)[torch.arange(len(rows)), at])   # (R, V), floored
        small = torch.log_softmax(dec(ids)[torch.arange(len(rows)), at].float(), -1)
    z = head_logits(model, ev.keys[rows])
    y = torch.as_tensor(ev.values[rows])[:, None]
    np.testing.assert_allclose(got["p_base"], torch.softmax(z, -1).gather(1, y)[:, 0],
                               rtol=1e-4)
    np.testing.assert_allclose(got["features"], gate_features(z, small, vocab=dec.vocab),
                               rtol=1e-4, atol=1e-5)
    want = -blend_logits(z, mem, 0.4, "logits").gather(1, y)[:, 0].double().numpy()
    np.testing.assert_allclose(got["logits_nll"][:, 1], want, rtol=1e-4)
    assert not np.allclose(got["logits_nll"][:, 1], got["logits_nll"][:, 0])
    twice = score_token_rows(model, dec, ev, [0.4], rows=np.r_[rows[:2], rows[:2]], chunk=3,
                             batch_chunks=2, overlap=2, progress=False)   # a row asked twice
    np.testing.assert_array_equal(twice["p_dec"][:2], twice["p_dec"][2:])
    np.testing.assert_array_equal(twice["logits_nll"][:2], got["logits_nll"][:2, 1:])
