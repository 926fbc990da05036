"""Which attention kernel should the decoder train with on a CPU?

Times training steps of notebook 03's full-size decoder (``W = 4``, width 256,
32 heads of 8, a head over 4,625 tokens, batch 256) with PyTorch's default CPU
kernel for ``scaled_dot_product_attention`` (a flash kernel) and with the plain
math kernel that ``helpers.decoder`` now picks for training on a CPU, alternating
in one process; float32 and, where the CPU has native bf16, bf16 autocast as the
notebook trains.  Random keys and targets of the real shapes, so it needs no
artifacts and runs on any machine:

    python benchmarks/bench_attention.py                 # 5 rounds of 20 steps per kernel
    python benchmarks/bench_attention.py --rounds 3 --steps 10

Also checks that one step's gradients agree between the kernels.  Machines are
noisy: compare the kernels of one invocation only.
"""
import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

import helpers.decoder as decoder_module
from helpers.cpu import autocast_dtype, describe
from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.paths import write_results
from helpers.train_decoder import memdec_loss, optimizer_and_schedule, optimizer_step

B, W, KEY_DIM, VOCAB, K = 256, 4, 640, 4625, 256  # the full store's shapes


@contextmanager
def kernel(name: str):
    """Inside: the decoder's choice of kernel ("math": what helpers.decoder does) or
    the library's default ("default")."""
    saved = decoder_module._attention_kernel
    if name == "default":
        decoder_module._attention_kernel = lambda device: nullcontext()
    try:
        yield
    finally:
        decoder_module._attention_kernel = saved


def decoder() -> MemoryDecoder:
    """A fresh full-size decoder (seed 0) in training mode, without dropout."""
    torch.manual_seed(0)
    return MemoryDecoder(DecoderConfig(key_dim=KEY_DIM, base_vocab_size=262144,
                                       vocab_ids=list(range(VOCAB)), window=W, dim=256,
                                       head="store", dropout=0.0)).train()


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(B, W, KEY_DIM, generator=g)
        pad = torch.zeros(B, W, dtype=torch.bool)
        pad[: B // 8, : W - 1] = True                    # some windows start a document
        ids = torch.randint(0, VOCAB, (B, K), generator=g).numpy()
        probs = torch.rand(B, K, generator=g)
        probs = (probs / probs.sum(1, keepdim=True)).numpy().astype(np.float32)
        yield x, pad, ids, probs, ids[:, 0].copy()


def step_times(name: str, steps: int, autocast) -> list[float]:
    """Seconds per step of ``steps`` training steps (after 3 warm-up steps)."""
    dec = decoder()
    params = [p for p in dec.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, 3e-3, 0.01, 0.05, steps + 3)
    history, times = {"loss": [], "kl": [], "ce": []}, []
    with kernel(name):
        for i, (x, pad, ids, probs, nxt) in enumerate(batches(steps + 3)):
            tic = time.perf_counter()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                enabled=autocast is not None):
                logits = dec(x, pad)
            loss, kl, ce = memdec_loss(logits, ids, probs, nxt, dec, 0.5)
            optimizer_step(loss, kl, ce, params, optimizer, scheduler, history)  # train_decoder's
            if i >= 3:
                times.append(time.perf_counter() - tic)
    return times


def gradient_difference() -> float:
    """Largest |difference| of one float32 step's gradients between the kernels,
    relative to the largest gradient."""
    grads = {}
    for name in ("default", "math"):
        dec = decoder()
        with kernel(name):
            x, pad, ids, probs, nxt = next(batches(1))
            memdec_loss(dec(x, pad), ids, probs, nxt, dec, 0.5)[0].backward()
        grads[name] = torch.cat([p.grad.flatten() for p in dec.parameters()])
    return float((grads["math"] - grads["default"]).abs().max() / grads["default"].abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two kernels")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    args = ap.parse_args()
    dtypes = [None] + ([torch.bfloat16] if autocast_dtype(torch.device("cpu")) else [])
    print(f"{describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds of {args.steps} steps per kernel, alternating", flush=True)
    diff = gradient_difference()
    print(f"one float32 step: gradients differ by at most {diff:.1e} of the largest", flush=True)
    results = {"batch": B, "window": W, "head_tokens": VOCAB, "rounds": args.rounds,
               "steps": args.steps, "grad_max_rel_difference": diff, "cpu": describe(),
               "threads": torch.get_num_threads(), "runs": {}}
    for autocast in dtypes:
        label = "bf16 autocast" if autocast else "float32"
        ms = {"default": [], "math": []}
        for _ in range(args.rounds):
            for name in ms:
                ms[name].append(1000 * statistics.median(step_times(name, args.steps, autocast)))
        med = {name: statistics.median(v) for name, v in ms.items()}
        ratio = [d / m for d, m in zip(ms["default"], ms["math"])]
        print(f"{label}: default kernel {med['default']:.1f} ms/step, math kernel "
              f"{med['math']:.1f} ms/step; default ÷ math per round {min(ratio):.2f}–"
              f"{max(ratio):.2f} (median {statistics.median(ratio):.2f})", flush=True)
        results["runs"][label] = {"default_ms": [round(v, 2) for v in ms["default"]],
                                  "math_ms": [round(v, 2) for v in ms["math"]],
                                  "median_ratio": round(statistics.median(ratio), 3)}
    write_results("bench_attention", results)


if __name__ == "__main__":
    main()
