"""Hidden-state extraction (helpers.hidden), taught in notebook 01."""

import numpy as np
import pytest
import torch

from helpers.hidden import extract_keys, plan_windows, tokenize

TEXTS = [
    "the data subject shall have the right to obtain from the controller the erasure",
    "article 1 .",
    "personal data concerning him or her shall be erased without undue delay",
    "member states",
]


@pytest.mark.parametrize("n,window,overlap,bos", [
    (1, 8, 2, True), (5, 8, 2, True), (8, 8, 2, False), (9, 8, 2, True),
    (100, 8, 0, False), (100, 16, 13, True), (257, 256, 64, True)])
def test_windows_cover_every_target_exactly_once(n, window, overlap, bos):
    seen = []
    for start, end, first in plan_windows(n, window, overlap, bos):
        assert end - start + (1 if bos and start > 0 else 0) <= window
        assert first - start >= (overlap if start > 0 else 1) or start == 0
        seen += range(first, end)
    assert seen == list(range(1, n))


def test_windows_reject_overlap_that_leaves_no_room():
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(50, 8, 7, True)


def test_keys_equal_the_final_hidden_state_of_an_unbatched_forward(tiny):
    model, tok = tiny
    ex = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=3)
    for d, ids in enumerate(tokenize(tok, TEXTS)):
        out = model(torch.tensor([ids]), output_hidden_states=True)
        expect = out.hidden_states[-1][0, :-1].numpy()
        np.testing.assert_allclose(ex.keys[ex.doc == d], expect, atol=1e-5)


def test_values_are_the_next_tokens(tiny):
    model, tok = tiny
    ex = extract_keys(model, tok, TEXTS, window=64, overlap=8)
    for d, ids in enumerate(tokenize(tok, TEXTS)):
        assert ex.values[ex.doc == d].tolist() == ids[1:]
        assert ex.pos[ex.doc == d].tolist() == list(range(len(ids) - 1))


def test_length_sorting_and_batch_size_do_not_change_keys(tiny):
    model, tok = tiny
    a = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=1,
                     sort_by_length=False)
    b = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=4)
    np.testing.assert_allclose(a.keys, b.keys, atol=1e-5)


def test_sorting_cuts_the_padding_it_reports(tiny):
    model, tok = tiny
    texts = [" ".join(TEXTS[:n + 1]) for n in range(len(TEXTS))] * 2   # lengths vary
    runs = {sort: extract_keys(model, tok, texts, window=64, overlap=8, batch_size=2,
                               sort_by_length=sort) for sort in (False, True)}
    real = runs[True].tokens_processed
    assert runs[False].tokens_processed == real
    one = extract_keys(model, tok, texts, window=64, overlap=8, batch_size=1)
    assert one.tokens_computed == real                       # one row a batch: no padding
    assert real <= runs[True].tokens_computed < runs[False].tokens_computed


def test_bf16_autocast_keys_are_close_to_fp32_but_computed_in_bf16(tiny):
    model, tok = tiny
    texts = TEXTS + [" ".join(TEXTS * 3)]  # one window longer than an attention block
    ref = extract_keys(model, tok, texts, window=128, overlap=8).keys
    amp = extract_keys(model, tok, texts, window=128, overlap=8, autocast=torch.bfloat16)
    assert amp.keys.dtype == np.float32 and next(model.parameters()).dtype == torch.float32
    assert not np.array_equal(amp.keys, ref)  # the matmuls really ran in bf16
    cos = (ref * amp.keys).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(amp.keys, axis=1)
    assert cos.min() > 0.99


def test_windowed_key_sees_bos_plus_overlap_context(tiny):
    model, tok = tiny
    text = TEXTS[0]
    ids = tokenize(tok, [text])[0]
    ex = extract_keys(model, tok, [text], window=8, overlap=3)
    # the key for target t=10 comes from the window whose first target is 8:
    start, end, first = [p for p in plan_windows(len(ids), 8, 3, True) if p[2] <= 10 < p[1]][0]
    window_ids = [ids[0]] + ids[start:end]
    h = model(torch.tensor([window_ids]), output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(ex.keys[9], h[10 - 1 - start + 1].numpy(), atol=1e-5)


def test_lm_head_is_never_run(tiny):
    model, tok = tiny
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        extract_keys(model, tok, TEXTS)
    finally:
        hook.remove()
    assert calls == []


def test_layer_zero_returns_scaled_token_embeddings(tiny):
    model, tok = tiny
    ex = extract_keys(model, tok, TEXTS[:1], layer=0)
    ids = torch.tensor(tokenize(tok, TEXTS[:1])[0][:-1])
    emb = model.model.embed_tokens(ids).numpy()  # Gemma scales by sqrt(d)
    np.testing.assert_allclose(ex.keys, emb, atol=1e-5)


def test_empty_text_is_refused_with_advice(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="Text #1 is empty"):
        extract_keys(model, tok, ["article 1", "   "])


def test_keys_by_layer_stacks_embeddings_blocks_and_final_norm(tiny):
    from helpers.hidden import keys_by_layer
    model, tok = tiny
    keys, values, doc = keys_by_layer(model, tok, TEXTS, max_tokens=6, batch_size=3)
    assert keys.shape[0] == model.config.num_hidden_layers + 2
    ex = extract_keys(model, tok, [t for t in TEXTS], window=64, overlap=8)
    first6 = ex.pos < 5  # positions 0..4 predict tokens 1..5 of the first 6
    np.testing.assert_allclose(keys[-1], ex.keys[first6], atol=1e-5)
    assert values.tolist() == ex.values[first6].tolist()


def test_keys_by_layer_shows_the_last_block_raw_not_the_final_norm_twice(tiny):
    """transformers' hidden_states ends with norm(last block): the raw one must be caught."""
    from helpers.hidden import keys_by_layer
    model, tok = tiny
    keys, _, _ = keys_by_layer(model, tok, TEXTS, max_tokens=6, batch_size=3)
    last_block, final = torch.from_numpy(keys[-2]), torch.from_numpy(keys[-1])
    assert not torch.allclose(last_block, final, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last_block), final, atol=1e-5, rtol=1e-5)


def test_a_bidirectional_model_keeps_its_padding_mask(tiny):
    """Dropping the mask is only exact for causal attention: check both ways."""
    from conftest import make_model

    _, tok = tiny
    model = make_model(len(tok))
    model.config.use_bidirectional_attention = True
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    one = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=1)
    padded = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=4)
    np.testing.assert_allclose(one.keys, padded.keys, atol=1e-5)
    model.config.use_bidirectional_attention = False  # now the pads would leak in
    leaky = extract_keys(model, tok, TEXTS, window=64, overlap=8, batch_size=4)
    assert np.abs(leaky.keys - one.keys).max() > 1e-3
