"""The paired bootstrap over articles (helpers.stats)."""

import numpy as np
import pytest

from helpers.knn import perplexity
from helpers.stats import perplexity_ratio, token_nll


def articles(n_articles=20, tokens=50, seed=0):
    rng = np.random.default_rng(seed)
    nll = rng.gamma(2.0, 1.0, n_articles * tokens)
    return nll, np.repeat(np.arange(n_articles), tokens)


def test_identical_systems_give_exactly_one_and_the_interval_1_1():
    nll, doc = articles()
    r = perplexity_ratio(nll, nll.copy(), doc)
    assert (r.ratio, r.low, r.high) == (1.0, 1.0, 1.0)
    assert not r.excludes_one


def test_the_ratio_is_the_ratio_of_the_two_perplexities():
    rng = np.random.default_rng(1)
    p_a, p_b = rng.uniform(0.01, 1, 600), rng.uniform(0.01, 1, 600)
    r = perplexity_ratio(token_nll(p_a), token_nll(p_b), np.arange(600) % 12)
    assert r.ratio == pytest.approx(perplexity(p_a) / perplexity(p_b), rel=1e-12)
    assert r.low <= r.ratio <= r.high


def test_a_constant_shift_gives_exp_of_it_with_no_spread():
    nll, doc = articles()
    r = perplexity_ratio(nll + 0.1, nll, doc)
    assert r.ratio == pytest.approx(np.exp(0.1))
    assert r.low == pytest.approx(np.exp(0.1)) and r.high == pytest.approx(np.exp(0.1))
    assert r.excludes_one


def test_a_noisy_gain_on_every_article_excludes_one():
    nll, doc = articles()
    noise = np.random.default_rng(2).normal(0, 0.5, len(nll))
    r = perplexity_ratio(nll - 0.05 + noise * 0.1, nll, doc)
    assert r.high < 1.0 and r.excludes_one
    assert r.low < r.ratio < r.high


def test_the_interval_resamples_articles_not_tokens():
    # the whole gain sits in one article of ten: a round that misses it (about a
    # third of them, 0.9 ** 10) sees no difference, so the interval reaches 1
    nll, doc = articles(n_articles=10, tokens=200)
    better = np.where(doc == 3, nll - 1.0, nll)
    r = perplexity_ratio(better, nll, doc)
    assert r.ratio < 0.95
    assert r.high == 1.0 and not r.excludes_one


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    nll, doc = articles()
    other = nll + np.random.default_rng(3).normal(0, 0.3, len(nll))
    first = perplexity_ratio(other, nll, doc, seed=7)
    again = perplexity_ratio(other, nll, doc, seed=7)
    assert (first.low, first.high) == (again.low, again.high)
    assert perplexity_ratio(other, nll, doc, seed=8).low != first.low


def test_a_wider_level_gives_a_wider_interval():
    nll, doc = articles()
    other = nll + np.random.default_rng(4).normal(0, 0.3, len(nll))
    narrow = perplexity_ratio(other, nll, doc, level=0.5)
    wide = perplexity_ratio(other, nll, doc, level=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_str_names_the_level_and_the_number_of_articles():
    nll, doc = articles(n_articles=5)
    assert str(perplexity_ratio(nll, nll, doc)) == "1.000 (95% interval 1.000–1.000, 5 articles)"


@pytest.mark.parametrize("a, b, g, says", [
    (np.ones(4), np.ones(3), np.arange(4), "same tokens"),
    (np.ones(4), np.ones(4), np.zeros(4), "at least 2"),
    (np.array([1.0, np.nan]), np.ones(2), np.arange(2), "NaN"),
    (np.array([1.0, np.inf]), np.ones(2), np.arange(2), "token_nll"),
])
def test_bad_inputs_say_what_to_pass(a, b, g, says):
    with pytest.raises(ValueError, match=says):
        perplexity_ratio(a, b, g)


def test_a_level_outside_0_1_is_refused():
    nll, doc = articles()
    with pytest.raises(ValueError, match="level=0.95"):
        perplexity_ratio(nll, nll, doc, level=95)
