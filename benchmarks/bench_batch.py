"""Does a smaller batch train the decoder to a lower perplexity in the same time?

Trains notebook 03's decoder once per run (a batch size and a number of epochs): that size's
window, learning rate and dropout (``helpers/sizes.py``), the paper's targets that notebook 03
cached, the same seed, bf16 autocast where the CPU runs it natively (as the notebook). Each epoch is validated as in
the notebook (best α on the even held-out articles). Then the test articles are scored at
the α chosen on validation, and each run is compared with the first: the ratio of test
perplexities with a 95 % paired bootstrap interval over the test articles.

    python benchmarks/bench_batch.py --quick --runs 256x3,128x3,64x3
    python benchmarks/bench_batch.py --runs 256x4,128x3       # the full size
    python benchmarks/bench_batch.py --runs 256x4,256x6d0.1   # 6 epochs with dropout 0.1
    python benchmarks/bench_batch.py --runs 256x4,256x4b0.3   # more weight on cross-entropy
    python benchmarks/bench_batch.py --runs 256x4,256x4t600   # softer kNN targets

A run's ``dD`` suffix sets its dropout (default: the size's), an ``lLR`` suffix its peak
learning rate (default: ``--lr``, else the size's), a ``bB`` suffix its loss weight β
(``β·KL + (1-β)·CE``; default 0.5, notebook 03's), a ``tT`` suffix the temperature of its kNN
targets (``exp(-d / T)``; default 300, notebook 03's: another one computes and caches those
targets first, minutes at the full size), an ``sN`` suffix its seed (initial weights
and batch order; default 0): ``256x4,256x4s1,256x4s2`` shows how much the test perplexity
moves between draws of the same schedule, ``256x4,256x12d0.1l1e-3`` compares the default
with the earlier 12-epoch schedule.

Needs that size's store and held-out pass (notebook 02) and notebook 03's cached targets.
Training time includes the per-epoch validation, as notebook 03 reports it. Machines are
noisy: compare the runs of one invocation only.
"""
import argparse
import re
import time

import numpy as np
import torch

from bench_dropout import K, TEMPERATURE, store_and_targets  # this folder: the same targets
from helpers.corpus import load_corpus, split_by_document
from helpers.cpu import autocast_dtype, describe
from helpers.decoder import DecoderConfig, MemoryDecoder
from helpers.evaluation import heldout_eval
from helpers.index import load_or_build_index
from helpers.knn import best_alpha, interpolate, perplexity
from helpers.model import EMBEDDED_MODEL, load_base_model
from helpers.paths import write_results
from helpers.sizes import by_size, pick_size
from helpers.stats import perplexity_ratio, token_nll
from helpers.train_decoder import decoder_target_probs, precompute_knn_targets, train_decoder

ALPHAS = np.round(np.linspace(0, 1, 21), 2)  # notebook 03's grid


BETA = 0.5  # notebook 03's loss weight
RUN = re.compile(r"(\d+)x(\d+)(?:d([0-9.]+))?(?:l([0-9.]+(?:e-?\d+)?))?(?:b([0-9.]+))?"
                 r"(?:t([0-9.]+))?(?:s(\d+))?")
SYNTAX = ("--runs takes BATCHxEPOCHS[dDROPOUT][lLR][bBETA][tTEMPERATURE][sSEED] separated by "
          "commas, e.g. 256x4,128x3,256x6d0.1,256x12d0.1l1e-3,256x4b0.3,256x4t600,256x4s1 (batch "
          "and epochs >= 1, dropout in [0, 1), learning rate > 0, beta in [0, 1], temperature > "
          "0, seed >= 0)")


def parse_runs(text: str, dropout: float,
               lr: float) -> list[tuple[int, int, float, float, float, float, int]]:
    """``"256x4,256x6d0.1,256x12l1e-3,256x4b0.3,256x4t600,256x4s1"`` ->
    ``[(256, 4, dropout, lr, 0.5, 300, 0), (256, 6, 0.1, lr, 0.5, 300, 0),
    (256, 12, dropout, 0.001, 0.5, 300, 0), (256, 4, dropout, lr, 0.3, 300, 0),
    (256, 4, dropout, lr, 0.5, 600, 0), (256, 4, dropout, lr, 0.5, 300, 1)]``: batch, epochs,
    dropout, learning rate, β, kNN temperature, seed."""
    runs = []
    for r in text.split(","):
        m = RUN.fullmatch(r.strip())
        try:
            b, epochs, seed = int(m[1]), int(m[2]), int(m[7] or 0)
            p = dropout if m[3] is None else float(m[3])
            rate = lr if m[4] is None else float(m[4])
            beta = BETA if m[5] is None else float(m[5])
            temp = TEMPERATURE if m[6] is None else float(m[6])
        except (TypeError, ValueError):  # no match, or a number like "0.1.2"
            b = epochs = p = rate = beta = temp = -1
        if (min(b, epochs) < 1 or not 0 <= p < 1 or not rate > 0 or not 0 <= beta <= 1
                or not temp > 0):
            raise SystemExit(f"{SYNTAX}; got {r!r}.")
        if (b, epochs, p, rate, beta, temp, seed) in runs:
            raise SystemExit(f"--runs asks for {r!r} twice "
                             f"({run_name(b, epochs, p, rate, beta, temp, seed, dropout, lr)} "
                             f"with the size's dropout {dropout:g} and learning rate {lr:g}); "
                             "give each run once.")
        runs.append((b, epochs, p, rate, beta, temp, seed))
    return runs


def run_name(b: int, epochs: int, p: float, rate: float, beta: float, temp: float, seed: int,
             dropout: float, lr: float) -> str:
    return (f"{b}x{epochs}" + (f"d{p:g}" if p != dropout else "")
            + (f"l{rate:g}" if rate != lr else "") + (f"b{beta:g}" if beta != BETA else "")
            + (f"t{temp:g}" if temp != TEMPERATURE else "") + (f"s{seed}" if seed else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick size (default full)")
    ap.add_argument("--runs", default="256x4,128x3",
                    help="BATCHxEPOCHS[dDROPOUT][lLR][bBETA][tTEMPERATURE][sSEED] per run, the "
                         "reference first")
    ap.add_argument("--lr", type=float, default=None, help="default: the size's")
    args = ap.parse_args()
    size = pick_size(not args.quick)
    lr = by_size(args.lr, size, "lr")
    window, dropout = by_size(None, size, "window"), by_size(None, size, "dropout")
    runs_asked = parse_runs(args.runs, dropout, lr)

    model, tok = load_base_model(EMBEDDED_MODEL)
    vocab = model.config.get_text_config().vocab_size
    split = split_by_document(load_corpus("eu-law"))
    heldout = size.shorten(list(split["heldout"]["text"])[:size.eval_docs], tok)
    ev = heldout_eval(model, tok, heldout, EMBEDDED_MODEL)  # notebook 02's cached pass
    del model  # not needed below
    store, targets = store_and_targets(not args.quick)
    autocast = autocast_dtype(torch.device("cpu"))
    print(f"{size.name} size: {len(store):,} keys, W={window}, lr {lr:g}, dropout {dropout:g}, "
          f"{'bf16 autocast' if autocast else 'float32'} ({describe()})", flush=True)

    def validation(dec):
        p = decoder_target_probs(dec, ev.keys, ev.doc, ev.values,
                                 rows=np.flatnonzero(ev.valid))
        return min(perplexity(interpolate(ev.p_base[ev.valid], p, a)) for a in ALPHAS)

    runs, nll = {}, {}
    first = run_name(*runs_asked[0], dropout, lr)
    index = None  # opened if a run asks for other targets than notebook 03's
    for b, epochs, p, rate, beta, temp, seed in runs_asked:
        name = run_name(b, epochs, p, rate, beta, temp, seed, dropout, lr)
        if temp != targets.temperature:
            if index is None:
                index = load_or_build_index(store, "Flat")
            targets = precompute_knn_targets(store, index, k=K, temperature=temp)
        torch.manual_seed(seed)  # the decoder's initial weights
        dec = MemoryDecoder(DecoderConfig.from_store(store, vocab, dim=256, window=window,
                                                     head="store", dropout=p))
        tic = time.perf_counter()
        history = train_decoder(dec, store, targets, epochs=epochs, lr=rate, batch_size=b,
                                beta=beta, eval_fn=validation, patience=2, seed=seed,
                                progress=False, autocast=autocast)
        seconds = time.perf_counter() - tic
        p_dec = decoder_target_probs(dec, ev.keys, ev.doc, ev.values)
        alpha, valid, test = best_alpha(ev.p_base, p_dec, ev.valid, ev.test, ALPHAS)
        nll[name] = token_nll(interpolate(ev.p_base[ev.test], p_dec[ev.test], alpha))
        runs[name] = {"batch_size": b, "epochs": epochs, "dropout": p, "lr": rate, "beta": beta,
                      "temperature": temp, "seed": seed,
                      "steps": len(history["loss"]),
                      "train_seconds": round(seconds, 1),
                      "samples_per_s": round(len(history["loss"]) * b / seconds),
                      "valid_per_epoch": [round(v, 3) for v in history["eval"]],
                      "best_epoch": history["best_epoch"], "alpha": alpha,
                      "valid_ppl": round(valid, 3), "test_ppl": round(test, 3)}
        if name != first:
            r = perplexity_ratio(nll[name], nll[first], ev.doc[ev.test], seed=0)
            runs[name]["test_ratio_to_first"] = {"ratio": r.ratio, "low": r.low,
                                                 "high": r.high, "articles": r.groups}
        print(f"batch {b}, {epochs} epochs, dropout {p:g}, lr {rate:g}, β {beta:g}, "
              f"T {temp:g}, seed {seed}: "
              f"{runs[name]['steps']} steps in {seconds:.0f} s; validation per epoch "
              f"{runs[name]['valid_per_epoch']}; α {alpha}; test perplexity {test:.2f}" + (f"; ÷ {first}: {r}" if name != first else ""),
              flush=True)
    write_results("bench_batch" + ("_quick" if args.quick else ""), {
        "size": size.name, "keys": len(store), "window": window, "lr": lr, "dropout": dropout,
        "autocast": str(autocast), "threads": torch.get_num_threads(), "runs": runs})


if __name__ == "__main__":
    main()
