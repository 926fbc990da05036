"""Benchmark: the fine-tuning reference of notebook 03.

    python benchmarks/bench_finetune.py [--max-minutes 10] [--lr 5e-5]
    python benchmarks/bench_finetune.py --full --eval-every 44   # one whole epoch (263 batches)
    python benchmarks/bench_finetune.py --max-minutes 75 --eval-every 40

``--eval-every N`` scores the test articles every N batches (the time spent
scoring is not counted as training time) and rewrites the JSON after each, so
an interrupted run still leaves its curve.  The off-domain test documents of
notebook 04 (``helpers.offdomain``) are scored before and after: does
fine-tuning on EU law cost the model elsewhere?

Fine-tunes a fresh copy of the base model's body (embeddings frozen) on the
training split -- shuffled windows, as many as fit in the time budget, or the
whole epoch with ``--full`` (about an hour on two CPU cores) -- and
scores the test half of the held-out articles (odd ones), the same tokens
notebook 03 reports on.  Writes ``data/artifacts/bench_finetune.json``, which
notebook 03 shows when it does not fine-tune itself.
"""

from __future__ import annotations

import argparse

from helpers.corpus import load_corpus, split_by_document
from helpers.finetune import finetune_body
from helpers.knn import base_target_probs, perplexity
from helpers.model import load_base_model
from helpers.offdomain import load_offdomain, split_offdomain
from helpers.paths import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="one whole epoch, no time cap")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also score the test articles every this many batches")
    args = ap.parse_args()
    model, tok = load_base_model()
    split = split_by_document(load_corpus())
    train = list(split["train"]["text"])
    heldout = list(split["heldout"]["text"])
    test = [t for i, t in enumerate(heldout) if i % 2 == 1]  # HeldOut.test: odd articles
    offdomain = list(split_offdomain(load_offdomain())["test"]["text"])
    _, p0 = base_target_probs(model, tok, test)
    _, q0 = base_target_probs(model, tok, offdomain)
    total = sum(len(ids) - 1 for ids in tok(train)["input_ids"])
    budget = None if args.full else args.max_minutes * 60
    every = args.eval_every or None
    curve = []

    def evaluate(m):
        ppl = perplexity(base_target_probs(m, tok, test)[1])
        curve.append(ppl)
        write_results("bench_finetune", {"base_ppl": perplexity(p0), "partial": True,
                                         "curve_test_ppl": curve, "eval_every_batches": every,
                                         "batch_size": args.batch_size})
        return ppl

    stats = finetune_body(model, tok, train, epochs=1, lr=args.lr,
                          batch_size=args.batch_size, max_seconds=budget,
                          evaluate=evaluate, eval_every=every)
    _, p1 = base_target_probs(model, tok, test)
    _, q1 = base_target_probs(model, tok, offdomain)
    res = {"base_ppl": perplexity(p0), "finetune_ppl": perplexity(p1), "lr": args.lr,
           "offdomain_base_ppl": perplexity(q0), "offdomain_finetune_ppl": perplexity(q1),
           "offdomain_test_tokens": len(q1),
           "trained_tokens": stats["trained_tokens"], "epoch_fraction":
           stats["trained_tokens"] / total, "seconds": stats["seconds"],
           "tokens_per_second": stats["tokens_per_second"],
           "trainable_params": stats["trainable_params"], "test_tokens": len(p1),
           "first_loss": stats["losses"][0], "last_loss": stats["losses"][-1],
           "batch_size": args.batch_size,
           "curve": [{"trained_tokens": n, "seconds": s, "test_ppl": v}
                     for n, s, v in stats["curve"]]}
    write_results("bench_finetune", res)


if __name__ == "__main__":
    main()
