"""Shared fixtures: a tiny random Gemma-3-shaped model and a word tokenizer.

Nothing here downloads anything; the tiny model runs in milliseconds.
"""

from __future__ import annotations

import pytest
import torch

WORDS = ("the data subject shall have the right to obtain from controller erasure "
         "of personal data concerning him or her without undue delay article "
         "regulation member states commission authority processing title question "
         "answer : . , ( ) 1 2 3").split()


STORE_TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, 40, 5)]  # 8 docs


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(vocab_size: int, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=8, sliding_window=512,
                           max_position_embeddings=512, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): 2 layers, hidden size 32, random weights."""
    tok = make_tokenizer()
    tok.padding_side = "right"
    return make_model(len(tok)), tok


@pytest.fixture()
def one_thread():
    """For tests of tiny models: a second CPU thread only adds overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """Point the helpers' data folder at a fresh temporary directory."""
    monkeypatch.setenv("MEMDEC_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def store_index(tiny, tmp_path_factory):
    """A datastore of the tiny model's own keys over STORE_TEXTS, with its exact index."""
    from helpers.datastore import build_datastore
    from helpers.index import build_index

    model, tok = tiny
    torch.set_num_threads(1)
    store = build_datastore(model, tok, STORE_TEXTS, tmp_path_factory.mktemp("s") / "store",
                            model_name="tiny-gemma", corpus_name="words")
    return store, build_index(store, use_gpu=False)
