"""Checks for the notebooks' "try it" exercises: compare to a reference.

Each ``check_*`` runs the learner's function on fresh random inputs and
prints "passed", or raises an AssertionError that says what differs.
"""

from __future__ import annotations

import torch


def _reference_next_token_pairs(hidden, input_ids, attention_mask):
    """Notebook 01: keys are states at t, values the token at t+1, no padding."""
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # (B, T-1)
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


def check_next_token_pairs(fn) -> None:
    """Exercise of notebook 01: ``fn(hidden, input_ids, attention_mask)``."""
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5, 1]
    B, T, D = len(lengths), max(lengths), 4
    hidden = torch.randn(B, T, D, generator=gen)
    input_ids = torch.randint(5, 100, (B, T), generator=gen)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        attention_mask[b, :n] = 1
        input_ids[b, n:] = 0  # pad id
    keys, values = fn(hidden, input_ids, attention_mask)
    ref_k, ref_v = _reference_next_token_pairs(hidden, input_ids, attention_mask)
    expected = sum(n - 1 for n in lengths)
    assert keys.shape == (expected, D), (
        f"keys should have shape ({expected}, {D}): one per real token that has a "
        f"next real token; got {tuple(keys.shape)}")
    assert values.shape == (expected,), f"values should have shape ({expected},)"
    assert torch.equal(values, ref_v), "values must be the *next* token ids, in order"
    assert torch.allclose(keys, ref_k), "keys must be hidden[b, t] for each value at t+1"
    print("passed")


def check_knn_prob(fn) -> None:
    """Exercise of notebook 02: ``fn(distances, values, target, temperature)``."""
    import numpy as np

    from .knn import knn_prob_of

    rng = np.random.default_rng(2)
    for temperature in (1.0, 50.0, 5000.0):
        distances = np.sort(rng.uniform(2000, 5000, 16)).astype(np.float32)  # (k,)
        values = rng.integers(0, 4, 16)                                      # (k,)
        for target in range(5):
            got = float(fn(distances, values, target, temperature))
            want = float(knn_prob_of(np.array([target]), distances[None], values[None],
                                     temperature)[0])
            assert abs(got - want) < 1e-5, (
                f"T={temperature}, target={target}: got {got:.6f}, expected {want:.6f}. "
                "Sum exp(-d/T) over neighbours whose value is the target, divided by the "
                "sum over all neighbours (subtract the smallest distance first).")
    print("passed")


def _reference_sparse_kl(logq, cols, probs):
    """Notebook 03: KL(p || q) with p sparse: sum p (log p - log q), batch mean."""
    used = probs > 0
    logq_t = logq.gather(1, cols.clamp(min=0))
    logp = torch.log(torch.where(used, probs, torch.ones_like(probs)))
    return torch.where(used, probs * (logp - logq_t), 0.0).sum(1).mean()


def check_sparse_kl(fn) -> None:
    """Exercise of notebook 03: ``fn(logq (B, V), cols (B, k), probs (B, k))``."""
    gen = torch.Generator().manual_seed(3)
    B, V, k = 5, 11, 4
    logq = torch.log_softmax(torch.randn(B, V, generator=gen), dim=-1)
    cols = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(B)])
    probs = torch.rand(B, k, generator=gen)
    probs[:, -1] = 0.0
    cols[:, -1] = -1  # an unused slot, as in the precomputed targets
    probs = probs / probs.sum(1, keepdim=True)
    got, want = fn(logq, cols, probs), _reference_sparse_kl(logq, cols, probs)
    assert torch.is_tensor(got) and got.ndim == 0, "return one number: the batch mean"
    assert torch.isfinite(got), ("got NaN/inf: skip unused slots (probability 0, "
                                 "column -1) instead of taking log(0)")
    assert torch.allclose(got, want, atol=1e-5), (
        f"got {got.item():.5f}, expected {want.item():.5f}: sum p*(log p - log q) over "
        "the used slots of each row, then average over the batch")
    print("passed")


def check_prob_blend(fn) -> None:
    """Exercise of notebook 04: ``fn(base_logits (V,), memory_logp (V,), alpha)``."""
    from .sampling import blend_logits

    gen = torch.Generator().manual_seed(4)
    base = 5 * torch.randn(50, generator=gen)
    mem = 5 * torch.randn(50, generator=gen)
    mem[10:] = -float("inf")  # the memory knows only 10 tokens
    mem = torch.log_softmax(mem, -1)
    for alpha in (0.0, 0.3, 1.0):
        got = fn(base, mem, alpha)
        want = blend_logits(base, mem, alpha, mode="probs")
        assert got.shape == want.shape, f"return log-probabilities of shape {tuple(want.shape)}"
        assert not torch.isnan(got).any(), (
            f"alpha={alpha}: NaN. log(0) meets 0*inf somewhere; mix in log space with "
            "torch.logaddexp(log(1-a) + log p_base, log(a) + log p_mem)")
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], atol=1e-4), (
            f"alpha={alpha}: not (1-alpha)*softmax(base) + alpha*p_memory (as log-probs)")
    print("passed")
