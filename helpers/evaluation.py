"""Held-out evaluation shared by notebooks 02-04: one base pass, cached.

Explained in ``notebooks/02_datastore_knn_lm.ipynb``.  Scoring the held-out
articles needs the base model's probability of every true next token, which
means the 262,144-wide head on ~24k positions: minutes on a CPU.  The result
is cached in ``data/cache/eval/`` (an ``.npz`` of plain arrays, no pickle),
keyed by model, corpus fingerprint and window settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datastore import corpus_fingerprint
from .knn import base_target_probs, head_logits
from .paths import atomic_file, cache_dir


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
                 window: int = 256, overlap: int = 64) -> HeldOut:
    """Keys and ``p_base`` for every held-out target token (cached on disk)."""
    texts = list(texts)
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in model_name)
    path = cache_dir("eval") / (f"{slug}-{corpus_fingerprint(texts)}-w{window}-o{overlap}"
                                ".npz")
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return HeldOut(**{k: z[k] for k in z.files})
    ex, p_base = base_target_probs(model, tokenizer, texts, window=window, overlap=overlap)
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
                 chunk: int = 256) -> dict[str, np.ndarray]:
    """Held-out perplexity against α for both blends (notebook 04).

    ``"logits"``: ``log_softmax((1-α)·base_logits + α·log p_dec)`` (the
    original tutorial's formula); ``"probs"``: ``(1-α)·p_base + α·p_dec``.
    Both need the full base distribution, so the head runs on ``chunk`` keys
    at a time.  Returns ``{"logits": (A,), "probs": (A,)}`` perplexities.
    """
    from .sampling import blend_logits
    from .train_decoder import window_batch

    alphas = [float(a) for a in alphas]
    idx = np.flatnonzero(rows)
    nll = {m: np.zeros(len(alphas)) for m in ("logits", "probs")}
    for i in range(0, len(idx), chunk):
        r = idx[i:i + chunk]
        base = head_logits(model, ev.keys[r])                                    # (C, V)
        x, pad = window_batch(ev.keys, ev.doc, r, decoder.config.window)
        mem = decoder.log_probs_full(x, pad)                                       # (C, V)
        target = torch.as_tensor(ev.values[r])[:, None]
        for j, a in enumerate(alphas):
            for mode in nll:
                logp = blend_logits(base, mem, a, mode=mode)
                nll[mode][j] -= logp.gather(1, target).sum().item()
    return {m: np.exp(v / len(idx)) for m, v in nll.items()}
