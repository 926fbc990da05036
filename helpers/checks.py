"""Checks for the notebooks' "try it" exercises: compare to a reference.

Each ``check_*`` runs the learner's function on small fixed inputs and prints
one line: "passed", or "failed: ..." saying what it expected and what it got
(wrong shape, dtype or device, NaN, a wrong number, or an exception the
function raised).  It returns True or False and never stops the notebook,
except for ``NotImplementedError``, which it lets through so the notebook's
stub cell can say "not implemented yet".
"""

from __future__ import annotations

import numpy as np
import torch

from .exercise import Failed, call, describe, exercise, expect_number, expect_tensor


def _reference_next_token_pairs(hidden, input_ids, attention_mask):
    """Notebook 01: keys are states at t, values the token at t+1, no padding."""
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # (B, T-1)
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


@exercise
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
    got = call(fn, hidden, input_ids, attention_mask)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Failed(f"expected a pair (keys, values); got {describe(got)}")
    keys, values = got
    ref_k, ref_v = _reference_next_token_pairs(hidden, input_ids, attention_mask)
    expected = sum(n - 1 for n in lengths)
    if torch.is_tensor(keys) and keys.ndim == 2 and keys.shape[0] != expected:
        raise Failed(f"keys: expected shape ({expected}, {D}), one per real token that "
                      f"has a next real token; got {tuple(keys.shape)}")
    expect_tensor(keys, "keys", (expected, D), floating=True)
    expect_tensor(values, "values", (expected,), floating=False)
    if not torch.equal(values, ref_v):
        raise Failed("values: expected the *next* token ids (input_ids[b, t+1]), in order; "
                      f"got {values[:4].tolist()}... instead of {ref_v[:4].tolist()}...")
    if not torch.allclose(keys, ref_k):
        raise Failed("keys: expected hidden[b, t] for each value at t+1; got other rows")


@exercise
def check_knn_prob(fn) -> None:
    """Exercise of notebook 02: ``fn(distances, values, target, temperature)``."""
    from .knn import knn_prob_of

    rng = np.random.default_rng(2)
    for temperature in (1.0, 50.0, 5000.0):
        distances = np.sort(rng.uniform(2000, 5000, 16)).astype(np.float32)  # (k,)
        values = rng.integers(0, 4, 16)                                      # (k,)
        for target in range(5):
            got = expect_number(call(fn, distances, values, target, temperature),
                                 f"T={temperature}, target={target}")
            want = float(knn_prob_of(np.array([target]), distances[None], values[None],
                                     temperature)[0])
            if abs(got - want) >= 1e-5:
                raise Failed(
                    f"T={temperature}, target={target}: expected {want:.6f}, got {got:.6f}. "
                    "Sum exp(-d/T) over neighbours whose value is the target, divided by "
                    "the sum over all neighbours (subtract the smallest distance first).")


def _drop_self_case():
    """Distances/ids of k+1 neighbours for 4 queries that are stored rows 10..13."""
    ids = np.array([[10, 3, 7, 5], [2, 11, 9, 4], [6, 8, 1, 0], [13, 12, 14, 15]])
    distances = np.array([[0., 4., 9., 16.], [1., 1., 2., 3.], [5., 6., 7., 8.],
                          [0., 0., 1., 2.]], dtype=np.float32)
    own = np.array([10, 11, 12, 13])  # query 2's own row (12) was not found
    return distances, ids, own


@exercise
def check_drop_self(fn) -> None:
    """Exercise of notebook 02: ``fn(distances (Q, k+1), ids (Q, k+1), own (Q,))``."""
    from .knn import drop_own_rows

    distances, ids, own = _drop_self_case()
    got = call(fn, distances.copy(), ids.copy(), own.copy())
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Failed(f"expected a pair (distances, ids); got {describe(got)}")
    want_d, want_i = drop_own_rows(distances, ids, own)
    for what, g, w in (("ids", got[1], want_i), ("distances", got[0], want_d)):
        g = np.asarray(g.cpu() if torch.is_tensor(g) else g)
        if g.shape != w.shape:
            raise Failed(f"{what}: expected shape {w.shape} (k = {w.shape[1]} per query); "
                          f"got {g.shape}")
        if not np.array_equal(g, w):
            row = int(np.flatnonzero((g != w).any(axis=1))[0])
            raise Failed(f"{what}, query {row}: expected {w[row].tolist()}, got "
                          f"{g[row].tolist()}. Drop the query's own row; if it is not "
                          "among the results, drop the farthest neighbour instead")


def _reference_sparse_kl(logq, cols, probs):
    """Notebook 03: KL(p || q) with p sparse: sum p (log p - log q), batch mean."""
    used = probs > 0
    logq_t = logq.gather(1, cols.clamp(min=0))
    logp = torch.log(torch.where(used, probs, torch.ones_like(probs)))
    return torch.where(used, probs * (logp - logq_t), 0.0).sum(1).mean()


@exercise
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
    got = call(fn, logq, cols, probs)
    want = _reference_sparse_kl(logq, cols, probs)
    if not torch.is_tensor(got) or got.ndim != 0:
        raise Failed(f"expected one number, the batch mean, as a 0-d tensor; got "
                      f"{describe(got)}")
    if not torch.isfinite(got):
        raise Failed(f"expected a finite number; got {got.item()}: skip unused slots "
                      "(probability 0, column -1) instead of taking log(0)")
    if not torch.allclose(got, want, atol=1e-5):
        raise Failed(f"expected {want.item():.5f}, got {got.item():.5f}: sum "
                      "p*(log p - log q) over the used slots of each row, then average "
                      "over the batch")


@exercise
def check_prob_blend(fn) -> None:
    """Exercise of notebook 04: ``fn(base_logits (V,), memory_logp (V,), alpha)``."""
    from .sampling import blend_logits

    gen = torch.Generator().manual_seed(4)
    base = 5 * torch.randn(50, generator=gen)
    mem = 5 * torch.randn(50, generator=gen)
    mem[10:] = -float("inf")  # the memory knows only 10 tokens
    mem = torch.log_softmax(mem, -1)
    for alpha in (0.0, 0.3, 1.0):
        got = call(fn, base, mem, alpha)
        want = blend_logits(base, mem, alpha, mode="probs")
        if torch.is_tensor(got) and tuple(got.shape) == tuple(want.shape) \
                and got.device == base.device and torch.isnan(got).any():
            raise Failed(f"alpha={alpha}: expected no NaN; got NaN. log(0) meets 0*inf "
                          "somewhere; mix in log space with torch.logaddexp(log(1-a) + "
                          "log p_base, log(a) + log p_mem)")
        expect_tensor(got, f"alpha={alpha}", want.shape, base.device, floating=True)
        finite = torch.isfinite(want)
        if not torch.allclose(got[finite], want[finite], atol=1e-4):
            raise Failed(f"alpha={alpha}: expected (1-alpha)*softmax(base) + "
                          "alpha*p_memory as log-probabilities; got other values")


def _window_case():
    """Keys of 3 documents (lengths 3, 1, 4), 2-d, and rows that touch each start."""
    keys = torch.arange(16, dtype=torch.float32).reshape(8, 2) + 1  # (8, 2), no zeros
    doc = np.array([0, 0, 0, 1, 2, 2, 2, 2])
    rows = np.array([0, 2, 3, 4, 7, 6])
    return keys.numpy(), doc, rows


@exercise
def check_window_batch(fn) -> None:
    """Exercise of notebook 03: ``fn(keys (N, D), doc (N,), rows (B,), W)``."""
    from .train_decoder import window_batch

    keys, doc, rows = _window_case()
    for W in (1, 3):
        got = call(fn, keys.copy(), doc.copy(), rows.copy(), W)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failed(f"W={W}: expected a pair (x, pad); got {describe(got)}")
        want_x, want_pad = window_batch(keys, doc, rows, W)
        x, pad = got
        expect_tensor(x, f"W={W}, x", want_x.shape, floating=True)
        expect_tensor(pad, f"W={W}, pad", want_pad.shape)
        if pad.dtype != torch.bool:
            raise Failed(f"W={W}, pad: expected a bool tensor (True = padded slot); got "
                          f"{describe(pad)}")
        if not torch.equal(pad, want_pad):
            b = int((pad != want_pad).any(1).nonzero()[0])
            raise Failed(f"W={W}, row {rows[b]}: expected pad {want_pad[b].tolist()}, got "
                          f"{pad[b].tolist()}. Slots before the start of the row's own "
                          "document are padding")
        if not torch.equal(x, want_x):
            b = int((x != want_x).flatten(1).any(1).nonzero()[0])
            raise Failed(f"W={W}, row {rows[b]}: expected x {want_x[b].tolist()}, got "
                          f"{x[b].tolist()}. The last slot is the row itself; padded slots "
                          "are zeros")


@exercise
def check_sampling_distribution(fn) -> None:
    """Exercise of notebook 04: ``fn(logp (V,), temperature, top_k)`` -> probs (V,)."""
    from .sampling import sampling_distribution

    gen = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(3 * torch.randn(40, generator=gen), -1)
    for temperature, top_k in ((1.0, None), (0.5, 5), (2.0, 5), (1.0, 1)):
        what = f"temperature={temperature}, top_k={top_k}"
        got = call(fn, logp.clone(), temperature, top_k)
        want = sampling_distribution(logp, temperature, top_k)
        expect_tensor(got, what, want.shape, logp.device, floating=True)
        if not torch.allclose(got, want, atol=1e-5):
            kept, want_kept = int((got > 0).sum()), int((want > 0).sum())
            hint = (f"{want_kept} tokens should keep probability > 0, got {kept}"
                    if kept != want_kept else "divide the log-probabilities by the "
                    "temperature before the softmax")
            raise Failed(f"{what}: expected softmax(logp / T) over the top_k most likely "
                          f"tokens; got other values ({hint})")


def _words(text: str) -> int:
    """A stand-in tokenizer for the checks: one token per word."""
    return len(text.split())


@exercise
def check_fit_prompt(fn) -> None:
    """Exercise of notebook 05: ``fn(turns, question, count_tokens, budget)``."""
    from .chat import build_prompt

    turns = [("What is personal data?", "Any information on a person."),
             ("Who is the controller?", "Whoever decides why and how data are processed."),
             ("What is erasure?", "Deleting the data.")]
    question = "When must data be erased?"
    for budget in (100, 30, 20, 8, 3):
        got = call(fn, list(turns), question, _words, budget)
        want = build_prompt(turns, question, _words, budget)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Failed(f"budget={budget}: expected a pair (prompt, n_dropped); got "
                          f"{describe(got)}")
        if tuple(got) != want:
            size = lambda prompt: "None" if prompt is None else f"{_words(str(prompt))} words"
            raise Failed(f"budget={budget} words: expected {want[1]} turn(s) dropped, "
                          f"prompt {size(want[0])}; got {got[1]!r} dropped, {size(got[0])}. "
                          "Drop the oldest turns first, until the prompt fits; keep the "
                          "rest in order, oldest first, then the open question")


@exercise
def check_flipped(fn) -> None:
    """Exercise of notebook 05: ``fn(blend_logp (N, V), base_logp (N, V))`` -> int."""
    gen = torch.Generator().manual_seed(6)
    base = torch.log_softmax(torch.randn(7, 12, generator=gen), -1)
    blend = base.clone()
    for t, token in ((1, 3), (4, 0), (5, 11)):  # the memory moves 3 of 7 argmaxes
        blend[t, token] = blend[t].max() + 1.0
    blend[2] += 0.5  # a shift that changes no choice
    got = expect_number(call(fn, blend, base), "flipped")
    want = int((blend.argmax(-1) != base.argmax(-1)).sum())
    if got != want:
        raise Failed(f"expected {want} of {len(base)} tokens flipped, got {got:g}: count the "
                      "positions where the blend's most likely token is not the base model's")


@exercise
def check_plan_windows(fn) -> None:
    """Exercise of notebook 01: ``fn(n_tokens, window, overlap)`` -> [(start, end, first)]."""
    from .hidden import plan_windows

    for n_tokens, window, overlap in ((5, 8, 2), (8, 8, 2), (9, 8, 2), (20, 8, 3), (23, 6, 0)):
        got = call(fn, n_tokens, window, overlap)
        want = plan_windows(n_tokens, window, overlap, prepend_bos=False)
        try:
            got = [tuple(int(v) for v in t) for t in got]
        except (TypeError, ValueError):
            raise Failed(f"n_tokens={n_tokens}: expected a list of (start, end, first_target) "
                          f"triples; got {describe(got)}") from None
        if got != want:
            raise Failed(f"n_tokens={n_tokens}, window={window}, overlap={overlap}: expected "
                          f"{want}, got {got}. Each window after the first starts `overlap` "
                          "tokens before its first target; targets 1..n_tokens-1 once each")


def _rows_case():
    """Three texts laid out as extract_keys writes them: values, doc, pos."""
    values = np.array([11, 12, 13, 14, 21, 31, 32, 33, 34, 35])
    doc = np.array([0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    pos = np.array([0, 1, 2, 3, 0, 0, 1, 2, 3, 4])
    return values, doc, pos


@exercise
def check_tokens_before(fn) -> None:
    """Exercise of notebook 06: ``fn(values, pos, row, bos_id)`` -> list of token ids."""
    from types import SimpleNamespace

    from .train_token_decoder import token_windows

    values, doc, pos = _rows_case()
    for row in (0, 3, 4, 5, 9):
        got = call(fn, values.copy(), pos.copy(), row, 2)
        ids, at = token_windows(SimpleNamespace(values=values, doc=doc, pos=pos), [row], 16, 2)
        want = ids[0, :int(at[0]) + 1].tolist()
        try:
            got = [int(t) for t in got]
        except (TypeError, ValueError):
            raise Failed(f"row {row}: expected a list of {len(want)} token ids; got "
                          f"{describe(got)}") from None
        if got != want:
            raise Failed(f"row {row} (pos {pos[row]}): expected {want}, got {got}. Start with "
                          "bos_id, then the values of the rows before it in the same text")


@exercise
def check_compact_ids(fn) -> None:
    """Exercise of notebook 06: ``fn(ids, vocab_ids, base_vocab_size)`` -> compact ids."""
    from .token_decoder import TokenDecoderConfig, TokenMemoryDecoder

    vocab_ids, base = [2, 5, 9, 11], 16
    dec = TokenMemoryDecoder(TokenDecoderConfig(base_vocab_size=base, vocab_ids=vocab_ids,
                                                dim=8, n_layers=1, n_heads=2, context=4))
    for ids in (torch.tensor([2, 5, 9, 11]), torch.tensor([[0, 2, 3], [11, 15, 9]]),
                torch.tensor([-1, 16, 100, 5, -5, 18])):
        got = call(fn, ids.clone(), list(vocab_ids), base)
        want = dec.compact(ids)
        expect_tensor(got, f"ids {ids.tolist()}", want.shape, floating=False)
        if not torch.equal(got.long(), want):
            raise Failed(f"ids {ids.tolist()}: expected {want.tolist()}, got {got.tolist()}. "
                          f"An id in vocab_ids becomes its position there; every other id "
                          f"(negative or >= base_vocab_size too) becomes {len(vocab_ids)}")
