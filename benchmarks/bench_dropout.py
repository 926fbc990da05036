"""What do the decoder's dropout masks cost per training step?

Trains the ``W = 4`` decoder (notebook 03's full size) for a few steps with
dropout 0.1 and with none, alternating, in one process, and prints samples/s
of each run.  The full size trains without dropout (``helpers/sizes.py``):
over 4 epochs of 186,788 rows the decoder does not overfit, and drawing the
random masks was about a sixth of the step in a profile.

    python benchmarks/bench_dropout.py           # the quick store
    python benchmarks/bench_dropout.py --full    # the full store (notebook 02, FULL=True)

Needs that size's store and notebook 03's cached kNN targets.  Machines are
noisy: compare the runs of one invocation only.
"""
import argparse
import time

import torch

from helpers.datastore import Datastore, default_store_path
from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.index import load_or_build_index
from helpers.train_decoder import precompute_knn_targets, train_decoder


K, TEMPERATURE = 256, 300.0  # notebook 03's neighbours and kNN temperature


def store_and_targets(full: bool):
    """The quick (or full) store and notebook 03's cached kNN targets for it."""
    store = Datastore.open(default_store_path("gemma-3-270m", "eu-law", -1, "float32",
                                              tag="" if full else "quick"))
    targets = precompute_knn_targets(store, load_or_build_index(store, "Flat"), k=K,
                                     temperature=TEMPERATURE)  # notebook 03's cached targets
    return store, targets


def training_speed(store, targets, window: int, steps: int, dropout: float = 0.0,
                   autocast=None) -> tuple[float, dict]:
    """Samples/s of ``steps`` training steps of a fresh decoder (seed 0, batch 256), and
    the training history."""
    torch.manual_seed(0)
    dec = MemoryDecoder(DecoderConfig.from_store(store, 262144, dim=256, window=window,
                                                 dropout=dropout))
    tic = time.perf_counter()
    history = train_decoder(dec, store, targets, epochs=1, lr=3e-3, batch_size=256, beta=0.5,
                            seed=0, max_steps=steps, progress=False, autocast=autocast)
    return steps * 256 / (time.perf_counter() - tic), history


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full store instead of the quick one")
    ap.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    args = ap.parse_args()
    store, targets = store_and_targets(args.full)
    speeds = {0.1: [], 0.0: []}
    for _ in range(args.rounds):
        for p in speeds:
            speeds[p].append(training_speed(store, targets, args.window, args.steps, p)[0])
            print(f"dropout {p:.1f}, W={args.window}: {speeds[p][-1]:5.0f} samples/s", flush=True)
    best = {p: max(v) for p, v in speeds.items()}
    print(f"best of {args.rounds}: no dropout {best[0.0]:.0f}, dropout 0.1 {best[0.1]:.0f} "
          f"samples/s ({best[0.0] / best[0.1]:.2f}x)")


if __name__ == "__main__":
    main()
