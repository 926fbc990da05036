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
