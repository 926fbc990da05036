"""Benchmark: key extraction throughput against this machine's matmul roofline.

    python benchmarks/bench_extraction.py [--docs 48] [--quick]

Reports, in one run (so ratios are comparable on a noisy machine):
  * measured matmul FLOP/s (fp32 and bf16) at the model's own shapes,
  * tokens/s of body-only extraction for a plain HF loop and for
    ``helpers.hidden.extract_keys`` (length-sorted), fp32 and bf16, and for
    ``extract_keys(..., fast=False)`` (the model's own forward pass, no
    ``helpers.fastpath``), with how far its keys are from the fast path's,
  * roofline fraction = tokens/s x FLOPs/token / matmul FLOP/s,
  * bf16 keys' cosine similarity to fp32 keys, for a model loaded in bf16 and
    for ``extract_keys(..., autocast=torch.bfloat16)`` (float32 residual stream),
  * cold (GGUF -> cache) vs warm (cached safetensors) model load.
Writes ``data/artifacts/bench_extraction.json``.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import torch

from helpers.corpus import load_corpus
from helpers.hidden import body, extract_keys
from helpers.model import embedded_model_dir, load_base_model
from helpers.paths import write_results


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of ``F.linear`` on (m,k) x (n,k)^T -- the call nn.Linear makes."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        tic = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = max(best, 2 * m * k * n / (time.perf_counter() - tic))
    return best


def flops_per_token(cfg, avg_context: float) -> float:
    """Matmul FLOPs per token of the body: projections + MLP + attention."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    proj = d * q + 2 * d * kv + q * d + 3 * d * f  # q,k,v,o + gate/up/down
    attn = 2 * q * avg_context  # QK^T and AV
    return L * 2 * (proj + attn)


@torch.inference_mode()
def plain_hf(model, tok, texts, batch: int, length: int) -> float:
    """The probe's baseline: fixed 8x256 batches, body only, no sorting."""
    enc = [tok(t, truncation=True, max_length=length)["input_ids"] for t in texts]
    n, tic = 0, time.perf_counter()
    for i in range(0, len(enc), batch):
        chunk = tok.pad({"input_ids": enc[i:i + batch]}, return_tensors="pt")
        body(model)(**chunk, use_cache=False)
        n += int(chunk["attention_mask"].sum())
    return n / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--bf16-docs", type=int, default=12,
                    help="documents for the bf16 run (slow where bf16 is emulated)")
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    res: dict = {"threads": torch.get_num_threads()}

    if not args.skip_cold:
        shutil.rmtree(embedded_model_dir(convert=False), ignore_errors=True)
        tic = time.perf_counter(); load_base_model()
        res["load_cold_s"] = time.perf_counter() - tic
    tic = time.perf_counter(); model, tok = load_base_model()
    res["load_warm_s"] = time.perf_counter() - tic

    cfg = model.config
    texts = load_corpus()["text"][: args.docs]
    fpt = flops_per_token(cfg, avg_context=128)
    rows = 8 * 256
    res["matmul_fp32_flops"] = matmul_flops(rows, cfg.hidden_size, cfg.intermediate_size, torch.float32)
    res["matmul_bf16_flops"] = matmul_flops(rows, cfg.hidden_size, cfg.intermediate_size, torch.bfloat16)
    res["flops_per_token"] = fpt

    # These two run first: extract_keys' fast path changes glibc's malloc
    # settings for the rest of the process (helpers.fastpath.keep_freed_memory).
    res["plain_hf_tok_s"] = plain_hf(model, tok, texts, 8, 256)
    slow = extract_keys(model, tok, texts, window=256, overlap=64, batch_size=8, fast=False)
    res["extract_fp32_no_fastpath_tok_s"] = slow.tokens_per_second
    ex32 = extract_keys(model, tok, texts, window=256, overlap=64, batch_size=8)
    res["extract_fp32_tok_s"] = ex32.tokens_per_second
    cos = (slow.keys * ex32.keys).sum(1) / (np.linalg.norm(slow.keys, axis=1)
                                            * np.linalg.norm(ex32.keys, axis=1))
    res["fastpath_cosine_min"] = float(cos.min())
    res["fastpath_max_rel_diff"] = float(np.abs(slow.keys - ex32.keys).max()
                                         / np.abs(slow.keys).max())
    res["extract_fp32_unsorted_tok_s"] = extract_keys(
        model, tok, texts, window=256, overlap=64, batch_size=8,
        sort_by_length=False).tokens_per_second
    model_bf16, _ = load_base_model(dtype=torch.bfloat16)
    sub = texts[: args.bf16_docs]
    ex16 = extract_keys(model_bf16, tok, sub, window=256, overlap=64, batch_size=8)
    res["extract_bf16_tok_s"] = ex16.tokens_per_second
    del model_bf16
    # mixed precision: float32 weights and residual stream, bf16 matmuls
    amp = extract_keys(model, tok, sub, window=256, overlap=64, batch_size=8,
                       autocast=torch.bfloat16)
    res["extract_amp_bf16_tok_s"] = amp.tokens_per_second
    ref = extract_keys(model, tok, sub, window=256, overlap=64, batch_size=8).keys
    for name, keys in [("bf16", ex16.keys), ("amp_bf16", amp.keys)]:
        cos = (ref * keys).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(keys, axis=1))
        res[f"{name}_cosine_min"] = float(cos.min())
        res[f"{name}_cosine_p001"] = float(np.quantile(cos, 0.001))
        res[f"{name}_cosine_mean"] = float(cos.mean())
    res["bf16_keys_compared"] = len(ref)
    res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()

    for name, flops in [("plain_hf", res["matmul_fp32_flops"]),
                        ("extract_fp32_no_fastpath", res["matmul_fp32_flops"]),
                        ("extract_fp32", res["matmul_fp32_flops"]),
                        ("extract_fp32_unsorted", res["matmul_fp32_flops"]),
                        ("extract_bf16", res["matmul_bf16_flops"]),
                        ("extract_amp_bf16", res["matmul_bf16_flops"])]:
        res[f"{name}_roofline"] = res[f"{name}_tok_s"] * fpt / flops
    write_results("bench_extraction", res)


if __name__ == "__main__":
    main()
