"""Held-out evaluation shared by notebooks 02-04: one base pass, cached.

Explained in ``notebooks/02_datastore_knn_lm.ipynb``.  Scoring the held-out
articles needs the base model's probability of every true next token, which
means the 262,144-wide head on ~24k positions: minutes on a CPU.  The result
is cached in ``data/cache/eval/`` (an ``.npz`` of plain arrays, no pickle),
keyed by model, corpus fingerprint and window settings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datastore import corpus_fingerprint
from .knn import base_target_probs, head_logits
from .model import weights_fingerprint
from .paths import CorruptFile, atomic_file, cache_dir
from .paths import load_npz as _load


@dataclass
class HeldOut:
    """One row per held-out target token, in ``extract_keys`` order."""
    keys: np.ndarray     # (N, D) float32 base hidden states
    values: np.ndarray   # (N,) int64 true next token
    doc: np.ndarray      # (N,) int32 held-out article index
    pos: np.ndarray      # (N,) int32 position of the key in its article
    p_base: np.ndarray   # (N,) float32 base model's p(true next token)
    answer: np.ndarray   # (N,) bool: target lies in the Answer part (not the template)

    @property
    def valid(self) -> np.ndarray:
        """Even articles: tune λ, α, K, T here."""
        return self.doc % 2 == 0

    @property
    def test(self) -> np.ndarray:
        """Odd articles: report here (all articles if there is only one)."""
        odd = self.doc % 2 == 1
        return odd if odd.any() else self.valid


def answer_starts(tokenizer, texts: list[str]) -> np.ndarray:
    """Token index where each text's ``Answer:`` part begins."""
    return np.array([len(tokenizer(t.split("\nAnswer:")[0] + "\nAnswer:")["input_ids"])
                     for t in texts])


def heldout_eval(model, tokenizer, texts: list[str], model_name: str,
                 window: int = 256, overlap: int = 64, progress: bool = True) -> HeldOut:
    """Keys and ``p_base`` for every held-out target token (cached on disk).

    ``progress`` shows bars for the body and the head while it computes.
    """
    texts = list(texts)
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in model_name)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    path = cache_dir("eval") / (f"{slug}-{corpus_fingerprint(texts)}-w{window}-o{overlap}"
                                f"-{dtype}-{weights_fingerprint(model)}.npz")
    if path.exists():
        try:
            return HeldOut(**_load(path, "computing the held-out pass again.",
                                   HeldOut.__dataclass_fields__))
        except CorruptFile as err:  # a damaged cache entry: computed again below
            warnings.warn(str(err), stacklevel=2)
    ex, p_base = base_target_probs(model, tokenizer, texts, window=window, overlap=overlap,
                                   progress=progress)
    answer = ex.pos + 1 >= answer_starts(tokenizer, texts)[ex.doc]
    result = HeldOut(ex.keys, ex.values, ex.doc, ex.pos, p_base, answer)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **result.__dict__)
    return result


def load_npz(path: Path) -> dict:
    """Read an ``.npz`` of plain arrays (pickle refused)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@torch.inference_mode()
def score_rows(model, decoder, keys, doc, values, alphas=(), rows=None, chunk: int = 256,
               progress: bool = True, desc: str = "scoring rows") -> dict[str, np.ndarray]:
    """Everything notebook 04 needs about held-out rows, from **one** head pass.

    The base model's 262,144-wide head is the expensive part of scoring a row,
    so each row gets it once, together with the decoder's distribution, and
    everything is computed from the two (``chunk`` rows at a time):

    * ``p_base``, ``p_dec`` ``(R,)``: each model's probability of the true
      next token (tokens outside a store-headed decoder get ``exp(-30)``);
    * ``features`` ``(R, F)``: the α gate's signals (``helpers.gate.FEATURES``);
    * ``logits_nll`` ``(R, A)``: ``-log softmax((1-α)·z + α·log p_dec)[y]`` for
      each α of ``alphas`` (the logit blend needs the normaliser over the whole
      vocabulary, so it is computed while the logits are at hand; one
      ``logsumexp`` per α).

    ``keys``/``doc``/``values`` as in ``helpers.hidden.Extraction`` (or a
    ``HeldOut``): pass the full arrays and choose with ``rows`` (default all),
    since a decoder window reads the rows before each one.
    ``blend_perplexities`` turns the result into perplexities for any subset.
    """
    from .train_decoder import window_batch

    keys, values = np.asarray(keys), np.asarray(values)
    idx = _rows(values, rows)
    out = _empty_scores(idx, alphas)
    dev = next(decoder.parameters()).device
    sparse = decoder.config.head == "store"  # head over the store's tokens: (C, V_s) suffices
    was_training = decoder.training
    decoder.eval()
    starts = _bar(range(0, len(idx), chunk), progress, desc, "chunk")
    for i in starts:
        r = idx[i:i + chunk]
        z = head_logits(model, keys[r])                                    # (C, V) base logits
        x, pad = window_batch(keys, doc, r, decoder.config.window)
        dec = torch.log_softmax(decoder(x.to(dev), pad.to(dev)).float(), -1).to(z.device)
        col = decoder.head_index(torch.as_tensor(values[r], device=dev)).to(z.device) \
            if sparse else None
        _score_chunk(out, np.arange(i, i + len(r)), z, dec, values[r],
                     decoder.vocab.to(z.device) if sparse else None, col)
    decoder.train(was_training)
    return out


def _bar(steps, progress: bool, desc: str, unit: str, total: int | None = None):
    """``steps``, behind a ``tqdm.auto`` bar when ``progress`` (``total``: its length, for
    a generator)."""
    if not progress:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps, desc=desc, unit=unit, total=total)


def _rows(values, rows) -> np.ndarray:
    """Row indices to score: all (``None``), a boolean mask or indices."""
    if rows is None:
        return np.arange(len(values))
    idx = np.asarray(rows)
    return np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)


def _empty_scores(idx: np.ndarray, alphas) -> dict:
    from .gate import FEATURES

    alphas = np.array([float(a) for a in alphas])                          # (A,)
    return {"rows": idx, "alphas": alphas,
            "features": np.empty((len(idx), len(FEATURES)), np.float32),
            "p_base": np.empty(len(idx), np.float32), "p_dec": np.empty(len(idx), np.float32),
            "logits_nll": np.zeros((len(idx), len(alphas)))}


def _score_chunk(out: dict, at: np.ndarray, z, dec, y, vocab, col) -> None:
    """Fill ``out``'s entries ``at`` from one chunk: base logits ``z (C, V)``, the
    memory's log-probs ``dec`` (``(C, V)``, or ``(C, V_s)`` over ``vocab`` with the
    head column ``col (C,)`` of each true token ``y (C,)``, -1 where it has none)."""
    from .gate import DEC_FLOOR, gate_features_and_normaliser
    from .sampling import LOG_FLOOR

    alphas = out["alphas"]
    y = torch.as_tensor(np.asarray(y), device=z.device)[:, None]          # (C, 1)
    feats, z_max, lse_z = gate_features_and_normaliser(z, dec, vocab=vocab)  # (C, 1) each
    out["features"][at] = feats.cpu().numpy()
    if vocab is not None:
        col = col[:, None]
        dec_y = torch.where(col >= 0, dec.gather(1, col.clamp(min=0)), DEC_FLOOR)[:, 0]
    else:                                                                  # dec: (C, V)
        dec_y = dec.gather(1, y)[:, 0]
    z_y, lse_z = z.gather(1, y)[:, 0], lse_z[:, 0]
    out["p_base"][at] = (z_y - lse_z).exp().cpu().numpy()
    out["p_dec"][at] = dec_y.exp().cpu().numpy()
    if len(alphas):
        nll = np.zeros((len(at), len(alphas)))
        mem_y = dec_y.clamp(min=LOG_FLOOR)
        if vocab is not None:
            _logit_blend_nll_sparse(nll, alphas, z, z_max, z_y, lse_z,
                                    dec.clamp(min=LOG_FLOOR), vocab, mem_y, LOG_FLOOR)
        else:
            _logit_blend_nll(nll, alphas, z, z_y, lse_z, dec.clamp(min=LOG_FLOOR), mem_y)
        out["logits_nll"][at] = nll


@torch.inference_mode()
def score_token_rows(model, decoder, rows_like, alphas=(), rows=None, chunk: int = 256,
                     batch_chunks: int = 8, overlap: int | None = None, progress: bool = True,
                     desc: str = "scoring rows") -> dict[str, np.ndarray]:
    """``score_rows`` for a token-level decoder (``helpers.token_decoder``, notebook 06).

    The same result, row for row: the base model's head once per row, the memory's
    distribution from the decoder reading the text's tokens instead of hidden
    states.  ``rows_like`` is a ``HeldOut`` or an ``Extraction`` (``keys``, ``values``,
    ``doc``, ``pos``); the decoder reads each text in chunks of its context as in
    training (``chunk_plan``, ``overlap`` tokens of left context: a quarter of the
    context by default, 64 of 256), ``batch_chunks`` at a time, and the head runs on
    ``chunk`` rows at a time.
    """
    from .train_token_decoder import chunk_plan, token_logp_rows

    keys, values = np.asarray(rows_like.keys), np.asarray(rows_like.values)
    idx = _rows(values, rows)
    uniq, back = np.unique(idx, return_inverse=True)   # each row scored once, then copied back
    out = _empty_scores(uniq, alphas)
    where = np.full(len(values), -1, np.int64)                             # row -> place in out
    where[uniq] = np.arange(len(uniq))
    plan = chunk_plan(rows_like, decoder.config.context, overlap)
    batches = token_logp_rows(decoder, rows_like, plan, wanted=where >= 0,
                              batch_size=batch_chunks)                     # (n,), (n, V_s)
    for r, logp in _bar(batches, progress, desc, "batch", -(-len(plan) // batch_chunks)):
        for j in range(0, len(r), chunk):
            rr = r[j:j + chunk]
            z = head_logits(model, keys[rr])                               # (C, V)
            col = decoder.head_index(torch.as_tensor(values[rr])).to(z.device)
            _score_chunk(out, where[rr], z, logp[j:j + chunk].to(z.device), values[rr],
                         decoder.vocab.to(z.device), col)
    return {"rows": idx, "alphas": out["alphas"],
            **{k: out[k][back] for k in ("features", "p_base", "p_dec", "logits_nll")}}


def _logit_blend_nll(dest: np.ndarray, alphas: np.ndarray, z, z_y, lse_z, mem, mem_y):
    """``dest[:, j] = -log softmax((1-α_j)·z + α_j·mem)[y]`` for one chunk.

    α = 0 reuses the base model's normaliser; every other α costs one pass over
    the ``(C, V)`` logits, in a buffer reused from α to α (a fresh 128 MB tensor
    per α would be page-faulted in again each time).  The shift that keeps
    ``exp`` in range is the mixture's upper bound ``(1-α)·max z + α·max mem``.
    """
    buf = None
    z_max, mem_max = z.max(-1, keepdim=True).values, mem.max(-1, keepdim=True).values
    for j, a in enumerate(alphas):
        if a == 0:
            lse = lse_z
        else:
            buf = torch.lerp(z, mem, float(a), out=buf) if buf is not None \
                else torch.lerp(z, mem, float(a))
            shift = (1 - a) * z_max + a * mem_max                          # (C, 1)
            lse = buf.sub_(shift).exp_().sum(-1).log_() + shift[:, 0]
        dest[:, j] = (lse - ((1 - a) * z_y + a * mem_y)).double().cpu().numpy()


def _logit_blend_nll_sparse(dest: np.ndarray, alphas: np.ndarray, z, z_max, z_y, lse_z, mem,
                            vocab, mem_y, floor: float):
    """``_logit_blend_nll`` for a decoder whose head covers only ``vocab`` ``(V_s,)``.

    Outside ``vocab`` the memory's log-probability is the constant ``floor``, so
    the mixture there is ``(1-α)·z + α·floor`` and its part of the normaliser is
    ``exp(α·floor) · Σ_outside exp((1-α)·z)``: one pass over the ``(C, V)``
    logits per α (a scale, an ``exp``, a sum) instead of building the dense
    ``(C, V)`` memory and blending it.  The ``V_s`` columns inside are added
    from ``(C, V_s)`` tensors.  ``mem`` ``(C, V_s)`` is already floored; ``z``
    is shifted in place (callers are done with it).
    """
    m_max = mem.max(-1, keepdim=True).values.clamp(min=floor)             # (C, 1) max of memory
    z.sub_(z_max)                                                         # z - max z, <= 0
    z_in = z[:, vocab]                                                    # (C, V_s)
    mem_in = mem - m_max                                                  # <= 0
    buf = None
    for j, a in enumerate(alphas):
        if a == 0:
            lse = lse_z
        else:
            c = 1.0 - a
            buf = torch.mul(z, c, out=buf) if buf is not None else z * c
            outside = buf.exp_().index_fill_(1, vocab, 0.0).sum(-1)         # (C,)
            inside = (c * z_in + a * mem_in).exp().sum(-1)                  # (C,)
            total = outside * torch.exp(a * (floor - m_max[:, 0])) + inside
            lse = total.log() + c * z_max[:, 0] + a * m_max[:, 0]
        dest[:, j] = (lse - ((1 - a) * z_y + a * mem_y)).double().cpu().numpy()


def blend_perplexities(scores: dict, select=None) -> dict[str, np.ndarray]:
    """Perplexity against α for both blends from ``score_rows``'s result.

    ``select``: a boolean mask over the **original** rows (e.g. ``ev.valid``)
    or ``None`` for every scored row.  ``"probs"``: ``(1-α)·p_base(y) +
    α·p_dec(y)``; ``"logits"``: the logit blend's normalised probability.
    Returns ``{"logits": (A,), "probs": (A,)}``.
    """
    keep = np.ones(len(scores["rows"]), bool) if select is None else \
        np.asarray(select, bool)[scores["rows"]]
    if not keep.any():
        raise ValueError("no scored rows in this selection: pass a mask over the rows "
                         "given to score_rows, e.g. ev.valid or ev.test.")
    a = scores["alphas"][:, None]                                          # (A, 1)
    p_base = scores["p_base"][keep].astype(np.float64)
    p_dec = scores["p_dec"][keep].astype(np.float64)
    probs_nll = -np.log((1 - a) * p_base + a * p_dec).mean(1)
    logits_nll = scores["logits_nll"][keep].mean(0)
    return {"logits": np.exp(logits_nll), "probs": np.exp(probs_nll)}


def blend_curves(model, decoder, ev: HeldOut, rows: np.ndarray, alphas,
                 chunk: int = 128, progress: bool = True) -> dict[str, np.ndarray]:
    """Held-out perplexity against α for both blends, on the ``rows`` asked for.

    ``score_rows`` then ``blend_perplexities``: one head pass over the rows for
    all α.  Notebook 04 calls ``score_rows`` itself, once for every held-out
    row, and reads the curves, the test figures and the gate's inputs from it.
    Returns ``{"logits": (A,), "probs": (A,)}`` perplexities.
    """
    scores = score_rows(model, decoder, ev.keys, ev.doc, ev.values, alphas, rows=rows,
                        chunk=chunk, progress=progress, desc=f"blends at {len(alphas)} α")
    return blend_perplexities(scores)
