"""Benchmark: what each part of ``helpers.fastpath`` saves, in one run.

    python benchmarks/bench_fastpath.py [--repeats 7]

At the shapes of one extraction batch of Gemma 3 270M (8 windows of 256
tokens), each timing the median of ``--repeats`` calls (the first two with
``keep_freed_memory`` on, as ``extract_keys`` runs them):

* GELU: ``F.gelu(x, approximate="tanh")`` against ``SigmoidGELU`` on the MLP
  activation (8 x 256 x 2048), and their largest difference;
* attention: ``F.scaled_dot_product_attention(..., is_causal=True)`` (what
  transformers runs) against ``causal_block_attention`` on 4 query heads and
  1 key/value head of 256 dimensions, and their largest difference;
* memory: one forward pass of the real model's body over 8 x 256 tokens (with
  the two parts above on), in two fresh processes -- glibc's default malloc
  settings, then ``keep_freed_memory`` -- with its page faults.  The two
  processes run one after the other, ``--rounds`` times, alternating.

Writes ``data/artifacts/bench_fastpath.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from helpers.fastpath import SigmoidGELU, causal_block_attention, keep_freed_memory


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 4


def forward_in_this_process(keep: bool, repeats: int) -> dict:
    """Time the real body's forward pass over 8 x 256 tokens (child process)."""
    from helpers.fastpath import causal_blocks, sigmoid_gelu
    from helpers.hidden import body
    from helpers.model import load_base_model

    if keep:
        keep_freed_memory()
    model, _ = load_base_model()
    ids = torch.randint(10, 100_000, (8, 256), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.inference_mode(), sigmoid_gelu(model), causal_blocks(model):
            body(model)(input_ids=ids, use_cache=False)

    forward()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = median_ms(forward, repeats)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (repeats + 1)
    return {"forward_ms": ms, "page_faults_per_forward": faults}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(forward_in_this_process(args.child == "keep", args.repeats)))
        return

    # as in extract_keys; otherwise every 16 MB result is a fresh mmap whose
    # 4,096 page faults cost more than the GELU itself
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    res: dict = {"threads": torch.get_num_threads()}
    with torch.inference_mode():
        x = torch.randn(8, 256, 2048, generator=g)
        res["gelu_tanh_ms"] = median_ms(lambda: F.gelu(x, approximate="tanh"), args.repeats)
        res["sigmoid_gelu_ms"] = median_ms(lambda: SigmoidGELU()(x), args.repeats)
        res["gelu_max_abs_diff"] = float((SigmoidGELU()(x) - F.gelu(x, approximate="tanh"))
                                         .abs().max())

        q = torch.randn(8, 256, 4, 256, generator=g).transpose(1, 2)  # as transformers lays it out
        k, v = (torch.randn(8, 256, 1, 256, generator=g).transpose(1, 2) for _ in range(2))
        scale = 256 ** -0.5

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)

        def blocks():
            return causal_block_attention(_Attention(), q, k, v, None, scaling=scale)[0]

        res["sdpa_causal_ms"] = median_ms(sdpa, args.repeats)
        res["block_attention_ms"] = median_ms(blocks, args.repeats)
        res["attention_max_abs_diff"] = float((blocks() - sdpa().transpose(1, 2)).abs().max())

    runs = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for child in runs:
            out = subprocess.run([sys.executable, __file__, "--child", child,
                                  "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            runs[child].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for child, name in [("default", "default_malloc"), ("keep", "keep_freed_memory")]:
        res[f"forward_{name}_ms"] = [r["forward_ms"] for r in runs[child]]
        res[f"page_faults_{name}"] = [r["page_faults_per_forward"] for r in runs[child]]
    res["gelu_speedup"] = res["gelu_tanh_ms"] / res["sigmoid_gelu_ms"]
    res["attention_speedup"] = res["sdpa_causal_ms"] / res["block_attention_ms"]
    res["forward_speedup_keep_freed_memory"] = (
        statistics.median(res["forward_default_malloc_ms"])
        / statistics.median(res["forward_keep_freed_memory_ms"]))
    from helpers.paths import write_results
    write_results("bench_fastpath", res)


if __name__ == "__main__":
    main()
