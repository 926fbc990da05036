"""Benchmark: per-token generation latency of each mode, in one run.

    python benchmarks/bench_sampling.py [--quick] [--context 200] [--tokens 24] [--repeats 3]

On the embedded model with the full datastore (notebook 02) and the trained
decoder (notebook 03; the gate of notebook 04 if it exists), or with the quick
size's (``--quick``: the notebooks' default, ``helpers/sizes.py``), after a
``--context``-token prompt taken from a training article:

* base:      ``generate(mode="base")``: one KV-cached forward per token;
* kNN-LM:    ``generate(mode="knn", k=32)``: the same plus a search of an
  ``IVF1024,Flat`` index visiting 32 of its 1,024 cells (``--index``,
  ``--nprobe``); the exact ``Flat`` search reads all 456 MiB of keys per
  token, and is timed too (``knn_flat``).  The held-out kNN-LM perplexity
  with each index is reported next to it, so speed and quality are seen
  together;
* memdec:    ``generate(mode="memdec")``: the same plus the decoder, no search;
* adaptive:  memdec with the α gate (skipped without a trained gate);
* memdec_token: memdec with the token-level decoder that notebook 06 saves
  next to the other decoder (skipped without one): it reads token ids with its
  own KV cache instead of hidden states;
* adaptive_token: memdec_token with the α gate notebook 06 trains for it
  (``token_alpha_gate``; skipped without one);
* original:  ``original_style_step``: the original tutorial's loop as written
  (manceps/MemoryDecoder ``app.py``): per token, no cache, a full forward
  over the whole prefix for the logits, a body-only forward for the query,
  one search of the exact (``Flat``) index for ``k`` neighbours, the decoder
  and the logit blend.  It costs seconds per token on a CPU, so only
  ``--original-tokens`` tokens are timed.

Per-token time is the wall time between two yielded tokens (the prompt's
forward, the first step, is excluded), the median over ``--repeats``
interleaved rounds whose order rotates, so every mode sees the same machine
load; the original-style loop runs after them.  Ratios are
against base in the same run.  Writes ``data/artifacts/bench_sampling.json``
(``bench_sampling_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, default_store_path
from helpers.decoder import load_decoder
from helpers.index import load_or_build_index
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.paths import artifacts_dir, write_results
from helpers.sampling import generate, ms_per_token, original_style_step
from helpers.sizes import pick_size


@torch.inference_mode()
def original_ms(model, ids, decoder, index, values, k: int, tokens: int) -> float:
    tic = time.perf_counter()
    for _ in range(tokens):
        nxt = original_style_step(model, ids, decoder, 0.5, index=index, values=values, k=k)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return (time.perf_counter() - tic) / tokens * 1e3


def heldout_knn_ppl(model, tok, store, indexes: dict, k: int, size, lam: float = 0.5,
                    temperature: float = 300.0) -> dict:
    """kNN-LM test perplexity (held-out EU law) with each index, same K, T and λ."""
    from helpers.evaluation import heldout_eval
    from helpers.knn import interpolate, knn_prob_of, lookup_values, perplexity, search

    held = size.shorten(split_by_document(load_corpus("eu-law"))["heldout"]["text"], tok)
    ev = heldout_eval(model, tok, held, EMBEDDED_MODEL)
    t = ev.test
    out = {}
    for name, index in indexes.items():
        dist, ids = search(index, ev.keys[t], k)
        p = knn_prob_of(ev.values[t], dist, lookup_values(store, ids), temperature)
        out[f"knn_{name}_test_ppl"] = perplexity(interpolate(ev.p_base[t], p, lam))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="the quick size's store, decoder and gate (the notebooks' default)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per measurement")
    ap.add_argument("--original-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--index", default="IVF1024,Flat", help="FAISS factory for kNN mode")
    ap.add_argument("--nprobe", type=int, default=32)
    args = ap.parse_args()
    size = pick_size(not args.quick)
    out = artifacts_dir(size.tag)

    model, tok = load_base_model(EMBEDDED_MODEL)
    texts = list(split_by_document(load_corpus("eu-law"))["train"]["text"])
    long = next(t for t in texts if len(tok(t)["input_ids"]) > args.context + 10)
    ids = tok(long)["input_ids"][:args.context]
    prompt = tok.decode(ids[1:])  # without BOS: generate adds it back
    path = default_store_path(EMBEDDED_MODEL, "eu-law", tag=size.tag)
    if not (path / "manifest.json").exists():
        raise SystemExit(f"No datastore at {path}: run notebooks/02_datastore_knn_lm.ipynb "
                         f"at the {size.name} size first.")
    store = Datastore.open(path)
    flat = load_or_build_index(store)
    index = load_or_build_index(store, args.index, nprobe=args.nprobe)
    decoder = load_decoder(out / "memory_decoder", base_model_name=EMBEDDED_MODEL,
                           tokenizer=tok, store=store)
    gate = None
    if (out / "alpha_gate" / "config.json").exists():
        from helpers.gate import load_gate
        gate = load_gate(out / "alpha_gate", decoder=decoder)

    token_decoder = None
    if (out / "token_decoder" / "config.json").exists():  # notebook 06 saves one
        from helpers.token_decoder import load_token_decoder
        token_decoder = load_token_decoder(out / "token_decoder", tokenizer=tok, store=store)
    token_gate = None
    if token_decoder is not None and (out / "token_alpha_gate" / "config.json").exists():
        from helpers.gate import load_gate
        token_gate = load_gate(out / "token_alpha_gate", decoder=token_decoder)

    common = dict(temperature=0, top_k=None, max_new_tokens=args.tokens + 1, seed=0)
    runs = {"base": dict(mode="base"),
            "knn": dict(mode="knn", store=store, index=index, k=args.k, alpha=0.5),
            "knn_flat": dict(mode="knn", store=store, index=flat, k=args.k, alpha=0.5),
            "memdec": dict(mode="memdec", decoder=decoder, alpha=0.5)}
    if token_decoder is not None:
        runs["memdec_token"] = dict(mode="memdec", decoder=token_decoder, alpha=0.5)
    if gate is not None:
        runs["adaptive"] = dict(mode="memdec", decoder=decoder, alpha=1.0, gate=gate,
                                adaptive=True)
    if token_gate is not None:
        runs["adaptive_token"] = dict(mode="memdec", decoder=token_decoder, alpha=1.0,
                                      gate=token_gate, adaptive=True)
    per_mode = {name: [] for name in [*runs, "original"]}
    original_ids = torch.tensor([tok(prompt)["input_ids"]])
    ms_per_token(generate(model, tok, prompt, **common, **runs["base"]))  # warm-up
    names = list(runs)
    for r in range(args.repeats):
        # rotate the order each round: no mode always runs first, or right after another
        for name in names[r % len(names):] + names[:r % len(names)]:
            stream = generate(model, tok, prompt, **common, **runs[name])
            per_mode[name].append(ms_per_token(stream))
    for _ in range(args.repeats):  # last: its big allocations must not disturb the rest
        per_mode["original"].append(original_ms(model, original_ids, decoder, flat,
                                                store.values, args.k, args.original_tokens))
    ms = {name: statistics.median(v) for name, v in per_mode.items()}
    results = {"size": size.name, "decoder_window": decoder.config.window,
               "context_tokens": len(original_ids[0]), "new_tokens": args.tokens,
               "original_tokens": args.original_tokens,
               "original_loop": "full forward + body-only forward + Flat search, no cache",
               "repeats": args.repeats, "threads": torch.get_num_threads(),
               "knn_index": f"{args.index}, nprobe {args.nprobe}", "k": args.k,
               **heldout_knn_ppl(model, tok, store, {"flat": flat, "ivf": index}, args.k, size),
               **{f"{name}_ms_per_token": round(v, 2) for name, v in ms.items()},
               "memdec_over_base": ms["memdec"] / ms["base"],
               "knn_over_base": ms["knn"] / ms["base"],
               "knn_flat_over_base": ms["knn_flat"] / ms["base"],
               "original_over_memdec": ms["original"] / ms["memdec"]}
    if "adaptive" in ms:
        results["adaptive_over_base"] = ms["adaptive"] / ms["base"]
    if "memdec_token" in ms:
        results["memdec_token_over_base"] = ms["memdec_token"] / ms["base"]
    if "adaptive_token" in ms:
        results["adaptive_token_over_base"] = ms["adaptive_token"] / ms["base"]
    write_results("bench_sampling" + ("_quick" if args.quick else ""), results)


if __name__ == "__main__":
    main()
