"""Honest comparisons: a perplexity ratio with a paired bootstrap interval.

Used in ``notebooks/03_train_memory_decoder.ipynb`` (MemoryDecoder vs kNN-LM,
``W = 4`` vs ``W = 1``) and ``notebooks/04_blended_sampling.ipynb`` (the α
gate vs the best fixed α).

Two systems scored on the **same** tokens give per-token losses ``nll_a`` and
``nll_b``; the ratio of their perplexities is ``exp(mean(nll_a) - mean(nll_b))``.
Tokens of one article are not independent (an article about data protection
is easy for a memory of data-protection law from its first line to its last),
so the interval resamples **articles**, not tokens: each bootstrap round draws
as many articles as there are, with replacement, keeps both systems' losses on
the drawn articles (the pairing), and recomputes the ratio.  The interval is
the middle ``level`` of those ratios (a percentile bootstrap; Efron and
Tibshirani 1993, ch. 13; Koehn 2004 for the paired form in NLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .knn import PROB_FLOOR
from .validate import check_float, check_int


@dataclass(frozen=True)
class Ratio:
    """``ratio`` = perplexity of A ÷ perplexity of B, with its bootstrap interval."""
    ratio: float    # on every token
    low: float      # lower end of the interval
    high: float     # upper end
    level: float    # e.g. 0.95
    groups: int     # articles (or documents) resampled
    tokens: int

    @property
    def excludes_one(self) -> bool:
        """True when the interval lies wholly above or wholly below 1."""
        return self.high < 1.0 or self.low > 1.0

    def __str__(self) -> str:
        return (f"{self.ratio:.3f} ({self.level:.0%} interval {self.low:.3f}–{self.high:.3f}, "
                f"{self.groups} articles)")


def token_nll(probs) -> np.ndarray:
    """``-log p`` per token, clipped at ``PROB_FLOOR`` as ``helpers.knn.perplexity`` does."""
    return -np.log(np.clip(np.asarray(probs, np.float64), PROB_FLOOR, 1.0))


def perplexity_ratio(nll_a, nll_b, groups, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> Ratio:
    """Perplexity of A ÷ perplexity of B on the same tokens, with a paired
    percentile bootstrap interval over ``groups`` (the article of each token).

    ``nll_a``, ``nll_b``, ``groups``: ``(N,)`` arrays, one entry per token
    (``token_nll`` turns probabilities of the true next tokens into losses).
    Below 1: A is better.  The same ``seed`` gives the same interval.
    """
    n_boot = check_int("n_boot", n_boot, 1, example=2000)
    level = check_float("level", level, example=0.95)
    seed = check_int("seed", seed, example=0)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1; got {level}. Pass e.g. level=0.95.")
    a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    g = np.asarray(groups)
    if a.ndim != 1 or a.shape != b.shape or g.shape != a.shape:
        raise ValueError("nll_a, nll_b and groups must be 1-D with one entry per token, the "
                         f"same tokens for both systems; got shapes {a.shape}, {b.shape}, "
                         f"{g.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the losses contain NaN/inf; pass -log p with p clipped away from 0 "
                         "(helpers.stats.token_nll does that).")
    names, which = np.unique(g, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"the interval resamples articles, and these tokens come from "
                         f"{len(names)}; score at least 2 (raise EVAL_DOCS).")
    diff = np.bincount(which, weights=a - b)                    # (G,) summed per article
    count = np.bincount(which).astype(np.float64)               # (G,) tokens per article
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=n_boot)
    ratios = np.exp((draws @ diff) / (draws @ count))           # (n_boot,)
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return Ratio(ratio=float(np.exp(diff.sum() / count.sum())), low=float(low),
                 high=float(high), level=level, groups=len(names), tokens=len(a))
