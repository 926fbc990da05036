"""Two sizes, one code path: the quick default, ``FULL = True``, and the tests' smoke size.

Every notebook's ``parameters`` cell has ``FULL = False``.  Knobs that depend on
the size are ``None`` there ("by size") and are filled in from one
:class:`Size` right after the cell, so notebooks 02-05 always agree on the
datastore, and an override such as ``--param NUM_EPOCHS=3`` still wins.

* **quick** (default): one training article in five (73 of 364), the first 192
  tokens of each of the 40 held-out articles (and of 10 off-domain documents
  per source), 3 epochs of the original's ``W = 1`` decoder at lr 3e-3, and 2 of notebook
  06's token decoder (lr 5e-4 from the base model's first layers, 1e-3 from scratch).  Each
  notebook runs in a few minutes on 2 CPU cores and still shows its lesson in its own numbers.
* **full** (``FULL = True``): the whole training split, whole held-out
  articles, 4 epochs of the ``W = 4`` decoder at lr 3e-3 without dropout (in
  notebook 03 on 2 cores: 10 minutes on an AMX Xeon in bf16, 25 on an AMD EPYC in
  float32, before training ran the math attention kernel; 6 in ``bench_batch.py`` on
  the Xeon since; it was 12 epochs at lr 1e-3 with dropout 0.1, 55 minutes), and
  ``W = 1`` trained the same way for notebook 03's comparison: the README's full
  table.  Notebook 06's token decoder: 4 epochs (from the first 2 layers: 24
  minutes of training on the AMD EPYC, test 5.73 blended, in
  ``bench_token_decoder.py --size full``; the notebook itself, once, on an AMX
  Xeon: 630 s of training, test 5.71).
* **smoke** (``MEMDEC_SMOKE=1``, the tests): a dozen articles, seconds.

The README's "Two sizes" table gives the times and perplexities of each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Size:
    """The knobs that change with the size of a run (``None`` = all)."""
    name: str                      # "smoke", "quick" or "full": also the cache/artifact tag
    train_every: int               # store every n-th training article (1 = all)
    train_docs: int | None         # then keep at most this many (None = all)
    eval_docs: int | None          # held-out articles scored (None = all 40)
    eval_tokens: int | None        # first tokens of each scored text (None = whole text)
    offdomain_docs: int | None     # off-domain documents per source, notebook 04
    blend_points: int              # α values on notebook 04's blend curves
    epochs: int                    # MemoryDecoder training epochs, notebook 03
    window: int                    # W: base states the decoder reads (1 = the original's)
    lr: float                      # DECODER_LR: peak learning rate of the decoder
    dropout: float                 # DROPOUT inside the decoder's layers while training
    max_steps: int | None          # hard cap on training steps (smoke only)
    ablation_epochs: int           # budget of each W=1 / W=4 ablation run (0 = skip)
    layer_train_docs: int          # notebook 01's layer study: stored articles
    layer_query_docs: int          # ... held-out articles used as queries
    layer_max_tokens: int          # ... tokens per article
    throughput_docs: int           # notebook 01's extraction-throughput run
    max_new_tokens: int            # generated tokens in notebooks 04 and 05
    cost_rounds: int               # timing rounds of the per-token cost, notebook 03
    token_epochs: int              # epochs of notebook 06's token-level decoder
    token_lr: float                # its peak learning rate, started from scratch
    token_base_lr: float           # ... started from the base model's first layers

    @property
    def tag(self) -> str:
        """Folder tag of this size's store and artifacts ("" for full)."""
        return "" if self.name == "full" else self.name

    def train_texts(self, texts: list, limit: int | None = None) -> list:
        """The training articles this size stores: every ``train_every``-th, then at most
        ``limit`` of them (``None``: this size's ``train_docs``)."""
        return list(texts)[::self.train_every][:self.train_docs if limit is None else limit]

    def shorten(self, texts: list, tokenizer) -> list[str]:
        """Held-out or off-domain texts cut to their first ``eval_tokens`` tokens.

        Scoring a token needs the base model's 262,144-wide head, so the quick
        size scores the start of every held-out article rather than fewer
        articles: the same 20 + 20 articles, about a third of the tokens.
        """
        texts = [str(t) for t in texts]
        if self.eval_tokens is None:
            return texts
        out = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(text if len(ids) <= self.eval_tokens
                       else tokenizer.decode(ids[:self.eval_tokens]))
        return out

    def describe(self) -> str:
        every = ("all training articles" if self.train_every == 1 else
                 f"1 in {self.train_every} training articles")
        return (f"{self.name} size: {every}"
                f"{'' if self.train_docs is None else f' (at most {self.train_docs})'}, "
                f"{'all' if self.eval_docs is None else self.eval_docs} held-out articles"
                f"{'' if self.eval_tokens is None else f' (first {self.eval_tokens} tokens each)'}, "
                f"{self.epochs} training epoch{'s' * (self.epochs != 1)}")


SIZES = {
    "smoke": Size("smoke", train_every=1, train_docs=12, eval_docs=4, eval_tokens=None,
                  offdomain_docs=3, blend_points=6, epochs=1, window=4, lr=1e-3,
                  dropout=0.1, max_steps=40, ablation_epochs=1, layer_train_docs=8, layer_query_docs=4,
                  layer_max_tokens=64, throughput_docs=6, max_new_tokens=8, cost_rounds=1,
                  token_epochs=1, token_lr=2e-3, token_base_lr=2e-3),
    "quick": Size("quick", train_every=5, train_docs=None, eval_docs=None, eval_tokens=192,
                  offdomain_docs=10, blend_points=6, epochs=3, window=1, lr=3e-3,
                  dropout=0.1, max_steps=None, ablation_epochs=0, layer_train_docs=30, layer_query_docs=10,
                  layer_max_tokens=128, throughput_docs=16, max_new_tokens=24, cost_rounds=1,
                  token_epochs=2, token_lr=1e-3, token_base_lr=5e-4),
    "full": Size("full", train_every=1, train_docs=None, eval_docs=None, eval_tokens=None,
                 offdomain_docs=None, blend_points=11, epochs=4, window=4, lr=3e-3,
                 dropout=0.0, max_steps=None, ablation_epochs=4, layer_train_docs=60, layer_query_docs=20,
                 layer_max_tokens=192, throughput_docs=32, max_new_tokens=40, cost_rounds=3,
                 token_epochs=4, token_lr=1e-3, token_base_lr=5e-4),
}


def pick_size(full, smoke: bool = False) -> Size:
    """The :class:`Size` for ``FULL`` (a bool) and the tests' ``MEMDEC_SMOKE``.

    Smoke wins: the tests run every notebook small whatever ``FULL`` says.
    """
    if not isinstance(full, bool):
        raise TypeError(f"FULL must be True or False, got {full!r} ({type(full).__name__}). "
                        "Set FULL = True in the parameters cell for the full run, or pass "
                        "--param FULL=True to scripts/run_tutorial.py (make tutorial FULL=1).")
    return SIZES["smoke" if smoke else "full" if full else "quick"]


def by_size(value, size: Size, field: str):
    """``value`` if the notebook set it, else this size's ``field``."""
    if field not in {f.name for f in fields(Size)}:
        raise KeyError(f"no size knob {field!r}; known: {[f.name for f in fields(Size)]}")
    return getattr(size, field) if value is None else value
