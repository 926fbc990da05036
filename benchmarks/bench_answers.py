"""Benchmark: what the memory does to answers, scored against the article's text.

    python benchmarks/bench_answers.py [--quick] [--articles 12] [--tokens 32]
                                       [--no-repeat-ngram 0] [--modes base,knn,memdec,adaptive]

For ``--articles`` stored articles (spread evenly over the datastore's) and as
many held-out ones (spread evenly over the odd held-out articles, the test half
notebooks 02-04 never tune on), each mode writes a greedy answer of at most
``--tokens`` tokens to the record's own ``Title / Question / Answer:`` prompt:

* base:     the base model alone;
* knn:      kNN-LM with the index, K, λ and T notebook 02 chose (exact "Flat"
            search, K = 256 at the quick size: the stored text's own neighbours);
* memdec:   the Memory Decoder at the α notebook 04 chose (``blend_settings``);
* adaptive: the α gate of notebook 04 (α scale 1), if one is trained.

The settings come from ``metrics.json`` (tuned on held-out *perplexity*, even
articles), never from these answers.  Scores: ROUGE-L F1 and token F1 against
the article's first 64 words (``helpers/quality.py``), mean per mode and ratio to
base with a 95 % paired bootstrap interval over articles.  ``--no-repeat-ngram n``
bans a repeated n-gram in every mode alike (0 = off, the default).  Writes
``data/artifacts/bench_answers.json`` (``bench_answers_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, default_store_path
from helpers.decoder import load_decoder
from helpers.index import load_or_build_index
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.paths import artifacts_dir, write_results
from helpers.quality import answer_articles, format_table, quality_table, score_answers
from helpers.sizes import pick_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="the quick size's store, decoder and gate (the notebooks' default)")
    ap.add_argument("--articles", type=int, default=12, help="per set (stored, held out)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per answer")
    ap.add_argument("--no-repeat-ngram", type=int, default=0,
                    help="never the same n tokens twice in an answer, every mode (0 = off)")
    ap.add_argument("--modes", default="base,knn,memdec,adaptive")
    args = ap.parse_args()
    size = pick_size(not args.quick)
    out = artifacts_dir(size.tag)
    metrics = json.loads((out / "metrics.json").read_text())

    model, tok = load_base_model(EMBEDDED_MODEL)
    store = Datastore.open(default_store_path(EMBEDDED_MODEL, "eu-law", tag=size.tag))
    stored, heldout, same = answer_articles(store, tok, split_by_document(load_corpus("eu-law")),
                                            args.articles)
    print(f"{same} of {len(stored)} stored articles: the store holds the record's tokens and "
          "the prompt is their start", file=sys.stderr)
    decoder = load_decoder(out / "memory_decoder", base_model_name=EMBEDDED_MODEL,
                           tokenizer=tok, store=store)
    knn_s, blend_s = metrics["knn_settings"], metrics["blend_settings"]
    modes = {"base": dict(mode="base"),
             "knn": dict(mode="knn", store=store, index=load_or_build_index(
                 store, knn_s.get("index", "Flat"), nprobe=32), k=knn_s["k"],
                 alpha=knn_s["lambda"], knn_temperature=knn_s["temperature"]),
             "memdec": dict(mode="memdec", decoder=decoder, alpha=blend_s["alpha_probs"])}
    if (out / "alpha_gate" / "config.json").exists():
        from helpers.gate import load_gate
        modes["adaptive"] = dict(mode="memdec", decoder=decoder, alpha=1.0, adaptive=True,
                                 gate=load_gate(out / "alpha_gate", decoder=decoder))
    modes = {m: modes[m] for m in args.modes.split(",") if m in modes}
    tic = time.perf_counter()
    report = lambda d, n: print(f"\r{d}/{n} answers, {time.perf_counter() - tic:.0f} s",
                                end="", file=sys.stderr)
    gen_kw = dict(max_new_tokens=args.tokens, no_repeat_ngram=args.no_repeat_ngram,
                  progress=report)
    scores = {"stored": score_answers(model, tok, stored, modes, **gen_kw),
              "held-out": score_answers(model, tok, heldout, modes, **gen_kw)}
    table = quality_table(scores)
    print("\n" + format_table(table))
    settings = {m: {k: v for k, v in kw.items() if isinstance(v, (int, float, str))}
                for m, kw in modes.items()}
    results = {"size": size.name, "articles_per_set": len(stored), "max_new_tokens": args.tokens,
               "prompt_is_stored": f"{same} of {len(stored)}",
               "no_repeat_ngram": args.no_repeat_ngram,
               "command": "python " + " ".join(sys.argv),
               "threads": torch.get_num_threads(), "seconds": time.perf_counter() - tic,
               "settings": settings, "table": table,
               "examples": {s: {"titles": [r["title"] for r in recs],
                                **{m: v["answers"] for m, v in scores[s].items()}}
                            for s, recs in (("stored", stored), ("held-out", heldout))}}
    suffix = "" if args.no_repeat_ngram == 0 else f"_norepeat{args.no_repeat_ngram}"
    write_results("bench_answers" + ("_quick" if args.quick else "") + suffix, results)


if __name__ == "__main__":
    main()
