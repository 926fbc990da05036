"""Cached held-out evaluation (helpers.evaluation)."""

import numpy as np

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
