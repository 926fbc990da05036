"""Checks for the notebooks' "try it" exercises: compare to a reference.

Each ``check_*`` runs the learner's function on small fixed inputs and prints
one line: "passed", or "failed: ..." saying what it expected and what it got
(wrong shape, dtype or device, NaN, a wrong number, or an exception the
function raised).  It returns True or False and never stops the notebook,
except for ``NotImplementedError``, which it lets through so the notebook's
stub cell can say "not implemented yet".
"""

from __future__ import annotations

import functools

import numpy as np
import torch


class _Failed(Exception):
    """One line for the learner: what was expected, what came back."""


def _exercise(check):
    """Turn a check's ``_Failed``/exceptions into one printed line and a bool."""
    @functools.wraps(check)
    def run(fn) -> bool:
        try:
            check(fn)
        except _Failed as err:
            print(f"failed: {err}")
            return False
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 - an answer the comparison cannot read
            print(f"failed: could not compare your answer ({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})")
            return False
        print("passed")
        return True
    return run


def _call(fn, *args):
    """``fn(*args)``; an exception (other than NotImplementedError) becomes one line."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's code may raise anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _Failed(f"your function raised {type(err).__name__}: {first}") from None


def _describe(x) -> str:
    """``float32 tensor of shape (5, 3) on cpu`` and the like."""
    if torch.is_tensor(x):
        return f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)} " \
               f"on {x.device.type}"
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return f"{type(x).__name__} {x!r}"[:80]


def _expect_tensor(got, what: str, shape, device=None, floating: bool | None = None):
    """A tensor of ``shape`` (on ``device``; float or integer) with no NaN."""
    want = (f"{'a floating' if floating else 'an integer' if floating is False else 'a'} "
            f"tensor of shape {tuple(shape)}" + (f" on {device.type}" if device else ""))
    if not torch.is_tensor(got):
        raise _Failed(f"{what}: expected {want}; got {_describe(got)}")
    if (tuple(got.shape) != tuple(shape) or (device is not None and got.device != device)
            or (floating is not None and got.is_floating_point() != floating)):
        raise _Failed(f"{what}: expected {want}; got {_describe(got)}")
    if got.is_floating_point() and torch.isnan(got).any():
        raise _Failed(f"{what}: expected no NaN; got {int(torch.isnan(got).sum())} NaN "
                      "entries")


def _expect_number(got, what: str) -> float:
    """A finite Python/numpy/0-d tensor number."""
    if torch.is_tensor(got) or isinstance(got, np.ndarray):
        if got.ndim != 0 and tuple(got.shape) != (1,):
            raise _Failed(f"{what}: expected one number; got {_describe(got)}")
        got = got.reshape(()).item()
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, float, np.number)):
        raise _Failed(f"{what}: expected one number; got {_describe(got)}")
    got = float(got)
    if got != got:
        raise _Failed(f"{what}: expected a finite number; got NaN")
    return got


def _reference_next_token_pairs(hidden, input_ids, attention_mask):
    """Notebook 01: keys are states at t, values the token at t+1, no padding."""
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()  # (B, T-1)
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


@_exercise
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
    got = _call(fn, hidden, input_ids, attention_mask)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise _Failed(f"expected a pair (keys, values); got {_describe(got)}")
    keys, values = got
    ref_k, ref_v = _reference_next_token_pairs(hidden, input_ids, attention_mask)
    expected = sum(n - 1 for n in lengths)
    if torch.is_tensor(keys) and keys.ndim == 2 and keys.shape[0] != expected:
        raise _Failed(f"keys: expected shape ({expected}, {D}), one per real token that "
                      f"has a next real token; got {tuple(keys.shape)}")
    _expect_tensor(keys, "keys", (expected, D), floating=True)
    _expect_tensor(values, "values", (expected,), floating=False)
    if not torch.equal(values, ref_v):
        raise _Failed("values: expected the *next* token ids (input_ids[b, t+1]), in order; "
                      f"got {values[:4].tolist()}... instead of {ref_v[:4].tolist()}...")
    if not torch.allclose(keys, ref_k):
        raise _Failed("keys: expected hidden[b, t] for each value at t+1; got other rows")


@_exercise
def check_knn_prob(fn) -> None:
    """Exercise of notebook 02: ``fn(distances, values, target, temperature)``."""
    from .knn import knn_prob_of

    rng = np.random.default_rng(2)
    for temperature in (1.0, 50.0, 5000.0):
        distances = np.sort(rng.uniform(2000, 5000, 16)).astype(np.float32)  # (k,)
        values = rng.integers(0, 4, 16)                                      # (k,)
        for target in range(5):
            got = _expect_number(_call(fn, distances, values, target, temperature),
                                 f"T={temperature}, target={target}")
            want = float(knn_prob_of(np.array([target]), distances[None], values[None],
                                     temperature)[0])
            if abs(got - want) >= 1e-5:
                raise _Failed(
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


@_exercise
def check_drop_self(fn) -> None:
    """Exercise of notebook 02: ``fn(distances (Q, k+1), ids (Q, k+1), own (Q,))``."""
    from .knn import drop_own_rows

    distances, ids, own = _drop_self_case()
    got = _call(fn, distances.copy(), ids.copy(), own.copy())
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise _Failed(f"expected a pair (distances, ids); got {_describe(got)}")
    want_d, want_i = drop_own_rows(distances, ids, own)
    for what, g, w in (("ids", got[1], want_i), ("distances", got[0], want_d)):
        g = np.asarray(g.cpu() if torch.is_tensor(g) else g)
        if g.shape != w.shape:
            raise _Failed(f"{what}: expected shape {w.shape} (k = {w.shape[1]} per query); "
                          f"got {g.shape}")
        if not np.array_equal(g, w):
            row = int(np.flatnonzero((g != w).any(axis=1))[0])
            raise _Failed(f"{what}, query {row}: expected {w[row].tolist()}, got "
                          f"{g[row].tolist()}. Drop the query's own row; if it is not "
                          "among the results, drop the farthest neighbour instead")


def _reference_sparse_kl(logq, cols, probs):
    """Notebook 03: KL(p || q) with p sparse: sum p (log p - log q), batch mean."""
    used = probs > 0
    logq_t = logq.gather(1, cols.clamp(min=0))
    logp = torch.log(torch.where(used, probs, torch.ones_like(probs)))
    return torch.where(used, probs * (logp - logq_t), 0.0).sum(1).mean()


@_exercise
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
    got = _call(fn, logq, cols, probs)
    want = _reference_sparse_kl(logq, cols, probs)
    if not torch.is_tensor(got) or got.ndim != 0:
        raise _Failed(f"expected one number, the batch mean, as a 0-d tensor; got "
                      f"{_describe(got)}")
    if not torch.isfinite(got):
        raise _Failed(f"expected a finite number; got {got.item()}: skip unused slots "
                      "(probability 0, column -1) instead of taking log(0)")
    if not torch.allclose(got, want, atol=1e-5):
        raise _Failed(f"expected {want.item():.5f}, got {got.item():.5f}: sum "
                      "p*(log p - log q) over the used slots of each row, then average "
                      "over the batch")


@_exercise
def check_prob_blend(fn) -> None:
    """Exercise of notebook 04: ``fn(base_logits (V,), memory_logp (V,), alpha)``."""
    from .sampling import blend_logits

    gen = torch.Generator().manual_seed(4)
    base = 5 * torch.randn(50, generator=gen)
    mem = 5 * torch.randn(50, generator=gen)
    mem[10:] = -float("inf")  # the memory knows only 10 tokens
    mem = torch.log_softmax(mem, -1)
    for alpha in (0.0, 0.3, 1.0):
        got = _call(fn, base, mem, alpha)
        want = blend_logits(base, mem, alpha, mode="probs")
        if torch.is_tensor(got) and tuple(got.shape) == tuple(want.shape) \
                and got.device == base.device and torch.isnan(got).any():
            raise _Failed(f"alpha={alpha}: expected no NaN; got NaN. log(0) meets 0*inf "
                          "somewhere; mix in log space with torch.logaddexp(log(1-a) + "
                          "log p_base, log(a) + log p_mem)")
        _expect_tensor(got, f"alpha={alpha}", want.shape, base.device, floating=True)
        finite = torch.isfinite(want)
        if not torch.allclose(got[finite], want[finite], atol=1e-4):
            raise _Failed(f"alpha={alpha}: expected (1-alpha)*softmax(base) + "
                          "alpha*p_memory as log-probabilities; got other values")


def _window_case():
    """Keys of 3 documents (lengths 3, 1, 4), 2-d, and rows that touch each start."""
    keys = torch.arange(16, dtype=torch.float32).reshape(8, 2) + 1  # (8, 2), no zeros
    doc = np.array([0, 0, 0, 1, 2, 2, 2, 2])
    rows = np.array([0, 2, 3, 4, 7, 6])
    return keys.numpy(), doc, rows


@_exercise
def check_window_batch(fn) -> None:
    """Exercise of notebook 03: ``fn(keys (N, D), doc (N,), rows (B,), W)``."""
    from .train_decoder import window_batch

    keys, doc, rows = _window_case()
    for W in (1, 3):
        got = _call(fn, keys.copy(), doc.copy(), rows.copy(), W)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _Failed(f"W={W}: expected a pair (x, pad); got {_describe(got)}")
        want_x, want_pad = window_batch(keys, doc, rows, W)
        x, pad = got
        _expect_tensor(x, f"W={W}, x", want_x.shape, floating=True)
        _expect_tensor(pad, f"W={W}, pad", want_pad.shape)
        if pad.dtype != torch.bool:
            raise _Failed(f"W={W}, pad: expected a bool tensor (True = padded slot); got "
                          f"{_describe(pad)}")
        if not torch.equal(pad, want_pad):
            b = int((pad != want_pad).any(1).nonzero()[0])
            raise _Failed(f"W={W}, row {rows[b]}: expected pad {want_pad[b].tolist()}, got "
                          f"{pad[b].tolist()}. Slots before the start of the row's own "
                          "document are padding")
        if not torch.equal(x, want_x):
            b = int((x != want_x).flatten(1).any(1).nonzero()[0])
            raise _Failed(f"W={W}, row {rows[b]}: expected x {want_x[b].tolist()}, got "
                          f"{x[b].tolist()}. The last slot is the row itself; padded slots "
                          "are zeros")


@_exercise
def check_sampling_distribution(fn) -> None:
    """Exercise of notebook 04: ``fn(logp (V,), temperature, top_k)`` -> probs (V,)."""
    from .sampling import sampling_distribution

    gen = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(3 * torch.randn(40, generator=gen), -1)
    for temperature, top_k in ((1.0, None), (0.5, 5), (2.0, 5), (1.0, 1)):
        what = f"temperature={temperature}, top_k={top_k}"
        got = _call(fn, logp.clone(), temperature, top_k)
        want = sampling_distribution(logp, temperature, top_k)
        _expect_tensor(got, what, want.shape, logp.device, floating=True)
        if not torch.allclose(got, want, atol=1e-5):
            kept, want_kept = int((got > 0).sum()), int((want > 0).sum())
            hint = (f"{want_kept} tokens should keep probability > 0, got {kept}"
                    if kept != want_kept else "divide the log-probabilities by the "
                    "temperature before the softmax")
            raise _Failed(f"{what}: expected softmax(logp / T) over the top_k most likely "
                          f"tokens; got other values ({hint})")


def _words(text: str) -> int:
    """A stand-in tokenizer for the checks: one token per word."""
    return len(text.split())


@_exercise
def check_fit_prompt(fn) -> None:
    """Exercise of notebook 05: ``fn(turns, question, count_tokens, budget)``."""
    from .chat import build_prompt

    turns = [("What is personal data?", "Any information on a person."),
             ("Who is the controller?", "Whoever decides why and how data are processed."),
             ("What is erasure?", "Deleting the data.")]
    question = "When must data be erased?"
    for budget in (100, 30, 20, 8, 3):
        got = _call(fn, list(turns), question, _words, budget)
        want = build_prompt(turns, question, _words, budget)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise _Failed(f"budget={budget}: expected a pair (prompt, n_dropped); got "
                          f"{_describe(got)}")
        if tuple(got) != want:
            raise _Failed(f"budget={budget} words: expected {want[1]} turn(s) dropped "
                          f"({'no prompt fits: None' if want[0] is None else f'{_words(want[0])} words'}); "
                          f"got {got[1]!r} dropped, "
                          f"{'None' if got[0] is None else f'{_words(str(got[0]))} words'}. "
                          "Drop the oldest turns first, until the prompt fits; keep the "
                          "rest in order, oldest first, then the open question")


@_exercise
def check_flipped(fn) -> None:
    """Exercise of notebook 05: ``fn(blend_logp (N, V), base_logp (N, V))`` -> int."""
    gen = torch.Generator().manual_seed(6)
    base = torch.log_softmax(torch.randn(7, 12, generator=gen), -1)
    blend = base.clone()
    for t, token in ((1, 3), (4, 0), (5, 11)):  # the memory moves 3 of 7 argmaxes
        blend[t, token] = blend[t].max() + 1.0
    blend[2] += 0.5  # a shift that changes no choice
    got = _expect_number(_call(fn, blend, base), "flipped")
    want = int((blend.argmax(-1) != base.argmax(-1)).sum())
    if got != want:
        raise _Failed(f"expected {want} of {len(base)} tokens flipped, got {got:g}: count the "
                      "positions where the blend's most likely token is not the base model's")


@_exercise
def check_plan_windows(fn) -> None:
    """Exercise of notebook 01: ``fn(n_tokens, window, overlap)`` -> [(start, end, first)]."""
    from .hidden import plan_windows

    for n_tokens, window, overlap in ((5, 8, 2), (8, 8, 2), (9, 8, 2), (20, 8, 3), (23, 6, 0)):
        got = _call(fn, n_tokens, window, overlap)
        want = plan_windows(n_tokens, window, overlap, prepend_bos=False)
        try:
            got = [tuple(int(v) for v in t) for t in got]
        except (TypeError, ValueError):
            raise _Failed(f"n_tokens={n_tokens}: expected a list of (start, end, first_target) "
                          f"triples; got {_describe(got)}") from None
        if got != want:
            raise _Failed(f"n_tokens={n_tokens}, window={window}, overlap={overlap}: expected "
                          f"{want}, got {got}. Each window after the first starts `overlap` "
                          "tokens before its first target; targets 1..n_tokens-1 once each")
