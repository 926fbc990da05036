"""Benchmark: does the Memory Decoder recite the articles it stores?  Two kinds of target.

    python benchmarks/bench_recite.py [--quick] [--epochs 12] [--lr 3e-3] [--dropout 0]
                                      [--articles 6] [--tokens 32] [--targets paper,keep_self]

Trains notebook 03's decoder (the size's window ``W``, the store's head) twice on
the same store, the same epochs and seed, each on other kNN targets
(``precompute_knn_targets``):

* ``paper``: each row's own key dropped from its neighbours (the default, as
  LUMIA-Group/MemoryDecoder's ``--ignore_first True``): the target is what
  *similar* contexts continue with;
* ``keep_self``: its own key kept.  At distance 0 it outweighs the rest, so the
  target is nearly the stored next token: the decoder is taught the text itself.

For each it reports held-out perplexity (probability blend with the base model,
α chosen on the even held-out articles, reported on the odd ones, and the ratio
of the two decoders with a paired bootstrap over articles), then greedy answers
to stored and held-out records scored against the article (``bench_answers.py``'s
measure: ROUGE-L F1 and token F1, ratio to base with a 95 % interval).  The last
epoch's weights are kept (no early stopping: recitation is what is measured).
Both decoders are saved to ``data/artifacts/<size>/recite/{paper,keep_self}/``.
``--targets keep_self`` trains one of them only.  Writes
``data/artifacts/bench_recite[_quick][_<targets>][_e<epochs>][_lr<lr>][_batch<n>][_seed<n>]
[_dropout<p>][_t<tokens>].json`` (each part only when it differs from the defaults: both targets,
12 epochs, lr 3e-3, batch 256, seed 0, dropout 0, 32 tokens), so runs with other training or answer
settings do not overwrite the default run that notebook 05 shows.  The number of articles is
recorded in the file, not in its name: the shipped run used ``--articles 12``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, default_store_path
from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.evaluation import heldout_eval
from helpers.index import load_or_build_index
from helpers.knn import best_alpha
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.paths import artifacts_dir, write_results
from helpers.quality import (answer_articles, format_table, paired_bootstrap, quality_table,
                             score_answers)
from helpers.reuse import finish_run
from helpers.sizes import pick_size
from helpers.stats import perplexity_ratio, token_nll
from helpers.train_decoder import decoder_target_probs, precompute_knn_targets, train_decoder

K, TEMPERATURE = 256, 300.0  # notebooks 02 and 03
ALPHAS = np.round(np.linspace(0, 1, 21), 2)


def results_name(quick: bool, variants: list[str], epochs: int, lr: float, batch: int,
                 seed: int, dropout: float = 0.0, tokens: int = 32) -> str:
    """The results file's name: ``bench_recite[_quick]``, then each training or answer
    setting that differs from the default run's (both targets, 12 epochs, lr 3e-3,
    batch 256, seed 0, dropout 0, 32 tokens).  ``--articles`` is recorded in the file,
    not in its name."""
    return ("bench_recite" + ("_quick" if quick else "")
            + ("" if len(variants) == 2 else "_" + variants[0])
            + ("" if epochs == 12 else f"_e{epochs}")
            + ("" if lr == 3e-3 else f"_lr{lr:g}")
            + ("" if batch == 256 else f"_batch{batch}")
            + ("" if seed == 0 else f"_seed{seed}")
            + ("" if dropout == 0 else f"_dropout{dropout:g}")
            + ("" if tokens == 32 else f"_t{tokens}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick size's store (default full)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=256, help="rows per step (notebook 03: 256)")
    ap.add_argument("--articles", type=int, default=6, help="per set (stored, held out)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="paper,keep_self",
                    help="which decoders to train: paper, keep_self or both")
    args = ap.parse_args()
    size = pick_size(not args.quick)
    model, tok = load_base_model(EMBEDDED_MODEL)
    split = split_by_document(load_corpus("eu-law"))
    store = Datastore.open(default_store_path(EMBEDDED_MODEL, "eu-law", tag=size.tag))
    index = load_or_build_index(store, "Flat")
    heldout_texts = size.shorten(list(split["heldout"]["text"])[:size.eval_docs], tok)
    ev = heldout_eval(model, tok, heldout_texts, EMBEDDED_MODEL)
    vocab = model.config.get_text_config().vocab_size
    out = artifacts_dir(size.tag) / "recite"

    decoders, rows, p_dec = {}, {}, {}
    variants = [v for v in ("paper", "keep_self") if v in args.targets.split(",")]
    if not variants:
        raise SystemExit(f"--targets must name paper and/or keep_self; got {args.targets!r}.")
    for name in variants:
        keep_self = name == "keep_self"
        targets = precompute_knn_targets(store, index, k=K, temperature=TEMPERATURE,
                                         keep_self=keep_self, progress=True)
        p_true = float(targets.p_stored(store).mean())
        torch.manual_seed(args.seed)
        decoder = MemoryDecoder(DecoderConfig.from_store(
            store, vocab, dim=256, window=size.window, head="store", dropout=args.dropout))
        tic = time.perf_counter()
        history = train_decoder(decoder, store, targets, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch, beta=0.5, seed=args.seed, progress=True)
        seconds = time.perf_counter() - tic
        settings = {"targets": name, "keep_self": keep_self, "k": K, "temperature": TEMPERATURE,
                    "W": size.window, "epochs": args.epochs, "lr": args.lr,
                    "batch_size": args.batch, "dropout": args.dropout, "seed": args.seed,
                    "store": store.fingerprint}
        finish_run(decoder, out / name, settings, history=history, train_seconds=seconds)
        p_dec[name] = decoder_target_probs(decoder, ev.keys, ev.doc, ev.values)
        alpha, valid, test = best_alpha(ev.p_base, p_dec[name], ev.valid, ev.test, ALPHAS)
        decoders[name] = (decoder, alpha)
        rows[name] = {"keep_self": keep_self, "p_kNN_of_stored_token": round(p_true, 4),
                      "train_seconds": round(seconds, 1), "steps": len(history["loss"]),
                      "batch_size": args.batch, "last_loss": history["loss"][-1],
                      "alpha": alpha, "valid_ppl": round(valid, 3), "test_ppl": round(test, 3)}
        print(f"{name}: p_kNN(stored next token) {p_true:.3f}; trained {seconds:.0f} s; "
              f"α {alpha} (validation {valid:.2f}); test perplexity {test:.2f}", file=sys.stderr)

    def blend(name):
        return (1 - decoders[name][1]) * ev.p_base + decoders[name][1] * p_dec[name]
    ratio = None
    if len(decoders) == 2:
        ratio = perplexity_ratio(token_nll(blend("keep_self")[ev.test]),
                                 token_nll(blend("paper")[ev.test]), ev.doc[ev.test],
                                 seed=args.seed)
        print(f"test perplexity keep_self ÷ paper: {ratio}", file=sys.stderr)

    stored, heldout, checked = answer_articles(store, tok, split, args.articles)
    modes = {"base": dict(mode="base")}
    for name, (decoder, alpha) in decoders.items():
        modes[f"Memory Decoder, {name} targets, α = {alpha:g}"] = dict(
            mode="memdec", decoder=decoder, alpha=alpha)
    tic = time.perf_counter()
    report = lambda d, n: print(f"\r{d}/{n} answers, {time.perf_counter() - tic:.0f} s",
                                end="", file=sys.stderr)
    kw = dict(max_new_tokens=args.tokens, progress=report)
    scores = {"stored": score_answers(model, tok, stored, modes, **kw),
              "held-out": score_answers(model, tok, heldout, modes, **kw)}
    table = quality_table(scores)
    print("\n" + format_table(table))
    head_to_head = {}
    if len(decoders) == 2:  # the two decoders' answers, paired over the same articles
        names = [m for m in modes if m != "base"]
        for set_name, s in scores.items():
            r, low, high = paired_bootstrap(s[names[1]]["rouge_l"], s[names[0]]["rouge_l"])
            head_to_head[set_name] = {"rouge_l_ratio": r, "low": low, "high": high}
            print(f"{set_name}: ROUGE-L keep_self ÷ paper {r:.2f}× (95 % interval "
                  f"{low:.2f}–{high:.2f})")
    name = results_name(args.quick, variants, args.epochs, args.lr, args.batch, args.seed,
                        args.dropout, args.tokens)
    write_results(name, {
        "size": size.name, "command": "python " + " ".join(sys.argv),
        "threads": torch.get_num_threads(), "decoders": rows,
        "test_ratio_keep_self_to_paper": ratio and {"ratio": ratio.ratio, "low": ratio.low,
                                                    "high": ratio.high, "articles": ratio.groups},
        "articles_per_set": len(stored), "prompt_is_stored": f"{checked} of {len(stored)}",
        "max_new_tokens": args.tokens, "answer_seconds": time.perf_counter() - tic,
        "table": table, "rouge_l_keep_self_to_paper": head_to_head,
        "examples": {s: {"titles": [r["title"] for r in recs],
                         **{m: v["answers"] for m, v in scores[s].items()}}
                     for s, recs in (("stored", stored), ("held-out", heldout))}})


if __name__ == "__main__":
    main()
