"""What the memory does to answers: greedy answers scored against the article.

Explained in ``notebooks/05_chat_panel.ipynb`` (section 5); the benchmark
``benchmarks/bench_answers.py`` runs the same code on more articles.

Perplexity says how well a model *predicts* the law; this module asks what it
*writes*.  For an article of the corpus the question is the record's own
(``Title: ...\\nQuestion: ...\\nAnswer:``, exactly what the memory stored),
each mode writes a greedy answer of at most ``max_new_tokens`` tokens, and the
answer is scored against the start of the article's text:

* **ROUGE-L F1** (Lin 2004): the longest common subsequence of words, as a
  share of the answer (precision) and of the reference (recall);
* **token F1** (SQuAD): the same with word counts, order ignored.

Both are computed here in a few lines of Python (no extra dependency).  The
reference is the article's first ``ref_words`` words: a fixed-length answer
can at best recite that much.  ``paired_bootstrap`` resamples *articles*, so
both modes of a ratio are always scored on the same articles.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .corpus import format_record
from .validate import check_int

STOP_AT = ("\nQuestion:", "\nTitle:", "\nAnswer:")  # the model starts a new record
REF_WORDS = 64  # reference: the article's first 64 words


def words(text: str) -> list[str]:
    """Lower-cased words and numbers: what both scores compare."""
    return re.findall(r"\w+", str(text).lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programme)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def _f1(overlap: float, n_answer: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_answer, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of ``answer`` against ``reference``, on words (0 = nothing shared)."""
    a, r = words(answer), words(reference)
    return _f1(lcs_length(a, r), len(a), len(r))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token F1: shared words, counted with multiplicity, order ignored."""
    a, r = Counter(words(answer)), Counter(words(reference))
    return _f1(sum((a & r).values()), sum(a.values()), sum(r.values()))


def reference_text(answer: str, ref_words: int = REF_WORDS) -> str:
    """The first ``ref_words`` words of an article's text: what an answer is scored on."""
    return " ".join(str(answer).split()[:ref_words])


def question_prompt(record: dict) -> str:
    """The record's own title and question, the answer left open for the model."""
    return format_record(record["title"], record["question"], "").rstrip()


def prompt_is_stored(store, tokenizer, doc: int, record: dict) -> bool:
    """Whether store document ``doc`` holds ``record``'s tokens, and the question prompt
    is their start: the memory was built from exactly the text the prompt begins."""
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    rows = np.flatnonzero(np.asarray(store.doc) == doc)
    values = np.asarray(store.values)[rows[np.argsort(np.asarray(store.pos)[rows])]]
    prompt = tokenizer(question_prompt(record), add_special_tokens=True)["input_ids"]
    return (len(values) > 0 and values.tolist() == ids[1:len(values) + 1]
            and ids[:len(prompt)] == prompt)


def cut_at_record(text: str) -> str:
    """``text`` up to the first sign of a new record (``\\nQuestion:`` ...)."""
    hits = [text.find(m) for m in STOP_AT if m in text]
    return text[:min(hits)] if hits else text


def pick_evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (first and last included): a fixed
    rule, so nobody chooses the articles that make a mode look good."""
    n = check_int("n", n, 1, example=4)
    if n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def answer_articles(store, tokenizer, split: dict, n: int) -> tuple[list, list, int]:
    """``(stored, heldout, checked)``: ``n`` records of the store's articles and ``n``
    of the odd (test) held-out ones, both spread evenly (``pick_evenly``), and how
    many stored ones pass ``prompt_is_stored``.  ``split``: ``split_by_document``'s."""
    from .articles import stored_indices
    train, held = split["train"], split["heldout"]
    rows = stored_indices(store, list(train["text"]))
    if rows is None:
        raise ValueError("the datastore was not built from this corpus's training split; "
                         "build it with notebook 02 (or scripts/build_datastore.py).")
    docs = pick_evenly(list(range(len(rows))), n)  # store document numbers
    stored = [train[rows[d]] for d in docs]
    checked = sum(prompt_is_stored(store, tokenizer, d, r) for d, r in zip(docs, stored))
    heldout = pick_evenly([held[i] for i in range(1, len(held), 2)], n)
    return stored, heldout, checked


def answer(model, tokenizer, prompt: str, max_new_tokens: int, no_repeat_ngram: int = 0,
           **mode_kw) -> str:
    """A greedy answer (``temperature=0``) of at most ``max_new_tokens`` tokens,
    cut where the model starts a new record.  ``mode_kw`` go to ``generate``;
    ``no_repeat_ngram`` (0 = off) is the same for every mode."""
    from .sampling import generate_text
    text, _ = generate_text(model, tokenizer, prompt, temperature=0, top_k=None,
                            max_new_tokens=max_new_tokens, seed=0,
                            no_repeat_ngram=no_repeat_ngram, **mode_kw)
    return cut_at_record(text).strip()


def score_answers(model, tokenizer, records: list[dict], modes: dict, *,
                  max_new_tokens: int = 32, ref_words: int = REF_WORDS,
                  no_repeat_ngram: int = 0, progress=None) -> dict:
    """Greedy answers of every mode to every record, with their scores.

    ``modes`` maps a name to ``generate`` keyword arguments (``{"base":
    dict(mode="base"), "memdec": dict(mode="memdec", decoder=..., alpha=0.6)}``).
    ``no_repeat_ngram`` applies to every mode alike (``generate``).
    Returns ``{name: {"answers": [...], "rouge_l": (n,), "token_f1": (n,)}}``;
    ``progress(done, total)`` is called after each answer.
    """
    out, total, done = {}, len(records) * len(modes), 0
    for name, kw in modes.items():
        answers, rl, tf = [], [], []
        for record in records:
            text = answer(model, tokenizer, question_prompt(record), max_new_tokens,
                          no_repeat_ngram, **kw)
            ref = reference_text(record["answer"], ref_words)
            answers.append(text)
            rl.append(rouge_l(text, ref))
            tf.append(token_f1(text, ref))
            done += 1
            if progress:
                progress(done, total)
        out[name] = dict(answers=answers, rouge_l=np.array(rl), token_f1=np.array(tf))
    return out


def paired_bootstrap(ours, base, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``(ratio, low, high)``: mean(ours) / mean(base) and its bootstrap interval.

    Articles are resampled with replacement, the same articles for both, so
    the interval reflects which articles were asked, not the pairing.  A
    resample whose base mean is 0 gives an infinite ratio (the interval says so).
    """
    ours, base = np.asarray(ours, float), np.asarray(base, float)
    if ours.shape != base.shape or ours.ndim != 1 or len(ours) == 0:
        raise ValueError(f"need two equally long 1-d score arrays (one score per article, "
                         f"same articles); got shapes {ours.shape} and {base.shape}.")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(ours), size=(n_resamples, len(ours)))  # (R, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ours[rows].mean(1) / base[rows].mean(1)              # (R,)
        ratio = ours.mean() / base.mean()
    ratios = np.where(np.isnan(ratios), np.inf, ratios)  # 0 / 0: no evidence either way
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(ratio), float(low), float(high)


def quality_table(scores_by_set: dict, base: str = "base") -> list[dict]:
    """One row per (set, mode): mean ROUGE-L and token F1, ratio to ``base`` with its
    95 % paired-bootstrap interval.  ``scores_by_set``: ``{set: score_answers(...)}``."""
    rows = []
    for set_name, scores in scores_by_set.items():
        for mode, s in scores.items():
            row = dict(set=set_name, mode=mode, n=len(s["rouge_l"]),
                       rouge_l=float(s["rouge_l"].mean()),
                       token_f1=float(s["token_f1"].mean()))
            for metric in ("rouge_l", "token_f1"):
                ratio, low, high = paired_bootstrap(s[metric], scores[base][metric])
                row[f"{metric}_ratio"], row[f"{metric}_ci"] = ratio, (low, high)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """``quality_table`` as a Markdown table (what the README and notebook print)."""
    lines = ["| articles | mode | n | ROUGE-L F1 | ÷ base (95 % CI) "
             "| token F1 | ÷ base (95 % CI) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["set"], r["mode"], str(r["n"])]
        for m in ("rouge_l", "token_f1"):
            low, high = r[f"{m}_ci"]
            cells += [f"{r[m]:.3f}", f"{r[f'{m}_ratio']:.2f}× ({low:.2f}–{high:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
