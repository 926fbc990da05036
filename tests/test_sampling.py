"""Blended sampling and streamed generation (helpers.sampling), notebook 04."""

import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.hidden import extract_keys
from helpers.sampling import (Step, _Detokenizer, blend_logits, generate, generate_text,
                              original_style_step, sample_next)
from tests.conftest import make_model

PROMPT = "the data subject shall have the right to obtain"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_decoder(store, vocab_size, window=3, seed=0):
    torch.manual_seed(seed)
    config = DecoderConfig.from_store(store, vocab_size, dim=16, n_layers=1, n_heads=2,
                                      window=window, dropout=0.0)
    return MemoryDecoder(config).eval()


@pytest.fixture(scope="module")
def decoder(tiny, store_index):
    return make_decoder(store_index[0], tiny[0].config.vocab_size)


def count_forwards(model, caches=None):
    """A list that gets the input length of every forward of ``model``."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append(kwargs["input_ids"].shape[1])
        if caches is not None:
            caches.append(kwargs.get("cache", kwargs.get("past_key_values")))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def naive_greedy(model, tok, prompt, n):
    """Greedy tokens and final hidden states, a full forward over the prefix each step."""
    ids, tokens, states = tok(prompt)["input_ids"], [], []
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=torch.tensor([ids]), use_cache=False,
                        output_hidden_states=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            states.append(out.hidden_states[-1][0, -1])
            ids = ids + [tokens[-1]]
    return tokens, states


def gen(model, tok, prompt=PROMPT, **kw):
    """``generate`` with a top_k that fits the tiny 42-token vocabulary."""
    kw.setdefault("top_k", 10)
    return generate(model, tok, prompt, **kw)


def tokens(steps):
    return [s.token_id for s in steps]


# --- blend_logits -------------------------------------------------------------------

def random_pair(seed=0, V=50):
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(2, V, generator=g)
    memory = torch.log_softmax(3 * torch.randn(2, V, generator=g), dim=-1)
    return base, memory


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_blend_at_alpha_zero_is_the_base_model_and_at_one_the_memory(mode):
    base, memory = random_pair()
    assert torch.equal(blend_logits(base, memory, 0.0, mode), torch.log_softmax(base, -1))
    torch.testing.assert_close(blend_logits(base, memory, 1.0, mode), memory)


def test_probs_blend_is_the_naive_mixture_in_float64():
    base, memory = random_pair()
    p = 0.7 * torch.softmax(base.double(), -1) + 0.3 * memory.double().exp()
    got = blend_logits(base, memory, 0.3, "probs")
    torch.testing.assert_close(got.double(), p.log(), rtol=0, atol=1e-5)


def test_logits_blend_is_the_geometric_mixture_of_the_original():
    base, memory = random_pair()
    expect = torch.log_softmax(0.6 * base + 0.4 * memory, dim=-1)
    torch.testing.assert_close(blend_logits(base, memory, 0.4, "logits"), expect)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_blend_copes_with_a_memory_that_gives_tokens_probability_zero(mode):
    base, _ = random_pair()
    memory = torch.full_like(base, float("-inf"))
    memory[:, 3] = 0.0  # p_mem is one-hot on token 3 (kNN with one neighbour)
    half = blend_logits(base, memory, 0.5, mode)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.exp().sum(-1), torch.ones(2))
    assert torch.equal(blend_logits(base, memory, 1.0, mode), memory)


@pytest.mark.parametrize("mode", ["logits", "probs"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_a_sparse_memory_blends_like_the_same_memory_written_out_densely(mode, alpha):
    base, _ = random_pair()
    ids = torch.tensor([1, 4, 9, 17])                     # the memory's only tokens
    logp = torch.log_softmax(torch.randn(2, 4), -1)       # (B, K)
    dense = torch.full_like(base, float("-inf"))
    dense[:, ids] = logp
    torch.testing.assert_close(blend_logits(base, (ids, logp), alpha, mode),
                               blend_logits(base, dense, alpha, mode))
    # the generation loop passes the base log-probs it has already computed
    given = torch.log_softmax(base, -1)
    for memory in ((ids, logp), dense):
        torch.testing.assert_close(blend_logits(base, memory, alpha, mode, base_logp=given),
                                   blend_logits(base, memory, alpha, mode))
    for wrong in (given[0], given.numpy()):  # one row short, not a tensor
        with pytest.raises(ValueError, match="log_softmax.*Leave it out"):
            blend_logits(base, dense, alpha, mode, base_logp=wrong)


def test_blend_refuses_alpha_outside_zero_one():
    base, memory = random_pair()
    with pytest.raises(ValueError, match=r"between 0 .* and 1"):
        blend_logits(base, memory, 1.5)


# --- sample_next --------------------------------------------------------------------

def test_temperature_zero_is_greedy():
    logp = torch.log_softmax(torch.randn(4, 30), -1)
    assert torch.equal(sample_next(logp, temperature=0.0), logp.argmax(-1))


def test_top_k_one_is_greedy_whatever_the_temperature():
    logp = torch.log_softmax(torch.randn(4, 30), -1)
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 100.0):
        assert torch.equal(sample_next(logp, temperature, top_k=1, generator=g),
                           logp.argmax(-1))


def test_top_k_samples_only_the_k_most_likely_tokens():
    logp = torch.log_softmax(torch.arange(20.0) / 10, -1)  # token 19 most likely
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logp, 5.0, top_k=3, generator=g)) for _ in range(200)}
    assert drawn == {17, 18, 19}


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others():
    logp = torch.full((1000,), -np.log(1000.0))  # uniform over 1000 tokens

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(sample_next(logp, 1.0, None, g)) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


@pytest.mark.parametrize("temperature, top_k, message", [
    (-1.0, None, "temperature must be >= 0"),
    (1.0, -1, "top_k must be a whole number >= 1"),
    (1.0, 31, "larger than the vocabulary \\(30 tokens\\)"),
])
def test_sample_next_refuses_bad_settings(temperature, top_k, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(30), temperature, top_k)


# --- generate: bad inputs ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, "between 0"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_k": -3}, "top_k must be"),
    ({"top_k": 43}, "larger than the vocabulary \\(42 tokens\\)"),
    ({"mode": "beam"}, "mode must be one of"),
    ({"blend": "sum"}, "blend must be"),
    ({"mode": "memdec"}, "needs decoder="),
    ({"mode": "knn"}, "needs store="),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 511}, "leave room for a prompt"),
])
def test_generate_refuses_bad_settings_before_running_the_model(tiny, kwargs, message):
    model, tok = tiny
    calls, handle = count_forwards(model)
    try:
        with pytest.raises(ValueError, match=message):
            gen(model, tok, PROMPT, **kwargs)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_generate_refuses_an_empty_prompt(tiny, prompt):
    with pytest.raises(ValueError, match="type something"):
        gen(*tiny, prompt)


def test_generate_refuses_a_decoder_trained_for_another_vocabulary(tiny, store_index):
    wrong = make_decoder(store_index[0], vocab_size=50)
    with pytest.raises(ValueError, match="notebooks/03_train_memory_decoder"):
        gen(*tiny, PROMPT, mode="memdec", decoder=wrong)


def test_generate_refuses_a_decoder_in_training_mode(tiny, store_index):
    training = make_decoder(store_index[0], tiny[0].config.vocab_size).train()
    with pytest.raises(ValueError, match=r"decoder.eval\(\)"):
        gen(*tiny, PROMPT, mode="memdec", decoder=training)


def test_a_too_long_prompt_is_cut_from_the_left_or_refused(tiny):
    model, tok = tiny  # 512 positions
    prompt = " ".join(["data"] * 600)  # 601 tokens with BOS
    with pytest.raises(ValueError, match="cut 99 tokens"):
        gen(model, tok, prompt, max_new_tokens=10, truncate_left=False)
    steps = list(gen(model, tok, prompt, max_new_tokens=10, temperature=0))
    assert steps[0].truncated == 99 and all(s.truncated == 0 for s in steps[1:])


# --- generate: the KV cache and streaming ---------------------------------------------

def test_cached_generation_gives_the_greedy_tokens_of_a_no_cache_loop(tiny):
    model, tok = tiny
    expect, _ = naive_greedy(model, tok, PROMPT, 8)
    steps = list(gen(model, tok, PROMPT, temperature=0, max_new_tokens=8))
    assert tokens(steps) == expect


def test_each_steps_key_is_the_no_cache_final_hidden_state(tiny):
    model, tok = tiny
    _, states = naive_greedy(model, tok, PROMPT, 6)
    steps = list(gen(model, tok, PROMPT, temperature=0, max_new_tokens=6))
    for step, state in zip(steps, states, strict=True):
        torch.testing.assert_close(step.key, state, rtol=1e-5, atol=1e-5)


def test_the_first_key_is_the_datastore_key_of_the_last_prompt_position(tiny):
    model, tok = tiny
    step = next(iter(gen(model, tok, PROMPT, temperature=0)))
    # the key at a position does not depend on the token after it: any word will do
    ex = extract_keys(model, tok, [PROMPT + " data"])
    torch.testing.assert_close(step.key, torch.from_numpy(ex.keys[-1]),
                               rtol=1e-5, atol=1e-5)


def test_one_forward_per_new_token_each_reading_one_token(tiny):
    model, tok = tiny
    caches = []
    calls, handle = count_forwards(model, caches)
    try:
        steps = list(gen(model, tok, PROMPT, temperature=0, max_new_tokens=7))
    finally:
        handle.remove()
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert len(steps) == 7 and calls == [n_prompt] + [1] * 6
    assert caches[0] is None and all(isinstance(c, DynamicCache) for c in caches[1:])


def test_steps_are_yielded_as_soon_as_each_token_exists(tiny):
    model, tok = tiny
    calls, handle = count_forwards(model)
    try:
        stream = gen(model, tok, PROMPT, temperature=0, max_new_tokens=5)
        assert calls == []               # nothing runs before the first next()
        first = next(stream)
        assert isinstance(first, Step) and first.index == 0
        assert len(calls) == 1           # only the prompt's forward so far
        next(stream)
        assert len(calls) == 2
    finally:
        handle.remove()


def test_max_new_tokens_is_respected_and_marked_on_the_last_step(tiny):
    model, tok = tiny

    def forbid_eos(module, args, out):  # so that generation cannot end early
        out[..., tok.eos_token_id] -= 100.0

    handle = model.lm_head.register_forward_hook(forbid_eos)
    try:
        steps = list(gen(model, tok, PROMPT, temperature=1.0, top_k=None,
                         max_new_tokens=4))
    finally:
        handle.remove()
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert steps[-1].finished == "max_new_tokens" and steps[0].finished is None


def test_generation_stops_at_eos(tiny):
    model, tok = tiny
    eos = tok.eos_token_id

    def favour_eos(module, args, out):
        out[..., eos] += 100.0

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        steps = list(gen(model, tok, PROMPT, temperature=0, max_new_tokens=5))
    finally:
        handle.remove()
    assert tokens(steps) == [eos] and steps[0].finished == "eos" and steps[0].text == ""


def test_stop_event_stops_generation_between_tokens(tiny):
    model, tok = tiny
    stop = threading.Event()
    steps = []
    for step in gen(model, tok, PROMPT, temperature=0, max_new_tokens=20,
                         stop_event=stop):
        steps.append(step)
        if len(steps) == 2:
            stop.set()
    assert len(steps) == 2
    assert list(gen(model, tok, PROMPT, stop_event=stop)) == []


def test_the_same_seed_generates_the_same_text_and_another_seed_other_text(tiny):
    model, tok = tiny
    kw = {"temperature": 1.0, "top_k": None, "max_new_tokens": 10}
    a, b, c = (tokens(gen(model, tok, PROMPT, seed=s, **kw)) for s in (1, 1, 2))
    assert a == b and a != c


def test_generate_text_joins_the_pieces(tiny):
    model, tok = tiny
    text, steps = generate_text(model, tok, PROMPT, temperature=0, top_k=None,
                                max_new_tokens=6)
    assert text == "".join(s.text for s in steps)
    ids = tok(PROMPT)["input_ids"] + tokens(steps)
    full = tok.decode(ids, skip_special_tokens=True)
    assert (PROMPT + text).split() == full.split()


class ByteTokenizer:
    """Token id = one UTF-8 byte, so "é" takes two tokens."""

    def decode(self, ids, **kw):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_two_tokens_appears_once_it_is_complete():
    stream = _Detokenizer(ByteTokenizer(), list(b"caf"))
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_the_softcap_is_applied_once(tiny):
    _, tok = tiny
    model = make_model(len(tok), seed=1)
    model.config.final_logit_softcapping = 0.5  # logits squeezed into (-0.5, 0.5)
    step = next(iter(gen(model, tok, PROMPT, temperature=0)))
    raw = model.lm_head(step.key)
    capped = 0.5 * torch.tanh(raw / 0.5)
    expect = torch.log_softmax(capped, -1)[step.token_id]
    assert step.base_logprob == pytest.approx(float(expect), abs=1e-6)
    assert step.token_id == int(capped.argmax())


# --- generate with a memory ------------------------------------------------------------

def test_memdec_with_alpha_zero_reproduces_the_base_model(tiny, decoder):
    model, tok = tiny
    kw = {"temperature": 1.0, "top_k": 10, "max_new_tokens": 8, "seed": 3}
    base = list(gen(model, tok, PROMPT, **kw))
    mem = list(gen(model, tok, PROMPT, mode="memdec", alpha=0.0, decoder=decoder,
                        **kw))
    assert tokens(mem) == tokens(base)
    assert all(m.memory_top_id is not None for m in mem)


def decoder_argmax_no_cache(model, tok, decoder, ids):
    """The decoder's greedy token after ``ids``, from a full forward (no cache)."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), use_cache=False,
                       output_hidden_states=True).hidden_states[-1]  # (1, T, D)
        W = decoder.config.window
        x = hidden[:, -W:]                                        # T >= W here
        return int(decoder.log_probs_full(x).argmax())


def test_memdec_with_alpha_one_picks_the_decoders_greedy_token(tiny, decoder):
    model, tok = tiny
    steps = list(gen(model, tok, PROMPT, mode="memdec", alpha=1.0, decoder=decoder,
                          temperature=0, max_new_tokens=5))
    ids = tok(PROMPT)["input_ids"]
    for step in steps:
        assert step.token_id == step.memory_top_id
        assert step.token_id == decoder_argmax_no_cache(model, tok, decoder, ids)
        ids = ids + [step.token_id]


def test_memdec_window_is_padded_when_the_prompt_is_shorter(tiny, store_index):
    model, tok = tiny
    wide = make_decoder(store_index[0], model.config.vocab_size, window=8)
    step = next(iter(gen(model, tok, "data", mode="memdec", alpha=1.0, decoder=wide,
                              temperature=0)))  # 2 prompt tokens, window 8
    hidden = model(input_ids=torch.tensor([tok("data")["input_ids"]]),
                   output_hidden_states=True).hidden_states[-1]
    x = torch.zeros(1, 8, hidden.shape[-1])
    x[0, 6:] = hidden[0]
    pad = torch.arange(8)[None] < 6
    assert step.token_id == int(wide.log_probs_full(x, pad).argmax())


def test_original_style_step_agrees_with_the_cached_logits_blend(tiny, decoder):
    model, tok = tiny
    step = next(iter(gen(model, tok, PROMPT, mode="memdec", alpha=0.5,
                              blend="logits", decoder=decoder, temperature=0)))
    slow = original_style_step(model, torch.tensor([tok(PROMPT)["input_ids"]]),
                               decoder, alpha=0.5)
    assert slow.tolist() == [step.token_id]


def test_original_style_step_is_the_originals_loop_one_search_and_a_body_only_forward(
        tiny, decoder, store_index):
    model, tok = tiny
    store, index = store_index
    searches, heads = [], []

    class Counting:  # the index, counting its searches
        d = index.d

        def search(self, queries, k):
            searches.append((queries.shape, k))
            return index.search(queries, k)

    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: heads.append(args[0].shape[1]))
    try:
        ids = torch.tensor([tok(PROMPT)["input_ids"]])
        with_search = original_style_step(model, ids, decoder, 0.5, index=Counting(),
                                          values=store.values, k=4)
    finally:
        hook.remove()
    assert searches == [((1, index.d), 4)]
    assert heads == [ids.shape[1]]  # one LM head pass (every position); the query's is body only
    assert with_search.tolist() == original_style_step(model, ids, decoder, 0.5).tolist()


def test_knn_mode_reports_the_neighbours_documents(tiny, store_index):
    model, tok = tiny
    store, index = store_index
    steps = list(gen(model, tok, PROMPT, mode="knn", alpha=0.5, store=store,
                          index=index, k=4, temperature=0, max_new_tokens=4))
    for step in steps:
        assert len(step.doc_ids) == 4
        assert set(step.doc_ids) <= set(np.asarray(store.doc).tolist())
        assert step.memory_top_id in set(np.asarray(store.values).tolist())


def test_knn_mode_with_alpha_one_only_says_stored_next_tokens(tiny, store_index):
    model, tok = tiny
    store, index = store_index
    stored = set(np.asarray(store.values).tolist())
    steps = list(gen(model, tok, "commission", mode="knn", alpha=1.0, store=store,
                          index=index, k=8, temperature=1.0, top_k=None,
                          max_new_tokens=6))
    assert all(s.token_id in stored and np.isfinite(s.logprob) for s in steps)


# --- no_repeat_ngram: the repetition knob, the same in every mode ------------------------

def ngrams(ids, n):
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def test_banned_tokens_are_those_that_would_complete_an_earlier_ngram():
    from helpers.sampling import banned_tokens
    assert banned_tokens([5, 6, 7, 5, 6], 3) == [7]        # 5 6 7 seen: 7 may not follow 5 6
    assert banned_tokens([5, 6, 7, 5, 6, 8, 5, 6], 3) == [7, 8]
    assert banned_tokens([5, 6, 7, 8], 3) == []           # 7 8 never seen before
    assert banned_tokens([4, 4, 4], 1) == [4]             # n = 1: no token twice
    assert banned_tokens([5, 6, 5, 6], 0) == []           # 0 = off


@pytest.mark.parametrize("mode", ["base", "memdec", "knn"])
def test_no_repeat_ngram_keeps_every_ngram_of_a_greedy_answer_unique(tiny, store_index,
                                                                      decoder, mode):
    model, tok = tiny
    store, index = store_index
    kw = dict(mode=mode, decoder=decoder, store=store, index=index, k=4, alpha=0.5,
              temperature=0, max_new_tokens=40)
    loose = tokens(gen(model, tok, **kw))
    assert len(set(ngrams(loose, 2))) < len(ngrams(loose, 2))  # the tiny model loops
    tight = tokens(gen(model, tok, no_repeat_ngram=2, **kw))
    assert len(tight) > 10 and len(set(ngrams(tight, 2))) == len(ngrams(tight, 2))


@pytest.mark.parametrize("n", [-1, 2.5, "3", None])
def test_no_repeat_ngram_refuses_what_is_not_a_whole_number_from_zero(tiny, n):
    with pytest.raises((ValueError, TypeError), match="no_repeat_ngram"):
        gen(*tiny, no_repeat_ngram=n)


def test_cost_per_token_gives_each_mode_the_median_of_its_rounds(tiny, monkeypatch):
    import helpers.sampling as sampling

    model, tok = tiny
    timed = iter([5.0, 1.0, 9.0, 2.0, 6.0, 9.0])   # base, memory, base, memory, base, memory
    calls = []

    def fake_ms(stream):
        calls.append(len(list(stream)))             # the stream is generated for real
        return next(timed)
    monkeypatch.setattr(sampling, "ms_per_token", fake_ms)
    runs = {"base": dict(mode="base"), "memory": dict(mode="base", alpha=0.5)}
    cost = sampling.cost_per_token(model, tok, "Article 1", runs, rounds=3, tokens=3)
    assert cost == {"base": 6.0, "memory": 2.0}   # medians of the interleaved rounds
    assert len(calls) == 6 and all(n <= 4 for n in calls)
    with pytest.raises(ValueError, match="rounds"):
        sampling.cost_per_token(model, tok, "Article 1", runs, rounds=0)
