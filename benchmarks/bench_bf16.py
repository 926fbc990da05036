"""What does bf16 autocast buy the decoder's training step on this CPU?

Trains notebook 03's decoder (no dropout, batch 256, lr 3e-3, seed 0) for a few
steps in float32 and under ``torch.autocast(dtype=torch.bfloat16)``, alternating,
in one process, for ``W = 1`` (the quick size) and ``W = 4`` (the full size),
and prints samples/s of each and the mean loss of the last steps of each.
Notebook 03 trains under bf16 autocast only where ``helpers.cpu.autocast_dtype``
finds native bf16 (AVX-512-bf16 or AMX); elsewhere PyTorch emulates bf16 and
the autocast rows here are expected to be slower.

    python benchmarks/bench_bf16.py           # the quick store
    python benchmarks/bench_bf16.py --full    # the full store (notebook 02, FULL=True)

Needs that size's store and notebook 03's cached kNN targets.  Machines are
noisy: compare the runs of one invocation only.  Writes
``data/artifacts/bench_bf16[_quick].json``.
"""
import argparse

import numpy as np
import torch

from bench_dropout import store_and_targets, training_speed  # this folder: the same steps
from helpers.cpu import describe, fast_bf16
from helpers.paths import write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full store instead of the quick one")
    ap.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    ap.add_argument("--windows", default="1,4")
    args = ap.parse_args()
    print(describe(), flush=True)
    store, targets = store_and_targets(args.full)
    results = {"size": "full" if args.full else "quick", "fast_bf16": fast_bf16(),
               "steps": args.steps, "threads": torch.get_num_threads()}
    for w in map(int, args.windows.split(",")):
        speeds, losses = {"float32": [], "bf16": []}, {"float32": [], "bf16": []}
        for _ in range(args.rounds):
            for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
                speed, hist = training_speed(store, targets, w, args.steps, autocast=dtype)
                speeds[name].append(speed)
                losses[name].append(float(np.mean(hist["loss"][-10:])))
                print(f"W={w} {name:8s} {speeds[name][-1]:6.0f} samples/s, "
                      f"loss over the last 10 steps {losses[name][-1]:.4f}", flush=True)
        best = {k: max(v) for k, v in speeds.items()}
        results[f"W{w}_float32_samples_s"] = best["float32"]
        results[f"W{w}_bf16_samples_s"] = best["bf16"]
        results[f"W{w}_bf16_speedup"] = best["bf16"] / best["float32"]
        results[f"W{w}_loss_float32"] = losses["float32"][0]
        results[f"W{w}_loss_bf16"] = losses["bf16"][0]
    write_results("bench_bf16" + ("" if args.full else "_quick"), results)


if __name__ == "__main__":
    main()
