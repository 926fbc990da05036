"""The token-level Memory Decoder (helpers.token_decoder, helpers.train_token_decoder), issue 18."""

import json

import numpy as np
import pytest
import torch

from helpers.decoder import DecoderConfig, DecoderMismatch, MemoryDecoder, load_decoder, \
    save_decoder
from helpers.token_decoder import (TokenDecoderConfig, TokenMemoryDecoder,
                                   load_token_decoder, save_token_decoder)
from helpers.train_decoder import memdec_loss, precompute_knn_targets
from helpers.train_token_decoder import (chunk_batch, chunk_plan, token_target_probs,
                                         token_windows, train_token_decoder)
from tests.conftest import STORE_TEXTS, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.0}


def small_decoder(vocab_ids=(3, 5, 7, 9), base_vocab_size=100, context=16, seed=0, **knobs):
    torch.manual_seed(seed)
    return TokenMemoryDecoder(TokenDecoderConfig(
        base_vocab_size=base_vocab_size, vocab_ids=list(vocab_ids), bos_id=1,
        context=context, **{**SMALL, **knobs})).eval()


@pytest.fixture(scope="module")
def tiny_store(store_index):
    """(store, targets, tokenizer): the conftest store of the tiny model, kNN targets, k=8."""
    store, index = store_index
    return store, precompute_knn_targets(store, index, k=8, temperature=10.0), make_tokenizer()


def store_decoder(store, tok, seed=0, **knobs):
    torch.manual_seed(seed)
    return TokenMemoryDecoder.from_store(store, len(tok), tok.bos_token_id,
                                         **{**SMALL, "context": 16, **knobs})


def test_forward_gives_logits_over_the_compact_vocabulary_at_every_position():
    decoder = small_decoder()
    logits = decoder(torch.tensor([[1, 3, 5], [7, 9, 3]]))
    assert logits.shape == (2, 3, 5)  # vocab 3, 5, 7, 9 plus the BOS 1; no unknown column


def test_ids_outside_the_vocabulary_share_the_unknown_id_even_out_of_range():
    decoder = small_decoder()
    got = decoder.compact(torch.tensor([1, 3, 9, 4, 99, 100, 262144, -1, -7]))
    assert got.tolist() == [0, 1, 4, 5, 5, 5, 5, 5, 5]
    edges = small_decoder(vocab_ids=(0, 3, 99))  # ids 0 and 99 known: -1, 100 still not
    assert edges.compact(torch.tensor([0, 99, 100, -1])).tolist() == [0, 3, 4, 4]
    assert decoder.head_index(torch.tensor([3, 4, 100, -1])).tolist() == [1, -1, -1, -1]
    decoder(torch.tensor([[1, 100, -3, 262144]]))  # no index error


def test_a_later_token_never_changes_earlier_logits():
    decoder = small_decoder()
    a = decoder(torch.tensor([[1, 3, 5, 7, 9]]))
    b = decoder(torch.tensor([[1, 3, 5, 9, 3]]))
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_kv_cached_steps_equal_the_full_forward():
    decoder = small_decoder()
    ids = torch.tensor([[1, 3, 5, 7, 50, 9, 3, 5], [1, 9, 9, 7, 3, 3, 5, 1]])
    full = decoder(ids)                                     # (2, 8, V)
    logits, cache = decoder.step(ids[:, :3])                # the prompt at once
    torch.testing.assert_close(logits, full[:, 2])
    for t in range(3, 6):                                   # then one token at a time
        logits, cache = decoder.step(ids[:, t:t + 1], cache)
        torch.testing.assert_close(logits, full[:, t])
    logits, cache = decoder.step(ids[:, 6:8], cache)        # several new tokens at once
    torch.testing.assert_close(logits, full[:, 7])


def test_reading_past_the_context_is_refused_with_advice():
    decoder = small_decoder(context=4)
    with pytest.raises(ValueError, match="at most 4 positions.*last 4 tokens"):
        decoder(torch.ones(1, 5, dtype=torch.long))
    _, cache = decoder.step(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 4"):
        decoder.step(torch.ones(1, 1, dtype=torch.long), cache)


def test_config_refuses_heads_that_do_not_divide_dim():
    with pytest.raises(ValueError, match="not divisible.*pick n_heads"):
        TokenDecoderConfig(base_vocab_size=10, vocab_ids=[1], dim=30, n_heads=4)


def test_memdec_loss_trains_the_token_decoder_unchanged():
    decoder = small_decoder()
    logits = decoder(torch.tensor([[1, 3, 5]]))[0]          # (3, V): one row per position
    ids = torch.tensor([[3, 5, -1], [7, -1, -1], [9, 3, 5]])
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    loss, kl, ce = memdec_loss(logits, ids, probs, torch.tensor([3, 7, 5]), decoder, 0.5)
    logq = torch.log_softmax(logits, -1)
    col = decoder.head_index(ids)
    want_kl = sum(float(p * (np.log(p) - logq[i, col[i, j]].item()))
                  for i in range(3) for j in range(3) if (p := float(probs[i, j])) > 0) / 3
    assert kl.item() == pytest.approx(want_kl, rel=1e-5)
    with pytest.raises(ValueError, match="not in the decoder's head vocabulary"):
        memdec_loss(logits, ids, probs, torch.tensor([3, 7, 4]), decoder, 0.5)


def test_token_windows_hold_each_rows_text_up_to_its_position(tiny_store):
    store, _, tok = tiny_store
    texts = [tok(t)["input_ids"] for t in STORE_TEXTS]
    rows = np.arange(len(store))
    ids, at = token_windows(store, rows, context=8, bos_id=tok.bos_token_id)
    assert ids.shape == (len(store), 8)
    for r in rows:
        text, p = texts[store.doc[r]], int(store.pos[r])
        want = text[max(0, p - 7):p + 1]                    # the last <= 8 tokens up to p
        assert ids[r, :at[r] + 1].tolist() == want
        assert (ids[r, at[r] + 1:] == -1).all()             # padding after the target
        assert text[p + 1] == store.values[r]               # and row r predicts the next
    assert texts[0][0] == tok.bos_token_id                  # why bos_id is position 0


def test_chunks_cover_every_row_once_and_agree_with_token_windows(tiny_store):
    store, _, tok = tiny_store
    plan = chunk_plan(store, context=16, overlap=4)
    ids, rows = chunk_batch(store, plan, 16, tok.bos_token_id)
    assert np.array_equal(np.sort(rows[rows >= 0]), np.arange(len(store)))
    b, t = np.argwhere(rows >= 0)[len(store) - 3]           # a target in a later chunk
    r = rows[b, t]
    window, at = token_windows(store, [r], 16, tok.bos_token_id)
    assert ids[b, t] == window[0, at[0]]                    # same token read at that row
    assert ids[b, :t + 1].tolist()[-4:] == window[0, :at[0] + 1].tolist()[-4:]


def test_a_context_of_64_or_less_trains_and_scores_with_the_default_overlap(tiny_store):
    """Notebook 06's knob CONTEXT = 64: the default overlap is a quarter of the context
    (64 of 256), never the whole of it."""
    store, targets, tok = tiny_store
    assert np.array_equal(chunk_plan(store, 256), chunk_plan(store, 256, overlap=64))
    plan = chunk_plan(store, 8)
    assert np.array_equal(plan, chunk_plan(store, 8, overlap=2)) and len(plan) > 3
    decoder = store_decoder(store, tok, context=8)
    train_token_decoder(decoder, store, targets, bos_id=tok.bos_token_id, epochs=1,
                        max_steps=2, progress=False)
    assert np.isfinite(token_target_probs(decoder, store)).all()


def test_a_batch_is_as_wide_as_its_longest_chunk_and_logits_do_not_change(tiny_store):
    store, _, tok = tiny_store
    plan = chunk_plan(store, context=24, overlap=4)
    lengths = plan[:, 3] - plan[:, 1]
    short = plan[lengths < lengths.max()][:2]               # chunks shorter than the longest
    assert len(short) == 2
    ids, rows = chunk_batch(store, short, 24, tok.bos_token_id)
    assert ids.shape == rows.shape == (2, (short[:, 3] - short[:, 1]).max())
    assert ids.shape[1] < 24
    assert chunk_batch(store, plan, 24, tok.bos_token_id)[0].shape[1] == lengths.max()
    decoder = store_decoder(store, tok, context=24).eval()
    padded = torch.full((2, 24), -1)                        # the same chunks padded to 24
    padded[:, :ids.shape[1]] = ids
    with torch.no_grad():
        assert torch.allclose(decoder(ids), decoder(padded)[:, :ids.shape[1]], atol=1e-5)


def test_a_few_training_steps_lower_the_loss(tiny_store):
    store, targets, tok = tiny_store
    decoder = store_decoder(store, tok)
    history = train_token_decoder(decoder, store, targets, epochs=12, batch_size=4, lr=3e-3,
                                  overlap=4, progress=False)
    loss = history["loss"]
    assert history["stopped"] is None and not decoder.training
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:3])


def test_token_target_probs_read_the_true_token_of_every_row(tiny_store):
    store, _, tok = tiny_store
    decoder = store_decoder(store, tok).eval()
    p = token_target_probs(decoder, store, overlap=4)
    r = int(np.flatnonzero(store.doc == store.doc[-1])[10])  # pos 10: in the first chunk,
    ids, at = token_windows(store, [r], 16, tok.bos_token_id)  # so the same tokens are read
    logp = torch.log_softmax(decoder(ids)[0, at[0]], -1)
    want = logp[decoder.head_index(int(store.values[r]))].exp().item()
    assert p.shape == (len(store),) and np.isfinite(p).all()
    assert p[r] == pytest.approx(want, rel=1e-4)


def test_save_and_load_round_trip(tiny_store, tmp_path):
    store, _, tok = tiny_store
    decoder = store_decoder(store, tok, seed=3)
    save_token_decoder(decoder, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["kind"] == "token" and config["tokenizer_fingerprint"]
    loaded = load_token_decoder(tmp_path / "tok", tokenizer=tok, store=store)
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    torch.testing.assert_close(loaded(ids), decoder.eval()(ids))


def test_another_tokenizer_is_refused_naming_the_model_it_was_trained_for(tiny_store,
                                                                          tmp_path):
    store, _, tok = tiny_store
    save_token_decoder(store_decoder(store, tok), tmp_path / "tok")
    other = make_tokenizer()
    other.add_tokens(["brandnew"])
    with pytest.raises(DecoderMismatch, match="tokenizer of 'tiny-gemma'.*train a token"):
        load_token_decoder(tmp_path / "tok", tokenizer=other)


def test_a_hidden_state_checkpoint_is_refused_as_a_token_decoder(tmp_path):
    hidden = MemoryDecoder(DecoderConfig(key_dim=8, base_vocab_size=20, dim=8, n_heads=2,
                                         n_layers=1, vocab_ids=[1, 2]))
    save_decoder(hidden, tmp_path / "hidden")
    with pytest.raises(DecoderMismatch, match="hidden-state.*load_decoder"):
        load_token_decoder(tmp_path / "hidden")
    assert load_decoder(tmp_path / "hidden").config.key_dim == 8  # still fine as itself


def test_a_token_checkpoint_is_refused_as_a_hidden_state_decoder(tmp_path):
    save_token_decoder(small_decoder(), tmp_path / "tok")
    with pytest.raises(DecoderMismatch, match="token-level.*load_token_decoder"):
        load_decoder(tmp_path / "tok")


def test_a_store_without_its_first_token_is_refused_with_advice(tiny_store):
    store, targets, tok = tiny_store
    with pytest.raises(ValueError, match="bos_id=tokenizer.bos_token_id"):
        token_windows(store, [0], 8, bos_id=None)


# --- generate(mode="memdec") with a token-level decoder ----------------------------------

def decoder_greedy(decoder, ids):
    """The token decoder's greedy base id after ``ids``, from a full forward (no cache)."""
    with torch.no_grad():
        return int(decoder.vocab[decoder(torch.tensor([ids]))[0, -1].argmax()])


def test_generate_reads_the_token_decoders_window_with_its_own_cache(tiny, tiny_store):
    """α = 1: each token is the decoder's greedy choice over the ids it has read; with
    context 8 the prompt (10 tokens) is read from its last 8, and when the cache is full
    the decoder starts again on the last 4 tokens."""
    from helpers.sampling import generate
    model, tok = tiny
    store, _, _ = tiny_store
    decoder = store_decoder(store, tok, context=8).eval()
    prompt = "the data subject shall have the right to obtain"
    steps = list(generate(model, tok, prompt, mode="memdec", decoder=decoder, alpha=1.0,
                          temperature=0, top_k=None, max_new_tokens=12))
    ids = tok(prompt)["input_ids"]
    read = min(len(ids), 8)                      # positions in the decoder's cache
    restarts = 0
    for step in steps:
        assert step.token_id == step.memory_top_id == decoder_greedy(decoder, ids[-read:])
        ids.append(step.token_id)
        read += 1
        if read > 8:
            read, restarts = 4, restarts + 1
    assert len(steps) == 12 and restarts >= 2   # the slide was exercised


def test_one_token_decoder_serves_two_models_that_share_the_tokenizer(tiny, tiny_store):
    """Plug and play: at α = 1 the answer is the memory's alone, whatever the base model;
    at α = 0 it is each base model's own."""
    from helpers.sampling import generate_text
    from tests.conftest import make_model
    model, tok = tiny
    other = make_model(len(tok), seed=1)          # same tokenizer, other weights
    decoder = store_decoder(tiny_store[0], tok).eval()
    kw = dict(mode="memdec", decoder=decoder, temperature=0, top_k=None, max_new_tokens=6)
    prompt = "the data subject"
    assert generate_text(model, tok, prompt, alpha=1.0, **kw)[0] == \
        generate_text(other, tok, prompt, alpha=1.0, **kw)[0]
    for m in (model, other):
        assert generate_text(m, tok, prompt, alpha=0.0, **kw)[0] == \
            generate_text(m, tok, prompt, max_new_tokens=6, temperature=0, top_k=None)[0]


def test_generate_refuses_a_token_decoder_of_another_tokenizer(tiny, tiny_store):
    from helpers.sampling import generate
    model, tok = tiny
    decoder = store_decoder(tiny_store[0], tok).eval()
    decoder.config.tokenizer_fingerprint = "0123456789abcdef"
    with pytest.raises(ValueError, match="tokenizer of .*ids mean other words"):
        generate(model, tok, "the data", mode="memdec", decoder=decoder, alpha=0.5, top_k=None)
    decoder.config.tokenizer_fingerprint = None
    with pytest.raises(ValueError, match="training mode"):
        generate(model, tok, "the data", mode="memdec", decoder=decoder.train(), alpha=0.5,
                 top_k=None)


def test_the_chat_panel_answers_with_a_token_decoder_and_reports_its_influence(tiny, tiny_store):
    """Mode "memdec" with the token-level memory: an answer, and the influence note that
    compares it with the base model's greedy tokens (Step.key is the last hidden state)."""
    from helpers.chat import ChatPanel
    decoder = store_decoder(tiny_store[0], tiny[1]).eval()
    panel = ChatPanel(*tiny, decoder=decoder, mode="memdec", alpha=1.0, temperature=0,
                      top_k=10, max_new_tokens=5)
    assert panel.send("the data subject") is not None, panel.status.value
    assert panel.wait(60), "the answer did not finish"
    assert panel.history[-1][1] and "Done" in panel.status.value
    assert any("Memory influence" in note for note in panel.last_notes)


def test_check_tokenizer_refuses_another_fingerprint_and_a_head_too_small():
    from helpers.token_decoder import check_tokenizer

    config = small_decoder().config
    config.tokenizer_fingerprint, config.base_model_name = "abc", "tiny-gemma"
    check_tokenizer(config, "abc", "the tokenizer", vocab_size=100)  # the same: accepted
    check_tokenizer(config, None, "the tokenizer")                    # unknown: not checked
    with pytest.raises(DecoderMismatch, match="the second model has fingerprint xyz"):
        check_tokenizer(config, "xyz", "the second model")
    with pytest.raises(DecoderMismatch, match="ids up to 9.*head has 8 rows"):
        check_tokenizer(config, "abc", "the model", vocab_size=8)


def test_second_model_auto_finds_the_saved_fine_tuned_copy_only_when_there(tmp_path,
                                                                             monkeypatch):
    from helpers.token_decoder import second_model_path

    monkeypatch.setenv("MEMDEC_DATA_DIR", str(tmp_path))
    assert second_model_path("auto", "quick") is None
    assert second_model_path(None) is None
    assert second_model_path("google/gemma-3-1b-pt") == "google/gemma-3-1b-pt"
    folder = tmp_path / "artifacts" / "quick" / "finetuned"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert second_model_path("auto", "quick") == str(folder)



# --- a pretrained start: the base model's first layers (trunk "base") --------------------

def base_start(tiny, tiny_store, n_layers=1, context=16):
    model, tok = tiny
    return TokenMemoryDecoder.from_base_model(model, tiny_store[0], tok.bos_token_id,
                                              n_layers=n_layers, context=context).eval()


def test_a_base_start_computes_the_base_models_first_layers_then_its_norm_and_head(
        tiny, tiny_store):
    """Untrained, it is the base model cut after ``n_layers`` layers: its hidden state
    there, the final norm, the tied head's rows of the store's tokens."""
    model, tok = tiny
    decoder = base_start(tiny, tiny_store, n_layers=1)
    assert decoder.config.trunk == "base" and decoder.config.n_layers == 1
    assert decoder.config.dim == model.config.hidden_size
    ids = torch.tensor([[tok.bos_token_id] + tok("the data subject shall")["input_ids"][1:]])
    with torch.no_grad():
        h = model.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        want = torch.nn.functional.linear(model.model.norm(h),
                                          model.get_input_embeddings().weight)
        got = decoder(ids)
    assert set(ids[0].tolist()) <= set(decoder.config.vocab_ids)  # no unknown id read
    torch.testing.assert_close(got, want[..., decoder.vocab], atol=1e-5, rtol=1e-5)


def test_a_base_start_copies_the_weights_and_training_leaves_the_base_model_unchanged(
        tiny, tiny_store):
    model, tok = tiny
    store, targets, _ = tiny_store
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = base_start(tiny, tiny_store)
    history = train_token_decoder(decoder, store, targets, epochs=12, batch_size=4, lr=1e-2,
                                  overlap=4, progress=False)
    assert np.mean(history["loss"][-3:]) < 0.7 * np.mean(history["loss"][:3])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_base_starts_kv_cached_steps_equal_the_full_forward_and_the_context_is_kept(
        tiny, tiny_store):
    from helpers.token_decoder import cache_length
    decoder = base_start(tiny, tiny_store, n_layers=2, context=8)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        full = decoder(ids)
        logits, cache = decoder.step(ids[:, :3])
        worst = (logits - full[:, 2]).abs().max()
        for t in range(3, 8):
            logits, cache = decoder.step(ids[:, t:t + 1], cache)
            worst = max(worst, (logits - full[:, t]).abs().max())
        assert worst < 1e-5 and cache_length(cache) == 8
        with pytest.raises(ValueError, match="reads at most 8 positions"):
            decoder.step(ids[:, :1], cache)


def test_a_base_start_saves_loads_and_generates_without_the_base_model(tiny, tiny_store,
                                                                        tmp_path):
    """The checkpoint holds the truncated config: loading needs no base model, and the
    memory still plugs into a second model with the same tokenizer."""
    from helpers.sampling import generate_text
    from tests.conftest import make_model
    model, tok = tiny
    decoder = base_start(tiny, tiny_store)
    save_token_decoder(decoder, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["trunk"] == "base" and config["trunk_config"]["num_hidden_layers"] == 1
    loaded = load_token_decoder(tmp_path / "tok", tokenizer=tok, store=tiny_store[0])
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    torch.testing.assert_close(loaded(ids), decoder(ids))
    other = make_model(len(tok), seed=1)
    kw = dict(mode="memdec", decoder=loaded, alpha=1.0, temperature=0, top_k=None,
              max_new_tokens=5)
    assert generate_text(model, tok, "the data subject", **kw)[0] == \
        generate_text(other, tok, "the data subject", **kw)[0]


def test_a_base_start_refuses_more_layers_than_the_model_has_and_a_bad_trunk(tiny,
                                                                              tiny_store):
    with pytest.raises(ValueError, match="n_layers"):
        base_start(tiny, tiny_store, n_layers=3)          # the tiny model has 2
    with pytest.raises(ValueError, match="trunk must be one of"):
        TokenDecoderConfig(base_vocab_size=100, vocab_ids=[3], trunk="gemma")
    with pytest.raises(ValueError, match="from_base_model"):
        TokenDecoderConfig(base_vocab_size=100, vocab_ids=[3], trunk="base")


def test_a_base_start_works_for_gemma_1_the_hub_default_google_gemma_2b(tiny_store):
    """google/gemma-2b (Gemma 1, no layer_types, another model class) through the same code:
    the cut model's logits, and a checkpoint that loads without it."""
    from transformers import GemmaConfig, GemmaForCausalLM
    tok = tiny_store[2]
    torch.manual_seed(0)
    gemma1 = GemmaForCausalLM(GemmaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)).eval()
    decoder = TokenMemoryDecoder.from_base_model(gemma1, tiny_store[0], tok.bos_token_id,
                                                 n_layers=2, context=16).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("the data subject shall")["input_ids"][1:]])
    with torch.no_grad():
        h = gemma1.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        want = torch.nn.functional.linear(gemma1.model.norm(h),
                                          gemma1.get_input_embeddings().weight)
        torch.testing.assert_close(decoder(ids), want[..., decoder.vocab], atol=1e-5,
                                   rtol=1e-5)
    assert decoder.config.trunk_config["model_type"] == "gemma"


def test_a_gate_trained_for_the_token_decoder_weighs_each_generated_token(tiny, tiny_store):
    """Notebook 06's α gate: trained on token_gate_inputs, it sets α_t at every step of
    generate from the base logits and the token decoder's distribution, as in notebook
    04; another decoder is refused."""
    from helpers.gate import GateMismatch, gate_features, token_gate_inputs, train_gate
    from helpers.knn import base_target_probs
    from helpers.sampling import generate

    model, tok = tiny
    store, _, _ = tiny_store
    decoder = store_decoder(store, tok).eval()
    ex, p_base = base_target_probs(model, tok, list(STORE_TEXTS[:2]))
    inputs = token_gate_inputs(model, decoder, ex, chunk=3, progress=False)
    np.testing.assert_allclose(inputs["p_base"], p_base, rtol=1e-4)
    gate, _ = train_gate([inputs], steps=5, decoder=decoder)
    prompt = "the data subject"
    kw = dict(mode="memdec", temperature=0, top_k=10, max_new_tokens=5)
    steps = list(generate(model, tok, prompt, decoder=decoder, alpha=0.7, gate=gate,
                          adaptive=True, **kw))
    ids = tok(prompt)["input_ids"]
    for step in steps:
        with torch.no_grad():
            base = model(input_ids=torch.tensor([ids])).logits[:, -1]
            mem = torch.log_softmax(decoder(torch.tensor([ids]))[:, -1].float(), -1)
            want = 0.7 * gate(gate_features(base, mem, vocab=decoder.vocab))
        assert step.alpha == pytest.approx(float(want), abs=1e-4)
        ids = ids + [step.token_id]
    assert len({round(s.alpha, 6) for s in steps}) > 1  # it changes token by token
    with pytest.raises(GateMismatch, match="decoder"):
        generate(model, tok, prompt, decoder=store_decoder(store, tok, seed=1).eval(),
                 alpha=0.7, gate=gate, adaptive=True, **kw)
    from helpers.chat import ChatPanel
    panel = ChatPanel(model, tok, decoder=decoder, gate=gate, adaptive=True, mode="memdec",
                      alpha=1.0, temperature=0, top_k=10, max_new_tokens=4)
    assert panel.send(prompt) is not None, panel.status.value
    assert panel.wait(60), "the answer did not finish"
    assert any(note.startswith("Adaptive α: mean") for note in panel.last_notes), panel.last_notes


def test_the_panel_opens_either_kind_of_decoder_and_names_its_gate_folder(tiny, tiny_store,
                                                                          tmp_path):
    """Notebook 05's DECODER may name notebook 06's token decoder as well as notebook 03's
    decoder; each kind's α gate has its own folder, and adaptive mode without one says
    which notebook trains it."""
    from helpers.sampling import generate
    from helpers.token_decoder import GATE_FOLDERS, load_either_decoder

    model, tok = tiny
    store, _, _ = tiny_store
    token = store_decoder(store, tok)
    save_token_decoder(token, tmp_path / "token_decoder")
    loaded, kind = load_either_decoder(tmp_path / "token_decoder", tokenizer=tok, store=store)
    assert kind == "token" and isinstance(loaded, TokenMemoryDecoder)
    ids = torch.tensor([[1, 5]])
    torch.testing.assert_close(loaded(ids), token.eval()(ids))
    hidden = MemoryDecoder(DecoderConfig.from_store(store, len(tok), dim=32, n_heads=4,
                                                    n_layers=1, window=2))
    save_decoder(hidden, tmp_path / "memory_decoder")
    loaded, kind = load_either_decoder(tmp_path / "memory_decoder", tokenizer=tok, store=store)
    assert kind == "hidden" and isinstance(loaded, MemoryDecoder)
    assert GATE_FOLDERS == {"hidden": "alpha_gate", "token": "token_alpha_gate"}
    with pytest.raises(FileNotFoundError, match="no Memory Decoder checkpoint"):
        load_either_decoder(tmp_path / "missing")
    from helpers.token_decoder import decoder_kind
    assert decoder_kind(tmp_path / "missing") == "hidden"             # the hidden loader explains
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "model.safetensors").write_bytes(
        (tmp_path / "memory_decoder" / "model.safetensors").read_bytes())
    assert decoder_kind(tmp_path / "broken") == "hidden"
    with pytest.raises(ValueError, match="notebook 03|notebooks/03"):
        load_either_decoder(tmp_path / "broken")                     # not notebook 06's advice
    from helpers.gate import GateMismatch, load_gate, save_gate, train_gate
    gate, _ = train_gate([{"features": np.zeros((4, 7)), "p_base": np.full(4, 0.5),
                           "p_dec": np.full(4, 0.5)}], steps=1, decoder=token)
    save_gate(gate, tmp_path / "token_alpha_gate")
    with pytest.raises(GateMismatch, match="notebooks/06"):         # a stale gate: notebook 06
        load_gate(tmp_path / "token_alpha_gate", decoder=store_decoder(store, tok, seed=2))
    with pytest.raises(FileNotFoundError, match="notebooks/06"):
        load_gate(tmp_path / "no_gate", decoder=token)
    with pytest.raises(ValueError, match="notebooks/06.*token_alpha_gate"):
        generate(model, tok, "the data", mode="memdec", decoder=token, top_k=10, adaptive=True)
