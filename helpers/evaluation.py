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
def blend_curves(model, decoder, ev: HeldOut, rows: np.ndarray, alphas,
                 chunk: int = 256, progress: bool = True) -> dict[str, np.ndarray]:
    """Held-out perplexity against α for both blends (notebook 04).

    ``"probs"``: ``(1-α)·p_base(y) + α·p_dec(y)`` needs only the two
    probabilities of each true next token ``y``.  ``"logits"``:
    ``log_softmax((1-α)·z + α·log p_dec)[y]`` (the original tutorial's formula,
    ``log p_dec`` clipped at ``LOG_FLOOR`` as in ``blend_logits``) needs the
    normaliser over the whole vocabulary, so the base model's head runs on
    ``chunk`` keys at a time and each α costs one ``logsumexp``.  Only the
    rows asked for are scored: pass several α at once rather than calling
    twice on the same rows.
    Returns ``{"logits": (A,), "probs": (A,)}`` perplexities.
    """
    from .sampling import LOG_FLOOR
    from .train_decoder import decoder_target_probs, window_batch

    alphas = np.array([float(a) for a in alphas])                 # (A,)
    idx = np.flatnonzero(rows)
    p_dec = decoder_target_probs(decoder, ev.keys, ev.doc, ev.values,
                                 rows=idx).astype(np.float64)
    p_base = ev.p_base[idx].astype(np.float64)
    probs_nll = -np.log((1 - alphas[:, None]) * p_base + alphas[:, None] * p_dec).sum(1)
    logits_nll = np.zeros(len(alphas))
    starts = range(0, len(idx), chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"blends at {len(alphas)} α", unit="chunk")
    for i in starts:
        r = idx[i:i + chunk]
        z = head_logits(model, ev.keys[r])                                       # (C, V)
        x, pad = window_batch(ev.keys, ev.doc, r, decoder.config.window)
        mem = decoder.log_probs_full(x, pad).clamp(min=LOG_FLOOR).to(z.device)   # (C, V)
        y = torch.as_tensor(ev.values[r], device=z.device)[:, None]
        z_y, mem_y = z.gather(1, y)[:, 0], mem.gather(1, y)[:, 0]                # (C,)
        for j, a in enumerate(alphas):
            mixed = torch.lerp(z, mem, float(a)) if 0 < a < 1 else (mem if a == 1 else z)
            logits_nll[j] -= ((1 - a) * z_y + a * mem_y - torch.logsumexp(mixed, -1)).sum().item()
    return {"logits": np.exp(logits_nll / len(idx)), "probs": np.exp(probs_nll / len(idx))}
