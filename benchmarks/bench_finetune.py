"""Benchmark: the fine-tuning reference of notebook 03.

    python benchmarks/bench_finetune.py [--max-minutes 10] [--lr 5e-5]
    python benchmarks/bench_finetune.py --full --evals 4   # one whole epoch

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
from helpers.finetune import finetune_body, training_windows
from helpers.knn import base_target_probs, perplexity
from helpers.model import load_base_model
from helpers.paths import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="one whole epoch, no time cap")
    ap.add_argument("--evals", type=int, default=0,
                    help="also score the test articles this many times during the epoch")
    args = ap.parse_args()
    model, tok = load_base_model()
    split = split_by_document(load_corpus())
    train = list(split["train"]["text"])
    heldout = list(split["heldout"]["text"])
    test = [t for i, t in enumerate(heldout) if i % 2 == 1]  # HeldOut.test: odd articles
    _, p0 = base_target_probs(model, tok, test)
    n_batches = -(-len(training_windows(tok, train)) // args.batch_size)
    every = n_batches // args.evals if args.evals else None
    stats = finetune_body(model, tok, train, epochs=1, lr=args.lr,
                          batch_size=args.batch_size,
                          max_seconds=None if args.full else args.max_minutes * 60,
                          evaluate=lambda m: perplexity(base_target_probs(m, tok, test)[1]),
                          eval_every=every)
    _, p1 = base_target_probs(model, tok, test)
    total = sum(len(ids) - 1 for ids in tok(train)["input_ids"])
    res = {"base_ppl": perplexity(p0), "finetune_ppl": perplexity(p1), "lr": args.lr,
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
