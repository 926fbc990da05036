"""kNN-LM distributions, interpolation and perplexity (helpers.knn), notebook 02."""

import numpy as np
import pytest
import torch

from helpers.hidden import extract_keys, tokenize
from helpers.knn import (base_target_probs, interpolate, knn_distribution, knn_prob_of,
                         lookup_values, perplexity)


def dense(ids, probs, vocab):
    """Scatter a sparse (ids, probs) distribution into (Q, vocab)."""
    out = np.zeros((len(ids), vocab))
    for q in range(len(ids)):
        for i, p in zip(ids[q], probs[q]):
            if i >= 0:
                out[q, i] += p
    return out


def test_knn_distribution_merges_neighbours_with_the_same_token():
    ids, probs = knn_distribution(np.zeros((1, 3)), np.array([[5, 7, 5]]), 1.0)
    assert ids.tolist() == [[5, 7, -1]]
    np.testing.assert_allclose(probs, [[2 / 3, 1 / 3, 0]], rtol=1e-6)
    assert ids.dtype == np.int64 and probs.dtype == np.float32


def test_knn_distribution_matches_a_brute_force_sum_over_neighbours():
    rng = np.random.default_rng(0)
    distances = rng.uniform(0, 5, (40, 8))
    values = rng.integers(0, 6, (40, 8))
    ids, probs = knn_distribution(distances, values, temperature=2.0)
    expect = np.zeros((40, 6))
    for q in range(40):
        for d, v in zip(distances[q], values[q]):
            expect[q, v] += np.exp(-d / 2.0)
    expect /= expect.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dense(ids, probs, 6), expect, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    for row in ids:  # each token at most once, padding only at the end
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real) and (row[len(real):] == -1).all()


def test_knn_distribution_lists_the_most_probable_token_first():
    ids, probs = knn_distribution(np.array([[3.0, 0.0, 1.0]]), np.array([[4, 9, 2]]), 1.0)
    assert ids.tolist() == [[9, 2, 4]] and (np.diff(probs[0]) <= 0).all()


def test_huge_distances_do_not_underflow_to_nan():
    ids, probs = knn_distribution(np.array([[1e6, 1e6 + 1]]), np.array([[3, 4]]), 1.0)
    np.testing.assert_allclose(probs.sum(), 1, atol=1e-6)
    assert ids[0, 0] == 3 and np.isfinite(probs).all()


def test_high_temperature_spreads_probability_evenly_over_neighbours():
    values = np.array([[1, 2, 2, 3]])
    _, probs = knn_distribution(np.array([[0.0, 1.0, 4.0, 9.0]]), values, 1e9)
    np.testing.assert_allclose(probs, [[0.5, 0.25, 0.25, 0]], atol=1e-6)


def test_missing_neighbours_get_no_probability():
    ids, probs = knn_distribution(np.array([[0.0, 1.0, 3.4e38]]), np.array([[7, 8, -1]]), 1.0)
    assert ids[0, 2] == -1 and probs[0, 2] == 0
    np.testing.assert_allclose(probs.sum(), 1, atol=1e-6)


def test_lookup_values_keeps_minus_one_for_missing_neighbours():
    class Store:
        values = np.array([10, 11, 12])
    assert lookup_values(Store, np.array([[2, -1, 0]])).tolist() == [[12, -1, 10]]


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_distribution(np.zeros((1, 2)), np.zeros((1, 2), int), 0.0)


def test_knn_prob_of_reads_the_target_from_the_distribution_or_zero():
    rng = np.random.default_rng(1)
    distances, values = rng.uniform(0, 3, (30, 6)), rng.integers(0, 5, (30, 6))
    targets = rng.integers(0, 8, 30)  # tokens 5..7 are never neighbours
    ids, probs = knn_distribution(distances, values, 0.7)
    expect = dense(ids, probs, 8)[np.arange(30), targets]
    got = knn_prob_of(targets, distances, values, 0.7)
    assert got.dtype == np.float32 and got.shape == (30,)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert (got[targets >= 5] == 0).all()


def test_interpolate_mixes_base_and_knn_by_lambda():
    base, knn = np.array([0.2, 0.6]), np.array([1.0, 0.0])
    np.testing.assert_allclose(interpolate(base, knn, 0.0), base)
    np.testing.assert_allclose(interpolate(base, knn, 1.0), knn)
    np.testing.assert_allclose(interpolate(base, knn, 0.25), [0.4, 0.45])
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate(base, knn, 1.5)


def test_perplexity_of_a_uniform_guess_is_the_vocabulary_size():
    assert perplexity(np.full(10, 1 / 50)) == pytest.approx(50)


def test_perplexity_clips_zero_probabilities_instead_of_going_infinite():
    assert perplexity(np.array([0.0])) == pytest.approx(1e12)


TEXTS = ["the data subject shall have the right to obtain from the controller",
         "article 1 .", "member states shall"]


def test_base_target_probs_equal_the_models_own_softmax(tiny):
    model, tok = tiny
    ex, p = base_target_probs(model, tok, TEXTS, head_chunk=5)
    reference = extract_keys(model, tok, TEXTS)
    np.testing.assert_allclose(ex.keys, reference.keys, atol=1e-6)
    assert p.shape == ex.values.shape and p.dtype == np.float32
    for d, ids in enumerate(tokenize(tok, TEXTS)):
        probs = model(torch.tensor([ids])).logits[0, :-1].softmax(-1)
        expect = probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        np.testing.assert_allclose(p[ex.doc == d], expect, rtol=1e-4, atol=1e-7)


def test_base_target_probs_apply_gemmas_final_logit_softcap(tiny, monkeypatch):
    model, tok = tiny
    plain = base_target_probs(model, tok, TEXTS[:1])[1]
    monkeypatch.setattr(model.config, "final_logit_softcapping", 0.5)
    ex, p = base_target_probs(model, tok, TEXTS[:1])
    ids = tokenize(tok, TEXTS[:1])[0]
    probs = model(torch.tensor([ids])).logits[0, :-1].softmax(-1)
    expect = probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(p, expect, rtol=1e-4, atol=1e-7)
    assert not np.allclose(p, plain, rtol=1e-3)  # the cap really changed them


def test_best_alpha_picks_alpha_on_validation_rows_and_reports_test_rows():
    from helpers.knn import best_alpha, interpolate, perplexity

    p_base = np.array([0.1, 0.1, 0.5, 0.5])
    p_mem = np.array([0.9, 0.9, 0.01, 0.01])        # helps the first two rows, hurts the rest
    valid, test = np.array([True, True, False, False]), np.array([False, False, True, True])
    alphas = np.array([0.0, 0.5, 1.0])
    a, v, t = best_alpha(p_base, p_mem, valid, test, alphas)
    assert a == 1.0 and v == pytest.approx(1 / 0.9)
    assert t == pytest.approx(perplexity(interpolate(p_base[test], p_mem[test], 1.0)))
    assert best_alpha(p_base, p_mem, test, valid, alphas)[0] == 0.0  # the other way round
    with pytest.raises(ValueError, match="same tokens"):
        best_alpha(p_base, p_mem[:3], valid, test, alphas)


@pytest.mark.parametrize("choice", ["torch", "numpy"])
def test_head_logits_are_the_heads_product_with_either_blas(tiny, monkeypatch, choice):
    from helpers import knn

    model, tok = tiny
    weight = model.get_output_embeddings().weight
    key = (tuple(weight.shape), str(weight.device), str(weight.dtype))
    monkeypatch.setitem(knn._HEAD_BACKEND, key, {"choice": choice, "seconds": {}})
    keys = np.random.default_rng(0).standard_normal((2, 3, weight.shape[1])).astype(np.float32)
    got = knn.head_logits(model, keys)
    assert got.shape == (2, 3, weight.shape[0]) and got.dtype == torch.float32
    want = model.get_output_embeddings()(torch.from_numpy(keys))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_backend_is_measured_once_per_shape_and_torch_off_the_cpus_float32(monkeypatch):
    from helpers import knn

    monkeypatch.setattr(knn, "_HEAD_BACKEND", {})
    weight = torch.randn(50, 8)
    first = knn.head_backend(weight)
    assert first["choice"] == min(first["seconds"], key=first["seconds"].get)
    assert set(first["seconds"]) == {"torch", "numpy"}
    assert knn.head_backend(torch.randn(50, 8)) is first       # same shape: not measured again
    assert knn.head_backend(weight.double()) == {"choice": "torch", "seconds": {}}
