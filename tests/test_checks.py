"""The exercise checks accept a right answer and answer each wrong one in one line.

A check never stops the notebook: it prints "passed" or one "failed: ..." line
(what it expected, what it got) and returns True or False.  Only
``NotImplementedError`` (the unfilled stub) goes through to the notebook.
"""

import numpy as np
import pytest
import torch

from helpers import checks


def _one_line(capsys) -> str:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, f"expected exactly one line, got {out!r}"
    return out.strip()


def test_next_token_pairs_check_accepts_the_reference(capsys):
    assert checks.check_next_token_pairs(checks._reference_next_token_pairs) is True
    assert _one_line(capsys) == "passed"


def test_next_token_pairs_check_rejects_keys_that_include_padding(capsys):
    def with_padding(hidden, input_ids, mask):
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
    assert checks.check_next_token_pairs(with_padding) is False
    assert "one per real token" in _one_line(capsys)


def test_next_token_pairs_check_rejects_values_off_by_one(capsys):
    def same_position(hidden, input_ids, mask):
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        return hidden[:, :-1][keep], input_ids[:, :-1][keep]
    assert checks.check_next_token_pairs(same_position) is False
    assert "*next* token ids" in _one_line(capsys)


def test_next_token_pairs_check_names_a_float_dtype_for_values(capsys):
    def float_values(hidden, input_ids, mask):
        keys, values = checks._reference_next_token_pairs(hidden, input_ids, mask)
        return keys, values.float()
    assert checks.check_next_token_pairs(float_values) is False
    line = _one_line(capsys)
    assert "expected an integer tensor" in line and "got float32 tensor" in line


def test_next_token_pairs_check_says_when_it_is_not_a_pair(capsys):
    assert checks.check_next_token_pairs(lambda h, i, m: h) is False
    assert "expected a pair (keys, values); got float32 tensor of shape (4, 7, 4)" \
        in _one_line(capsys)


def _stable_knn_prob(distances, values, target, temperature):
    w = np.exp(-(distances - distances.min()) / temperature)
    return w[values == target].sum() / w.sum()


def test_knn_prob_check_accepts_a_stable_softmax(capsys):
    assert checks.check_knn_prob(_stable_knn_prob) is True
    assert _one_line(capsys) == "passed"


def test_knn_prob_check_accepts_a_0d_tensor(capsys):
    assert checks.check_knn_prob(
        lambda *a: torch.tensor(_stable_knn_prob(*a))) is True
    assert _one_line(capsys) == "passed"


def test_knn_prob_check_rejects_counting_neighbours_without_weights(capsys):
    def unweighted(distances, values, target, temperature):
        return (values == target).mean()
    assert checks.check_knn_prob(unweighted) is False
    line = _one_line(capsys)
    assert "expected" in line and "got" in line


def test_knn_prob_check_names_nan_from_an_unstable_softmax(capsys):
    def unstable(distances, values, target, temperature):
        with np.errstate(all="ignore"):
            w = np.exp(-distances / temperature)  # underflows to 0 at T=1: 0/0
            return w[values == target].sum() / w.sum()
    assert checks.check_knn_prob(unstable) is False
    assert "expected a finite number; got NaN" in _one_line(capsys)


def test_knn_prob_check_names_a_whole_vector_instead_of_one_number(capsys):
    assert checks.check_knn_prob(lambda d, v, t, T: np.exp(-d / T)) is False
    assert "expected one number; got float" in _one_line(capsys)


def test_knn_prob_check_reports_an_exception_in_one_line(capsys):
    def broken(distances, values, target, temperature):
        return distances["oops"]
    assert checks.check_knn_prob(broken) is False
    assert _one_line(capsys).startswith("failed: your function raised IndexError")


def test_a_stub_still_raises_not_implemented_for_the_notebook_cell():
    def stub(*args):
        raise NotImplementedError
    with pytest.raises(NotImplementedError):
        checks.check_knn_prob(stub)


@pytest.mark.parametrize("check, module, helper", [
    ("check_drop_self", "helpers.knn", "drop_own_rows"),
    ("check_window_batch", "helpers.train_decoder", "window_batch"),
    ("check_sampling_distribution", "helpers.sampling", "sampling_distribution"),
    ("check_fit_prompt", "helpers.chat", "build_prompt"),
])
def test_a_check_accepts_the_helper_it_stands_for(capsys, check, module, helper):
    import importlib
    assert getattr(checks, check)(getattr(importlib.import_module(module), helper)) is True
    assert _one_line(capsys) == "passed"


def test_drop_self_check_rejects_always_dropping_the_first_neighbour(capsys):
    assert checks.check_drop_self(lambda d, i, own: (d[:, 1:], i[:, 1:])) is False
    line = _one_line(capsys)
    assert "ids, query 1: expected [2, 9, 4], got [11, 9, 4]" in line


def test_drop_self_check_rejects_dropping_nothing(capsys):
    assert checks.check_drop_self(lambda d, i, own: (d, i)) is False
    assert "expected shape (4, 3)" in _one_line(capsys)


def test_sparse_kl_check_accepts_the_reference(capsys):
    assert checks.check_sparse_kl(checks._reference_sparse_kl) is True
    assert _one_line(capsys) == "passed"


def test_sparse_kl_check_rejects_cross_entropy_without_the_entropy_term(capsys):
    def cross_entropy(logq, cols, probs):
        return -(probs * logq.gather(1, cols.clamp(min=0))).sum(1).mean()
    assert checks.check_sparse_kl(cross_entropy) is False
    assert "expected" in _one_line(capsys)


def test_sparse_kl_check_names_nan_from_log_zero(capsys):
    def naive(logq, cols, probs):
        return (probs * (probs.log() - logq.gather(1, cols.clamp(min=0)))).sum(1).mean()
    assert checks.check_sparse_kl(naive) is False
    assert "skip unused slots" in _one_line(capsys)


def test_sparse_kl_check_names_a_per_row_answer(capsys):
    def per_row(logq, cols, probs):
        return checks._reference_sparse_kl(logq, cols, probs).expand(5)
    assert checks.check_sparse_kl(per_row) is False
    assert "got float32 tensor of shape (5,)" in _one_line(capsys)


def _log_space_blend(base, mem, a):
    lb = torch.log_softmax(base, -1)
    if a == 0:
        return lb
    if a == 1:
        return mem
    return torch.logaddexp(torch.log1p(torch.tensor(-a)) + lb,
                           torch.log(torch.tensor(a)) + mem)


def test_prob_blend_check_accepts_the_log_space_mixture(capsys):
    assert checks.check_prob_blend(_log_space_blend) is True
    assert _one_line(capsys) == "passed"


def test_prob_blend_check_rejects_the_logit_blend(capsys):
    def logit_blend(base, mem, a):
        return torch.log_softmax((1 - a) * base + a * mem.clamp(min=-30), -1)
    assert checks.check_prob_blend(logit_blend) is False
    assert "alpha=" in _one_line(capsys)


def test_prob_blend_check_names_the_wrong_shape(capsys):
    assert checks.check_prob_blend(lambda b, m, a: _log_space_blend(b, m, a)[None]) is False
    assert "expected a floating tensor of shape (50,) on cpu; got float32 tensor of " \
           "shape (1, 50)" in _one_line(capsys)


def test_prob_blend_check_names_the_wrong_device(capsys):
    def on_meta(b, m, a):
        return torch.empty(50, device="meta")
    assert checks.check_prob_blend(on_meta) is False
    assert "on cpu; got float32 tensor of shape (50,) on meta" in _one_line(capsys)


def test_prob_blend_check_names_nan_from_zero_times_inf(capsys):
    def naive(b, m, a):
        return torch.log((1 - a) * b.softmax(-1) + a * m.exp()) + 0 * m
    assert checks.check_prob_blend(naive) is False
    assert "got NaN" in _one_line(capsys)


def test_prob_blend_check_names_a_numpy_answer(capsys):
    assert checks.check_prob_blend(lambda b, m, a: _log_space_blend(b, m, a).numpy()) is False
    assert "got float32 array of shape (50,)" in _one_line(capsys)


def test_window_batch_check_rejects_windows_that_cross_documents(capsys):
    def across(keys, doc, rows, W):
        src = rows[:, None] - np.arange(W - 1, -1, -1)
        pad = src < 0
        x = torch.from_numpy(keys[np.clip(src, 0, None)].copy())
        x[torch.from_numpy(pad)] = 0.0
        return x, torch.from_numpy(pad)
    assert checks.check_window_batch(across) is False
    assert "W=3, row 3: expected pad [True, True, False]" in _one_line(capsys)


def test_window_batch_check_names_an_integer_pad_mask(capsys):
    from helpers.train_decoder import window_batch

    def int_pad(keys, doc, rows, W):
        x, pad = window_batch(keys, doc, rows, W)
        return x, pad.long()
    assert checks.check_window_batch(int_pad) is False
    assert "expected a bool tensor" in _one_line(capsys)


def test_sampling_distribution_check_rejects_ignoring_the_temperature(capsys):
    from helpers.sampling import sampling_distribution

    def no_temperature(logp, temperature, top_k):
        return sampling_distribution(logp, 1.0, top_k)
    assert checks.check_sampling_distribution(no_temperature) is False
    assert "divide the log-probabilities by the temperature" in _one_line(capsys)


def test_sampling_distribution_check_counts_the_tokens_top_k_keeps(capsys):
    def no_top_k(logp, temperature, top_k):
        return torch.softmax(logp / temperature, -1)
    assert checks.check_sampling_distribution(no_top_k) is False
    assert "5 tokens should keep probability > 0, got 40" in _one_line(capsys)


def test_fit_prompt_check_rejects_dropping_the_newest_turns(capsys):
    from helpers.chat import build_prompt

    def newest_first(turns, question, count, budget):
        prompt, dropped = build_prompt(turns[::-1], question, count, budget)
        return prompt, dropped
    assert checks.check_fit_prompt(newest_first) is False
    assert "Drop the oldest turns first" in _one_line(capsys)


def test_fit_prompt_check_names_a_missing_pair(capsys):
    assert checks.check_fit_prompt(lambda t, q, c, b: "Question: x") is False
    assert "expected a pair (prompt, n_dropped); got str" in _one_line(capsys)


def test_flipped_check_accepts_the_count_of_changed_argmaxes(capsys):
    assert checks.check_flipped(
        lambda blend, base: int((blend.argmax(-1) != base.argmax(-1)).sum())) is True
    assert _one_line(capsys) == "passed"


def test_flipped_check_rejects_counting_every_changed_row(capsys):
    assert checks.check_flipped(
        lambda blend, base: int((blend != base).any(-1).sum())) is False
    assert "expected 3 of 7 tokens flipped, got 4" in _one_line(capsys)


def test_plan_windows_check_accepts_the_helper_without_bos(capsys):
    from helpers.hidden import plan_windows
    assert checks.check_plan_windows(lambda n, w, o: plan_windows(n, w, o, False)) is True
    assert _one_line(capsys) == "passed"


def test_plan_windows_check_rejects_windows_without_overlap(capsys):
    def no_overlap(n, w, o):
        return [(s, min(n, s + w), max(s, 1)) for s in range(0, n, w)]
    assert checks.check_plan_windows(no_overlap) is False
    assert ("n_tokens=9, window=8, overlap=2: expected [(0, 8, 1), (6, 9, 8)], got "
            "[(0, 8, 1), (8, 9, 8)]") in _one_line(capsys)


def test_plan_windows_check_names_a_wrong_return_type(capsys):
    assert checks.check_plan_windows(lambda n, w, o: 3) is False
    assert "expected a list of (start, end, first_target) triples; got int 3" in _one_line(capsys)


def _tokens_before(values, pos, row, bos_id):
    first = row - pos[row]
    return [bos_id] + [int(v) for v in values[first:row]]


def test_tokens_before_check_accepts_bos_then_the_earlier_values_of_the_text(capsys):
    assert checks.check_tokens_before(_tokens_before) is True
    assert _one_line(capsys) == "passed"


def test_tokens_before_check_rejects_reading_across_the_start_of_the_text(capsys):
    assert checks.check_tokens_before(lambda values, pos, row, bos: [bos] + list(values[:row])) \
        is False
    assert "same text" in _one_line(capsys)


def test_tokens_before_check_rejects_a_missing_bos(capsys):
    def no_bos(values, pos, row, bos_id):
        return _tokens_before(values, pos, row, bos_id)[1:]
    assert checks.check_tokens_before(no_bos) is False
    assert "Start with bos_id" in _one_line(capsys)


def _compact_ids(ids, vocab_ids, base_vocab_size):
    V = len(vocab_ids)
    column = torch.full((base_vocab_size,), V, dtype=torch.long)
    column[vocab_ids] = torch.arange(V)
    inside = (ids >= 0) & (ids < base_vocab_size)
    return torch.where(inside, column[ids.clamp(0, base_vocab_size - 1)], V)


def test_compact_ids_check_accepts_a_lookup_table_with_the_unknown_id(capsys):
    assert checks.check_compact_ids(_compact_ids) is True
    assert _one_line(capsys) == "passed"


def test_compact_ids_check_rejects_out_of_range_ids_that_wrap_around(capsys):
    def wraps(ids, vocab_ids, base_vocab_size):  # -1 reads the last entry of the table
        column = torch.full((base_vocab_size,), len(vocab_ids), dtype=torch.long)
        column[vocab_ids] = torch.arange(len(vocab_ids))
        return column[ids % base_vocab_size]
    assert checks.check_compact_ids(wraps) is False
    assert "negative or >= base_vocab_size" in _one_line(capsys)


def test_compact_ids_check_names_a_float_result(capsys):
    assert checks.check_compact_ids(lambda ids, v, n: _compact_ids(ids, v, n).float()) is False
    assert "expected an integer tensor" in _one_line(capsys)
