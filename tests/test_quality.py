"""Answer quality (helpers.quality) and article lookup (helpers.articles), notebook 05."""

import numpy as np
import pytest

from helpers.articles import TitleIndex, stored_indices
from helpers.quality import (cut_at_record, lcs_length, paired_bootstrap, pick_evenly,
                             question_prompt, reference_text, rouge_l, score_answers, token_f1)

TITLES = ["GDPR, Article 17: Right to erasure ('right to be forgotten')",
          "GDPR, Article 37: Designation of the data protection officer",
          "DORA, Article 5: Governance and organisation",
          "AI Act, Article 5: Prohibited AI practices"]


def test_lcs_length_counts_the_longest_common_subsequence():
    assert lcs_length("a b c d e".split(), "a x c y e".split()) == 3
    assert lcs_length([], ["a"]) == 0 and lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_is_one_for_a_verbatim_answer_and_zero_for_no_shared_word():
    assert rouge_l("The Data subject, shall", "the data subject shall") == 1.0
    assert rouge_l("nothing in common", "the data subject") == 0.0


def test_rouge_l_is_the_f1_of_lcs_precision_and_recall():
    # LCS("a b c d", "a c e") = 2: precision 2/4, recall 2/3 -> F1 = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)


def test_rouge_l_rewards_order_where_token_f1_does_not():
    ref = "the controller shall erase the data"
    shuffled = "data the erase shall controller the"
    assert token_f1(shuffled, ref) == 1.0
    assert rouge_l(shuffled, ref) == 0.5  # LCS "the shall the": 3 of 6


def test_reference_is_the_articles_first_words():
    assert reference_text("1. The data subject shall have", ref_words=3) == "1. The data"


def test_question_prompt_is_the_stored_record_with_the_answer_left_open():
    record = dict(title="T", question="Q?", answer="A.")
    assert question_prompt(record) == "Title: T\nQuestion: Q?\nAnswer:"


def test_an_answer_is_cut_where_the_model_starts_a_new_record():
    assert cut_at_record(" Yes.\nQuestion: next") == " Yes."
    assert cut_at_record(" Yes.") == " Yes."


def test_pick_evenly_is_a_fixed_rule_with_both_ends():
    assert pick_evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert pick_evenly([1, 2], 5) == [1, 2]


def test_paired_bootstrap_of_identical_scores_is_exactly_one():
    s = np.array([0.1, 0.3, 0.2, 0.5])
    assert paired_bootstrap(s, s) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_interval_holds_the_ratio_and_excludes_one_for_a_clear_gain():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.1, 0.2, 30)
    ratio, low, high = paired_bootstrap(3 * base + rng.uniform(0, 0.01, 30), base)
    assert low <= ratio <= high and low > 2.5


def test_paired_bootstrap_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same articles"):
        paired_bootstrap([0.1, 0.2], [0.1])


@pytest.mark.parametrize("question, title", [
    ("What does the GDPR say about the right to erasure?", TITLES[0]),
    ("Who has to appoint a data protection officer?", TITLES[1]),
    ("Which AI practices are prohibited?", TITLES[3]),
])
def test_title_index_finds_the_article_a_question_is_about(question, title):
    found = TitleIndex(TITLES).match(question)
    assert found is not None and found[0] == title


@pytest.mark.parametrize("question", ["What is the weather like today?",
                                      "Was sagt die DSGVO über das Recht auf Löschung?",
                                      "", "データ保護とは何ですか"])
def test_title_index_matches_nothing_for_a_question_naming_no_article(question):
    assert TitleIndex(TITLES).match(question) is None


def test_title_index_of_no_titles_matches_nothing():
    assert TitleIndex([]).match("right to erasure") is None


def test_stored_indices_finds_the_stride_notebook_02_stored(store_index):
    from tests.conftest import STORE_TEXTS
    store, _ = store_index  # built from all 8 STORE_TEXTS
    assert stored_indices(store, STORE_TEXTS) == list(range(8))
    doubled = [t for text in STORE_TEXTS for t in (text, "not stored " + text)]
    assert stored_indices(store, doubled) == list(range(0, 16, 2))
    assert stored_indices(store, list(reversed(STORE_TEXTS))) is None


def test_score_answers_asks_every_mode_greedily_with_the_same_repetition_ban(tiny, monkeypatch):
    import helpers.sampling as sampling
    seen = []

    def fake_generate_text(model, tokenizer, prompt, **kw):
        seen.append((prompt, kw))
        return " the data subject shall\nQuestion: next", []

    monkeypatch.setattr(sampling, "generate_text", fake_generate_text)
    record = dict(title="T", question="q?", answer="the data subject shall have the right")
    scores = score_answers(*tiny, [record], {"base": dict(mode="base"),
                                             "other": dict(mode="base", alpha=0.5)},
                           max_new_tokens=5, no_repeat_ngram=3)
    assert [kw["no_repeat_ngram"] for _, kw in seen] == [3, 3]
    assert all(kw["temperature"] == 0 and kw["max_new_tokens"] == 5 for _, kw in seen)
    assert seen[0][0] == "Title: T\nQuestion: q?\nAnswer:"
    assert scores["base"]["answers"] == ["the data subject shall"]  # cut at the new record
    assert scores["base"]["rouge_l"][0] == pytest.approx(2 * 4 / (4 + 7))


def test_prompt_is_stored_when_the_store_holds_the_records_tokens(tiny):
    from types import SimpleNamespace

    from helpers.quality import prompt_is_stored
    tok = tiny[1]
    record = dict(title="the data", question="what is the data ?", answer="the data subject")
    record["text"] = f"Title: {record['title']}\nQuestion: {record['question']}\nAnswer: " \
                     + record["answer"]
    ids = tok(record["text"])["input_ids"]
    n = len(ids) - 1  # a key per position, its value the next token
    store = SimpleNamespace(doc=[7] * n + [8], values=ids[1:][::-1] + [0],
                            pos=list(range(n))[::-1] + [0])  # stored in any order
    assert prompt_is_stored(store, tok, 7, record)
    assert not prompt_is_stored(store, tok, 8, record)  # another document
    other = dict(record, question="what is it ?")
    assert not prompt_is_stored(store, tok, 7, other)


def _bench_recite():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_recite.py"
    spec = importlib.util.spec_from_file_location("bench_recite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_recitation_run_of_other_settings_keeps_the_default_runs_file():
    name = _bench_recite().results_name
    both = ["paper", "keep_self"]
    assert name(True, both, 12, 3e-3, 256, 0) == "bench_recite_quick"  # what notebook 05 shows
    assert name(False, both, 12, 3e-3, 256, 0) == "bench_recite"
    assert name(True, ["keep_self"], 8, 3e-3, 256, 0) == "bench_recite_quick_keep_self_e8"
    assert name(True, ["keep_self"], 8, 3e-3, 256, 1) == "bench_recite_quick_keep_self_e8_seed1"
    assert (name(True, ["keep_self"], 3, 6e-3, 64, 0)
            == "bench_recite_quick_keep_self_e3_lr0.006_batch64")
    assert (name(True, both, 12, 3e-3, 256, 0, dropout=0.1, tokens=64)
            == "bench_recite_quick_dropout0.1_t64")
