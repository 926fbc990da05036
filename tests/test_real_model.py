"""Integration: the real embedded Gemma 3 270M (first use converts it, ~1 min)."""

import math

import pytest
import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.model import EMBEDDED_MODEL, _assemble_gguf, load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_base_model(EMBEDDED_MODEL)


def test_cached_copy_reproduces_the_gguf_model_exactly(gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = gemma
    gguf = _assemble_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Article 17 of the GDPR gives the data subject the right to"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_real_model_reads_held_out_eu_law_with_low_perplexity(gemma):
    model, tok = gemma
    text = split_by_document(load_corpus())["heldout"][0]["text"]
    ids = tok(text, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    # a random model scores ~262,144 (the vocabulary); Gemma 3 270M reads law well
    assert math.exp(loss) < 30


def test_fast_path_gives_the_real_models_keys_without_falling_back(gemma, monkeypatch):
    import numpy as np
    import transformers.integrations.sdpa_attention as sa

    import helpers.fastpath as fp
    from helpers.hidden import extract_keys, plan_windows, tokenize

    model, tok = gemma
    texts = sorted(load_corpus()["text"][:6], key=len)[-2:]  # two long articles
    calls, fallbacks = [], []
    block_attention, sdpa = fp.causal_block_attention, sa.sdpa_attention_forward
    monkeypatch.setattr(fp, "causal_block_attention",
                        lambda *a, **kw: calls.append(1) or block_attention(*a, **kw))
    monkeypatch.setattr(sa, "sdpa_attention_forward",
                        lambda *a, **kw: fallbacks.append(1) or sdpa(*a, **kw))
    fast = extract_keys(model, tok, texts, window=256, overlap=64, batch_size=4)
    slow = extract_keys(model, tok, texts, window=256, overlap=64, batch_size=4, fast=False)
    # every window has > 64 positions (a later one: BOS + 64 of overlap + new
    # tokens) and none carries a mask, so every layer of every batch took the
    # block path, and only the fast run used it
    windows = sum(len(plan_windows(len(ids), 256, 64, True)) for ids in tokenize(tok, texts))
    n_batches = -(-windows // 4)
    assert len(calls) == model.config.num_hidden_layers * n_batches and fallbacks == []
    rel = np.abs(fast.keys - slow.keys).max() / np.abs(slow.keys).max()
    assert rel < 1e-5, rel
