"""Does decoder training slow down after a key extraction in the same process?

Trains the ``W = 4`` decoder for a few steps in a fresh process, twice, then
extracts the keys of 12 training articles with the base model (which runs
inside ``helpers.fastpath.freed_memory_kept``) and trains again, with the model
alive and after deleting it.  If the extraction left glibc's malloc thresholds
pinned low, the later runs are slower (see *Key extraction* in benchmarks/RESULTS.md).

    python benchmarks/bench_after_extraction.py           # the quick store
    python benchmarks/bench_after_extraction.py --full    # the full store (notebook 02, FULL=True)

Needs that size's store (run notebook 02 first).  Prints samples/s per run;
machines are noisy, so compare runs of one invocation only.
"""
import argparse
import time

import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, default_store_path
from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.hidden import extract_keys
from helpers.index import load_or_build_index
from helpers.model import load_base_model
from helpers.train_decoder import precompute_knn_targets, train_decoder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full store instead of the quick one")
    ap.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    ap.add_argument("--window", type=int, default=4)
    args = ap.parse_args()
    store = Datastore.open(default_store_path("gemma-3-270m", "eu-law", -1, "float32",
                                              tag="" if args.full else "quick"))
    targets = precompute_knn_targets(store, load_or_build_index(store, "Flat"), k=256,
                                     temperature=300.0)  # notebook 03's cached targets

    def speed(label):
        torch.manual_seed(0)
        dec = MemoryDecoder(DecoderConfig.from_store(store, 262144, dim=256, window=args.window))
        tic = time.perf_counter()
        train_decoder(dec, store, targets, epochs=1, lr=3e-3, batch_size=256, beta=0.5, seed=0,
                      max_steps=args.steps, progress=False)
        print(f"{label:34} W={args.window}: {args.steps * 256 / (time.perf_counter() - tic):5.0f} "
              "samples/s", flush=True)

    speed("fresh process")
    speed("fresh process, again")
    model, tokenizer = load_base_model("gemma-3-270m")
    texts = list(split_by_document(load_corpus("eu-law"))["train"]["text"])[:12]
    tic = time.perf_counter()
    ex = extract_keys(model, tokenizer, texts, progress=False)
    print(f"extracted {len(ex.values):,} keys in {time.perf_counter() - tic:.0f} s", flush=True)
    speed("after the extraction")
    del model, ex
    speed("after it, model deleted")


if __name__ == "__main__":
    main()
