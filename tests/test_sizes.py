"""Two sizes, one code path (helpers.sizes): every notebook agrees on the size."""

import pytest

from helpers.sizes import SIZES, by_size, pick_size


def test_full_false_is_the_quick_size_and_smoke_wins_over_full():
    assert pick_size(False).name == "quick"
    assert pick_size(True).name == "full"
    assert pick_size(True, smoke=True).name == "smoke"


@pytest.mark.parametrize("value", [1, "True", "yes", None, 0.0])
def test_full_must_be_a_boolean_and_the_error_says_how_to_set_it(value):
    with pytest.raises(TypeError, match=r"FULL must be True or False.*FULL = True"):
        pick_size(value)


def test_the_quick_store_takes_every_fifth_article_in_corpus_order():
    articles = [f"article {i}" for i in range(10)]
    assert SIZES["quick"].train_texts(articles) == ["article 0", "article 5"]
    assert SIZES["full"].train_texts(articles) == articles
    assert SIZES["smoke"].train_texts(articles * 2) == (articles * 2)[:12]
    assert SIZES["quick"].train_texts(articles, limit=1) == ["article 0"]


def test_shorten_cuts_texts_to_their_first_tokens_and_keeps_short_ones(tiny):
    _, tok = tiny
    quick = SIZES["quick"]
    long_text = " ".join(["the"] * (quick.eval_tokens + 50))
    short, kept = quick.shorten([long_text, "the data subject"], tok)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) == quick.eval_tokens
    assert long_text.startswith(short) and kept == "the data subject"
    assert SIZES["full"].shorten([long_text], tok) == [long_text]


def test_a_knob_set_in_the_notebook_wins_over_the_size():
    quick = SIZES["quick"]
    assert by_size(None, quick, "epochs") == quick.epochs
    assert by_size(7, quick, "epochs") == 7
    assert by_size(0, quick, "ablation_epochs") == 0  # 0 is a setting, not "by size"


def test_an_unknown_size_knob_is_named():
    with pytest.raises(KeyError, match="no size knob 'epoch'"):
        by_size(None, SIZES["quick"], "epoch")


def test_each_size_writes_to_its_own_folders():
    assert [SIZES[n].tag for n in ("smoke", "quick", "full")] == ["smoke", "quick", ""]


def test_the_quick_size_is_smaller_than_the_full_size_in_every_knob_that_costs_time():
    quick, full = SIZES["quick"], SIZES["full"]
    assert quick.train_every > full.train_every
    assert quick.epochs < full.epochs
    assert quick.layer_train_docs < full.layer_train_docs
    assert quick.throughput_docs < full.throughput_docs
