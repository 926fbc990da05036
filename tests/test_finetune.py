"""The fine-tuning reference (helpers.finetune)."""

import pytest
import torch

from helpers.finetune import causal_lm_loss, finetune_body, training_windows
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
    calls = []
    stats = finetune_body(model, tok, TEXTS, epochs=30, lr=3e-3, window=16, overlap=4,
                          batch_size=4, progress=False, eval_every=10,
                          evaluate=lambda m: calls.append(m.training) or len(calls))
    assert stats["losses"][-1] < 0.85 * stats["losses"][0]
    assert len(stats["curve"]) == len(stats["losses"]) // 10
    assert [v for _, _, v in stats["curve"]] == list(range(1, len(calls) + 1))
    assert not any(calls)  # scored in eval mode, then training resumed
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("softcap", [None, 3.0])  # Gemma 2 caps its logits
def test_chunked_loss_equals_the_models_own_loss(softcap):
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    model.config.final_logit_softcapping = softcap
    wins = training_windows(tok, TEXTS[:2], window=12, overlap=4)
    width = max(len(r) for r, _ in wins)
    ids = torch.zeros((len(wins), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, (row, first) in enumerate(wins):
        ids[j, :len(row)] = torch.tensor(row)
        mask[j, :len(row)] = 1
        labels[j, first:len(row)] = torch.tensor(row[first:])
    assert (labels == -100).sum() > (mask == 0).sum()  # overlap context is unscored
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        for chunk in (3, 512):  # several chunks and one
            got = causal_lm_loss(model, ids, mask, labels, chunk=chunk)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _shipped_finetune_figures():
    import json
    from pathlib import Path
    return json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results"
                       / "bench_finetune.json").read_text())


def test_finetune_report_without_figures_says_how_to_make_them(capsys):
    from helpers.finetune import finetune_report
    assert finetune_report(None, None, base_ppl=9.0, memdec_ppl=5.0, knn_ppl=5.2,
                           train_seconds=60.0, decoder_params=6_000_000) is None
    assert "benchmarks/bench_finetune.py --full" in capsys.readouterr().out


def test_finetune_report_draws_the_decoder_only_on_the_same_test_tokens(capsys):
    import matplotlib
    matplotlib.use("Agg")
    from helpers.finetune import finetune_report
    stats = _shipped_finetune_figures()
    same = finetune_report(stats, "shipped", base_ppl=stats["base_ppl"], memdec_ppl=5.12,
                           knn_ppl=5.22, train_seconds=3300.0, decoder_params=6_100_000)
    out = capsys.readouterr().out
    assert f"{stats['finetune_ppl']:9.2f}" in out and "MemoryDecoder (this run)" in out
    assert "this run's test tokens" not in out
    assert len(same.axes[0].collections) == 1  # the decoder's star
    other = finetune_report(stats, "shipped", base_ppl=10.3, memdec_ppl=5.25, knn_ppl=5.3,
                            train_seconds=110.0, decoder_params=1_400_000)
    assert "this run's test tokens" in capsys.readouterr().out
    assert len(other.axes[0].collections) == 0
