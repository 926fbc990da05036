"""Which article a question is about, and which articles a datastore holds.

Explained in ``notebooks/05_chat_panel.ipynb``: the chat panel heads its
prompt with the article's title (``Title: ...``), the format every stored
record has, so the memory sees what it was trained on.  ``TitleIndex`` finds
that title from a free question; ``stored_indices`` says which training
articles notebook 02 put into the store.
"""

from __future__ import annotations

import re

import numpy as np


def stored_indices(store, texts, max_every: int = 16):
    """Which of ``texts`` the store holds, in store order, or ``None`` if unknown.

    Notebook 02 stores every ``n``-th training text, then at most ``num_docs``
    of them (``Size.train_texts``); the stride is found by comparing the
    manifest's corpus fingerprint with each candidate selection.
    """
    from .datastore import corpus_fingerprint
    n, want = int(store.manifest.get("num_docs", 0)), store.manifest.get("corpus_fingerprint")
    for every in range(1, max_every + 1):
        rows = list(range(0, len(texts), every))[:n]
        if len(rows) == n and corpus_fingerprint([texts[i] for i in rows]) == want:
            return rows
    return None


class TitleIndex:
    """Find the article a question is about: TF-IDF cosine over the titles' words.

    ``match(question)`` returns ``(title, score)`` for the best title, or
    ``None`` when no title shares an informative word with the question
    (score below ``min_score``).  Pure numpy: 404 titles take a millisecond.
    """
    STOP = frozenset("a an and are as at be by do does for from how in is it of on or say "
                     "says shall that the this to what when where which who why with "
                     "article regulation directive about".split())

    def __init__(self, titles, min_score: float = 0.2):
        self.titles, self.min_score = list(titles), min_score
        docs = [self._words(t) for t in self.titles]
        self.vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
        df = np.zeros(len(self.vocab))
        for d in docs:
            df[[self.vocab[w] for w in set(d)]] += 1
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1                  # (V,)
        self.matrix = np.stack([self._vector(d) for d in docs]) if docs else None  # (N, V)

    def _words(self, text: str) -> list[str]:
        return [w for w in re.findall(r"\w+", str(text).lower()) if w not in self.STOP]

    def _vector(self, words) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for w in words:
            if w in self.vocab:
                v[self.vocab[w]] += 1
        v *= self.idf
        return v / (np.linalg.norm(v) or 1.0)

    def match(self, question: str):
        """``(title, score)`` of the closest title, or ``None`` if none is close."""
        if self.matrix is None:
            return None
        scores = self.matrix @ self._vector(self._words(question))         # (N,)
        best = int(scores.argmax())
        return (self.titles[best], float(scores[best])) if scores[best] >= self.min_score \
            else None
