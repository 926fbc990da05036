"""Score a trained MemoryDecoder against the kNN-LM on the held-out test half.

    python scripts/score_decoder.py

Uses what notebooks 02 and 03 built on the embedded default (the datastore,
the cached held-out pass, data/artifacts/memory_decoder): α and λ are chosen on
the validation half, perplexities reported on the test half, as in notebook 03.
"""
import time

import numpy as np

from helpers.corpus import load_corpus, split_by_document
from helpers.datastore import Datastore, default_store_path
from helpers.decoder import load_decoder
from helpers.evaluation import heldout_eval
from helpers.index import load_or_build_index
from helpers.knn import interpolate, knn_prob_of, lookup_values, perplexity, search
from helpers.model import load_base_model
from helpers.paths import artifacts_dir
from helpers.train_decoder import decoder_target_probs
model, tok = load_base_model()
store = Datastore.open(default_store_path("gemma-3-270m", "eu-law"))
index = load_or_build_index(store, "Flat")
ev = heldout_eval(model, tok, list(split_by_document(load_corpus())["heldout"]["text"]), "gemma-3-270m")
dec = load_decoder(artifacts_dir() / "memory_decoder", base_model_name="gemma-3-270m", tokenizer=tok, store=store)
A = np.round(np.linspace(0, 1, 21), 2)
d, ids = search(index, ev.keys, 256)
p_knn = knn_prob_of(ev.values, d, lookup_values(store, ids), 300.0)
tic = time.perf_counter(); p_dec = decoder_target_probs(dec, ev.keys, ev.doc, ev.values); dt = time.perf_counter() - tic
def best(p):
    v = [perplexity(interpolate(ev.p_base[ev.valid], p[ev.valid], a)) for a in A]
    a = float(A[int(np.argmin(v))]); return a, min(v)
for name, p in [("kNN-LM", p_knn), ("MemoryDecoder", p_dec)]:
    a, v = best(p)
    t = perplexity(interpolate(ev.p_base[ev.test], p[ev.test], a))
    an = ev.test & ev.answer
    ta = perplexity(interpolate(ev.p_base[an], p[an], a))
    print(f"{name:14} weight={a:.2f} valid={v:.3f} test={t:.3f} test-answer-only={ta:.3f}")
print(f"base           test={perplexity(ev.p_base[ev.test]):.3f} test-answer-only={perplexity(ev.p_base[ev.test & ev.answer]):.3f}")
print(f"decoder scoring of {len(ev.values)} held-out tokens: {dt:.1f} s")
