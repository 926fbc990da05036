"""The fine-tuning reference (helpers.finetune)."""

import torch

from helpers.finetune import finetune_body, training_windows
from tests.conftest import make_model, make_tokenizer

TEXTS = ["the data subject shall have the right to obtain from the controller the erasure "
         "of personal data concerning him or her without undue delay"] * 4


def test_training_windows_score_each_target_once():
    tok = make_tokenizer()
    wins = training_windows(tok, TEXTS[:1], window=8, overlap=3)
    n_targets = sum(len(row) - first for row, first in wins)
    assert n_targets == len(tok(TEXTS[0])["input_ids"]) - 1


def test_finetuning_lowers_the_loss_and_leaves_embeddings_frozen():
    tok = make_tokenizer()
    model = make_model(len(tok))
    emb = model.get_input_embeddings().weight.clone()
    stats = finetune_body(model, tok, TEXTS, epochs=30, lr=3e-3, window=16, overlap=4,
                          batch_size=4, progress=False)
    assert stats["losses"][-1] < 0.85 * stats["losses"][0]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
