"""Benchmark: the token-level Memory Decoder (issue 18) on a store's cached targets.

    PYTHONPATH=. python benchmarks/bench_token_decoder.py [--epochs 2] [--batch-size 1] [--heads 8]
    PYTHONPATH=. python benchmarks/bench_token_decoder.py --start base --layers 2 --lr 1e-3

Reads what a quick ``make tutorial`` left (``--size full``: a full one) (the datastore, its kNN
targets ``targets_k256_t300/``, the cached held-out pass, and the quick
hidden-state decoder if there is one); it computes none of them and writes
nothing into ``data/cache``.  It trains a token decoder for ``--epochs`` on
the store, then reports held-out perplexity of the base model alone and
blended with each memory (probability blend, α chosen on the validation
articles ``ev.valid``, reported on the test articles ``ev.test``), and the
per-token cost of a KV-cached generation step: base alone against base plus
the token decoder.  Writes ``data/artifacts/bench_token_decoder.json``;
``--save DIR`` keeps the trained decoder (notebook 06 trains and saves the one
``bench_sampling.py --quick`` times, in ``data/artifacts/quick/token_decoder/``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, corpus_fingerprint, default_store_path
from helpers.knn import best_alpha, perplexity
from helpers.model import (EMBEDDED_MODEL, cache_argument, load_base_model, returned_cache,
                           weights_fingerprint)
from helpers.paths import artifacts_dir, cache_dir, read_json, write_results
from helpers.sizes import SIZES
from helpers.token_decoder import TokenMemoryDecoder, save_token_decoder
from helpers.train_decoder import _open_targets
from helpers.train_token_decoder import token_target_probs, train_token_decoder

ALPHAS = np.round(np.linspace(0, 1, 21), 2)


def cached_targets(store, name: str = "targets_k256_t300"):
    """The store's cached kNN targets, read only (refused if they belong to another store)."""
    folder = store.path / name
    meta = read_json(folder / "targets.json", "run notebook 03 at this size first.")
    if meta.get("store_fingerprint") != store.fingerprint:
        raise SystemExit(f"{folder} was computed for another store; rerun notebook 03.")
    return _open_targets(folder, meta)


def cached_heldout(model, tok, texts):
    """``heldout_eval``'s result, but only from its cache (no base pass here)."""
    from helpers.evaluation import heldout_eval
    path = cache_dir("eval") / (f"{EMBEDDED_MODEL}-{corpus_fingerprint(texts)}-w256-o64"
                                f"-float32-{weights_fingerprint(model)}.npz")
    if not path.exists():
        raise SystemExit(f"no cached held-out pass at {path}; run notebook 02 at this size "
                         "first (make tutorial, or make tutorial FULL=1).")
    return heldout_eval(model, tok, texts, EMBEDDED_MODEL, progress=False)


def blend(p_base, p_mem, ev) -> tuple[float, float, float]:
    """(α, validation perplexity, test perplexity) of the probability blend."""
    return best_alpha(p_base, p_mem, ev.valid, ev.test, ALPHAS)


@torch.inference_mode()
def step_seconds(model, decoder, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """Median seconds of one KV-cached step: base model (with its head), token decoder."""
    name = cache_argument(model)  # "cache" since transformers 5, else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = returned_cache(out), prompt[:, -1:]
    base = []
    for _ in range(steps):
        tic = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{name: past})
        base.append(time.perf_counter() - tic)
        past = returned_cache(out)
    _, cache = decoder.step(prompt)
    dec = []
    for _ in range(steps):
        tic = time.perf_counter()
        _, cache = decoder.step(nxt, cache)
        dec.append(time.perf_counter() - tic)
    return float(np.median(base)), float(np.median(dec))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("quick", "full"), default="quick",
                    help="whose store, targets and held-out pass (notebooks 02-03 at that size)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1, help="chunks of --context tokens")
    ap.add_argument("--start", choices=("scratch", "base"), default="scratch",
                    help="'base': start from the base model's first --layers layers "
                    "(TokenMemoryDecoder.from_base_model); 'scratch': own blocks of --dim")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--cost-steps", type=int, default=32)
    ap.add_argument("--save", default="none", help="folder for the trained token decoder "
                    "('none', the default: not saved; notebook 06's checkpoint is its own)")
    ap.add_argument("--json", default=None, help="write the figures here instead of "
                    "data/artifacts/bench_token_decoder.json")
    args = ap.parse_args()

    size = SIZES[args.size]
    model, tok = load_base_model(EMBEDDED_MODEL, device="cpu")
    store = Datastore.open(default_store_path(EMBEDDED_MODEL, "eu-law", tag=size.tag))
    targets = cached_targets(store)
    split = split_by_document(load_corpus())
    ev = cached_heldout(model, tok, size.shorten(list(split["heldout"]["text"]), tok))
    print(f"{store}\nheld out: {len(ev.values):,} rows ({int(ev.valid.sum()):,} validation, "
          f"{int(ev.test.sum()):,} test)")

    torch.manual_seed(0)
    if args.start == "base":
        decoder = TokenMemoryDecoder.from_base_model(model, store, tok.bos_token_id,
                                                     n_layers=args.layers,
                                                     context=args.context, dropout=args.dropout)
    else:
        decoder = TokenMemoryDecoder.from_store(store, model.config.vocab_size,
                                                tok.bos_token_id, dim=args.dim,
                                                n_layers=args.layers, n_heads=args.heads,
                                                context=args.context, dropout=args.dropout)
    print(f"token decoder: {decoder.count_parameters() / 1e6:.2f}M parameters, "
          f"{len(decoder.config.vocab_ids):,} tokens in its vocabulary")
    tic = time.perf_counter()
    history = train_token_decoder(decoder, store, targets, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, beta=args.beta, progress=False)
    train_s = time.perf_counter() - tic
    losses = history["loss"]
    if args.save != "none":
        print(f"saved to {save_token_decoder(decoder, args.save)}")
    print(f"trained {args.epochs} epoch(s), {len(losses)} steps of {args.batch_size} chunks "
          f"in {train_s:.0f} s; loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")

    rows = {"base": (0.0, perplexity(ev.p_base[ev.valid]), perplexity(ev.p_base[ev.test]))}
    tic = time.perf_counter()
    rows["token decoder"] = blend(ev.p_base, token_target_probs(decoder, ev), ev)
    score_s = time.perf_counter() - tic
    hidden = artifacts_dir(size.tag) / "memory_decoder"
    if (hidden / "config.json").is_file():
        from helpers.decoder import load_decoder
        from helpers.train_decoder import decoder_target_probs
        dec = load_decoder(hidden, tokenizer=tok, store=store)
        rows[f"hidden-state decoder ({args.size} artifact)"] = blend(
            ev.p_base, decoder_target_probs(dec, ev.keys, ev.doc, ev.values), ev)
    print(f"\n{'':40} {'alpha':>5} {'valid ppl':>9} {'test ppl':>9}")
    for name, (a, v, t) in rows.items():
        print(f"{name:40} {a:5.2f} {v:9.3f} {t:9.3f}")

    prompt = torch.tensor([tok(split["heldout"]["text"][1])["input_ids"][:64]])
    base_s, dec_s = step_seconds(model, decoder, prompt, args.cost_steps)
    print(f"\nper generated token (median of {args.cost_steps} KV-cached steps, "
          f"{torch.get_num_threads()} threads): base {1e3 * base_s:.1f} ms, token decoder "
          f"{1e3 * dec_s:.2f} ms -> base + decoder = {(base_s + dec_s) / base_s:.3f} x base "
          f"(the blend itself not counted)")
    print(f"held-out scoring of the token decoder: {score_s:.1f} s for {len(ev.values):,} rows")
    results = {
        "args": vars(args), "train_seconds": train_s, "steps": len(losses),
        "loss_first5": float(np.mean(losses[:5])), "loss_last5": float(np.mean(losses[-5:])),
        "parameters": decoder.count_parameters(), "vocab": len(decoder.config.vocab_ids),
        "perplexity": {k: dict(zip(("alpha", "valid", "test"), v)) for k, v in rows.items()},
        "base_step_s": base_s, "decoder_step_s": dec_s,
        "cost_ratio": (base_s + dec_s) / base_s}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    else:
        write_results("bench_token_decoder", results)


if __name__ == "__main__":
    main()
