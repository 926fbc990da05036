"""Benchmark: the fine-tuning reference, its learning rate and length chosen on validation.

    python benchmarks/bench_finetune_sweep.py                       # quick size, lr 3e-5 and 1e-4
    python benchmarks/bench_finetune_sweep.py --lrs 1e-5,3e-5,1e-4 --epochs 2 --evals-per-epoch 4

``bench_finetune.py`` fine-tunes once, at a learning rate nobody chose.  This
gives the reference the same chance as the MemoryDecoder, whose settings are
chosen on the validation articles: for each learning rate it fine-tunes a
fresh copy of the base model's body (embeddings frozen, ``helpers.finetune``)
on the quick size's training articles (the ones the quick datastore holds)
for up to ``--epochs`` epochs, scores the *validation* articles (the even
held-out articles, cut like notebook 03's quick run) ``--evals-per-epoch``
times an epoch, and stops a run once validation has not improved for
``--patience`` evaluations.  The best (learning rate, point) by validation is
kept and only it is scored on the *test* articles (the odd ones) and on the
off-domain test documents.

``--save DIR`` (default ``data/artifacts/quick/finetuned``) keeps that model
(``save_pretrained``: safetensors + config + tokenizer), which
``load_base_model(DIR)`` loads: a second model with the same tokenizer, for
the plug-and-play test of the token-level memory (notebook 06).  Writes
``data/artifacts/bench_finetune_sweep.json``.  About 16 minutes an epoch and
learning rate on two CPU cores at the quick size (the defaults: about 40 minutes).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

from helpers.corpus import load_corpus, split_by_document
from helpers.finetune import finetune_body, training_windows
from helpers.knn import base_target_probs, perplexity
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.offdomain import load_offdomain, split_offdomain
from helpers.paths import artifacts_dir, atomic_dir, refuse_foreign, write_results
from helpers.sizes import SIZES


# What save_pretrained writes for a model and its tokenizer: the only names --save replaces.
SAVED = ("config.json", "generation_config.json", "model*.safetensors*", "tokenizer*",
         "special_tokens_map.json", "chat_template*")


class Stop(Exception):
    """Raised inside the evaluate hook: validation stopped improving."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="quick", choices=["quick", "full"])
    ap.add_argument("--lrs", default="3e-5,1e-4")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--save", default=None, help="folder for the chosen model "
                    "(default data/artifacts/<size>/finetuned; 'none' to skip)")
    args = ap.parse_args()
    size = SIZES[args.size]
    lrs = [float(x) for x in args.lrs.split(",")]
    save = (artifacts_dir(size.tag) / "finetuned" if args.save is None else args.save)
    if str(save) != "none":  # refused now, not after the training: a folder of other files
        refuse_foreign(Path(save), SAVED, "a fine-tuned model's")

    model, tok = load_base_model(EMBEDDED_MODEL, device="cpu")
    split = split_by_document(load_corpus())
    train = size.train_texts(split["train"]["text"])
    heldout = size.shorten(list(split["heldout"]["text"])[:size.eval_docs], tok)
    valid = [t for i, t in enumerate(heldout) if i % 2 == 0]   # HeldOut.valid: even articles
    test = [t for i, t in enumerate(heldout) if i % 2 == 1]    # HeldOut.test: odd articles
    offdomain = size.shorten(list(split_offdomain(load_offdomain())["test"]["text"]), tok)
    ppl = lambda m, texts: perplexity(base_target_probs(m, tok, texts)[1])  # noqa: E731
    base = {"valid": ppl(model, valid), "test": ppl(model, test),
            "offdomain": ppl(model, offdomain)}
    del model
    batches = math.ceil(len(training_windows(tok, train)) / args.batch_size)
    every = max(1, batches // args.evals_per_epoch)
    print(f"{len(train)} training articles, {batches} batches of {args.batch_size} an epoch; "
          f"validation every {every} batches; base valid {base['valid']:.3f}", flush=True)

    runs, best = [], {"valid": base["valid"], "lr": None, "batches": 0}
    # the best model so far, in a folder of our own; swapped into --save at the end
    tmp = None if str(save) == "none" else Path(tempfile.mkdtemp(prefix=".finetuned-",
                                                                 dir=artifacts_dir(size.tag)))
    for lr in lrs:
        model, _ = load_base_model(EMBEDDED_MODEL, device="cpu")
        curve, state = [], {"best": math.inf, "since": 0}

        def evaluate(m, lr=lr, curve=curve, state=state):
            v = ppl(m, valid)
            curve.append(v)
            print(f"  lr {lr:g}: after {len(curve) * every} batches, valid {v:.3f}", flush=True)
            if v < best["valid"]:
                best.update(valid=v, lr=lr, batches=len(curve) * every)
                if tmp:
                    m.save_pretrained(tmp)  # overwrites the previous best's files
                    tok.save_pretrained(tmp)
            state["since"] = 0 if v < state["best"] else state["since"] + 1
            state["best"] = min(state["best"], v)
            if state["since"] >= args.patience:
                raise Stop
            return v

        tic = time.perf_counter()
        try:
            stats = finetune_body(model, tok, train, epochs=args.epochs, lr=lr,
                                  batch_size=args.batch_size, progress=False,
                                  evaluate=evaluate, eval_every=every)
            seconds, tps = stats["seconds"], stats["tokens_per_second"]
        except Stop:
            seconds, tps = time.perf_counter() - tic, None
        runs.append({"lr": lr, "valid_curve": curve, "stopped_early": tps is None,
                     "seconds_incl_validation": time.perf_counter() - tic,
                     "training_seconds": seconds, "tokens_per_second": tps})
        del model

    result = {"size": size.name, "train_articles": len(train), "batches_per_epoch": batches,
              "eval_every_batches": every, "batch_size": args.batch_size, "epochs": args.epochs,
              "patience": args.patience, "base": base, "runs": runs,
              "chosen": {"lr": best["lr"], "batches": best["batches"],
                         "epochs": best["batches"] / batches, "valid": best["valid"]},
              "command": "python benchmarks/bench_finetune_sweep.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                  if v is not None)}
    if best["lr"] is not None and tmp:
        with atomic_dir(Path(save), SAVED, "a fine-tuned model's") as out:
            for f in tmp.iterdir():
                shutil.move(str(f), out / f.name)
        tuned, _ = load_base_model(str(save), device="cpu")
        result["chosen"].update(test=ppl(tuned, test), offdomain=ppl(tuned, offdomain),
                                saved=str(save))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results("bench_finetune_sweep", result)


if __name__ == "__main__":
    main()
