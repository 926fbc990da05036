"""The exercise checks must accept a right answer and reject wrong ones."""

import pytest

from helpers.checks import _reference_next_token_pairs, check_next_token_pairs


def test_next_token_pairs_check_accepts_the_reference(capsys):
    check_next_token_pairs(_reference_next_token_pairs)
    assert capsys.readouterr().out.strip() == "passed"


def test_next_token_pairs_check_rejects_keys_that_include_padding():
    def with_padding(hidden, input_ids, mask):
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
    with pytest.raises(AssertionError, match="one per real token"):
        check_next_token_pairs(with_padding)


def test_next_token_pairs_check_rejects_values_off_by_one():
    def same_position(hidden, input_ids, mask):
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        return hidden[:, :-1][keep], input_ids[:, :-1][keep]
    with pytest.raises(AssertionError, match="next"):
        check_next_token_pairs(same_position)


def test_knn_prob_check_accepts_a_stable_softmax(capsys):
    import numpy as np

    from helpers.checks import check_knn_prob

    def knn_prob(distances, values, target, temperature):
        w = np.exp(-(distances - distances.min()) / temperature)
        return w[values == target].sum() / w.sum()
    check_knn_prob(knn_prob)
    assert capsys.readouterr().out.strip() == "passed"


def test_knn_prob_check_rejects_counting_neighbours_without_weights():
    from helpers.checks import check_knn_prob

    def unweighted(distances, values, target, temperature):
        return (values == target).mean()
    with pytest.raises(AssertionError, match="got"):
        check_knn_prob(unweighted)


def test_sparse_kl_check_accepts_the_reference(capsys):
    from helpers.checks import _reference_sparse_kl, check_sparse_kl
    check_sparse_kl(_reference_sparse_kl)
    assert capsys.readouterr().out.strip() == "passed"


def test_sparse_kl_check_rejects_cross_entropy_without_the_entropy_term():
    from helpers.checks import check_sparse_kl

    def cross_entropy(logq, cols, probs):
        return -(probs * logq.gather(1, cols.clamp(min=0))).sum(1).mean()
    with pytest.raises(AssertionError, match="expected"):
        check_sparse_kl(cross_entropy)


def test_prob_blend_check_accepts_the_log_space_mixture(capsys):
    import torch

    from helpers.checks import check_prob_blend

    def blend(base, mem, a):
        lb = torch.log_softmax(base, -1)
        if a == 0:
            return lb
        if a == 1:
            return mem
        return torch.logaddexp(torch.log1p(torch.tensor(-a)) + lb, torch.log(torch.tensor(a)) + mem)
    check_prob_blend(blend)
    assert capsys.readouterr().out.strip() == "passed"


def test_prob_blend_check_rejects_the_logit_blend():
    import torch

    from helpers.checks import check_prob_blend

    def logit_blend(base, mem, a):
        return torch.log_softmax((1 - a) * base + a * mem.clamp(min=-30), -1)
    with pytest.raises(AssertionError, match="alpha"):
        check_prob_blend(logit_blend)
