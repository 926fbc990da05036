"""GPU check: the six notebooks at smoke size and the helpers' device paths, on a GPU.

    python scripts/gpu_check.py              # any machine with a CUDA GPU (a Colab T4 will do)
    python scripts/gpu_check.py --fake-gpu   # no GPU: the pretend GPU of helpers.devicecheck

Nothing is downloaded: the base model is a *randomly initialised* Gemma 3 of
the 270M shape (18 layers, hidden size 640, a 262,144-token head) with a
byte-level tokenizer trained on the embedded corpus in seconds, saved to a
temporary folder and passed to every notebook as ``MODEL_NAME``.  Its outputs
are noise; the check is about devices, dtypes and speed, not perplexity.

On the CPU (``--fake-gpu``, what the tests run) the shape is a small one
(2 layers, hidden size 64, the tokenizer's vocabulary) unless ``--shape
270m`` is given, and every notebook runs under ``helpers.devicecheck``: the
model says it is on ``cuda:0`` and a line that would mix devices on a real
GPU fails.  Each run uses an empty data folder, so notebooks 03-05 also show
that they build what they lack.

Prints, per notebook, ok/FAILED, its wall time and the devices of ``model``
and ``decoder`` seen after its cells; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's helpers, not another install

SHAPES = {  # Gemma 3 270M as in its config.json; "small" for the CPU
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                 vocab_size=262_144, query_pre_attn_scalar=256, sliding_window=512,
                 max_position_embeddings=32_768),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  vocab_size=None, query_pre_attn_scalar=16, sliding_window=512,
                  max_position_embeddings=2_048),
}
TOKENIZER_VOCAB = 4_096
# Notebook 05 builds what it lacks (off by default at smoke size, for the browser test).
PARAMETERS = {"05": {"BUILD_MISSING": True}}
# On the CPU only: notebook 03 trains a narrower decoder for fewer steps, 04 its gates for
# fewer steps (the same cells run; only their sizes change).
CPU_PARAMETERS = {"03": {"DECODER_DIM": 32, "MAX_STEPS": 4}, "04": {"GATE_STEPS": 20},
                  "06": {"TOKEN_DIM": 32, "MAX_STEPS": 4, "GATE_STEPS": 20}}
NOTEBOOKS = ["01_hidden_states", "02_datastore_knn_lm", "03_train_memory_decoder",
             "04_blended_sampling", "05_chat_panel", "06_token_memory"]
# What each notebook's kernel reports the device of: the model and every memory beside it.
RECORDED = ("model", "decoder", "gate", "hidden_decoder", "token_decoder", "token_gate")

# Runs in each notebook's kernel before its first cell (IPython startup file).
STARTUP = '''
import json as _json, os as _os
if _os.environ.get("MEMDEC_FAKE_GPU") == "1":
    from helpers.devicecheck import fake_gpu as _fake_gpu
    _memdec_fake_gpu = _fake_gpu()
    _memdec_fake_gpu.__enter__()

def _memdec_record_devices(result=None):
    seen = {}
    for name in RECORDED_NAMES:
        obj = globals().get(name)
        try:
            seen[name] = str(next(obj.parameters()).device)
        except Exception:
            continue
    if seen:
        with open(_os.environ["MEMDEC_DEVICE_LOG"], "w") as fh:
            _json.dump(seen, fh)

get_ipython().events.register("post_run_cell", _memdec_record_devices)
'''.replace("RECORDED_NAMES", repr(RECORDED))


def build_tokenizer(folder: Path, vocab: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on the embedded corpus, Gemma's special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers.corpus import load_corpus

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(load_corpus("eu-law")["text"]), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def build_random_model(folder: Path, shape: str = "270m", seed: int = 0) -> Path:
    """Save a randomly initialised Gemma 3 of ``shape`` (+ tokenizer) into ``folder``."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tokenizer(folder)
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or len(tok)
    n = dims["num_hidden_layers"]
    layer_types = ["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                   for i in range(n)]
    config = Gemma3TextConfig(**dims, layer_types=layer_types, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    return folder


def check_helpers(model_dir: Path, work: Path) -> dict:
    """The helpers' device paths on this process's device: returns what ran where."""
    import numpy as np
    import torch

    from helpers.corpus import load_corpus
    from helpers.datastore import build_datastore
    from helpers.decoder import DecoderConfig, MemoryDecoder, load_decoder, save_decoder
    from helpers.evaluation import blend_curves, heldout_eval
    from helpers.gate import gate_inputs, train_gate
    from helpers.index import build_index, load_index, save_index
    from helpers.model import load_base_model
    from helpers.sampling import generate_text
    from helpers.train_decoder import precompute_knn_targets, train_decoder

    model, tok = load_base_model(str(model_dir))
    texts = list(load_corpus("eu-law")["text"])[:6]
    store = build_datastore(model, tok, texts[:4], work / "store", model_name="random",
                            corpus_name="eu-law", progress=False)
    index = build_index(store)                   # on the GPU when faiss has one
    save_index(index, store)
    cpu_index = load_index(store, use_gpu=False)  # a GPU-built index opens on a CPU
    targets = precompute_knn_targets(store, cpu_index, k=8, temperature=300.0)
    # notebook 03's KEEP_SELF: searched on the index built above (the GPU's where faiss has one)
    kept = precompute_knn_targets(store, index, k=8, temperature=300.0, keep_self=True)
    own, other = kept.p_stored(store), targets.p_stored(store)
    assert (own > 0).mean() > 0.99 and own.mean() >= other.mean(), \
        f"keep_self targets put {own.mean():.2f} on the stored token, the paper's {other.mean():.2f}"
    decoder = MemoryDecoder(DecoderConfig.from_store(store, model.config.vocab_size, dim=64,
                                                     n_layers=1, window=2)).to(model.device)
    history = train_decoder(decoder, store, targets, epochs=1, batch_size=64, max_steps=4,
                            progress=False)
    decoder.eval()
    save_decoder(decoder, work / "decoder")
    on_cpu = load_decoder(work / "decoder", device="cpu")      # saved on the GPU, read on a CPU
    again = load_decoder(work / "decoder", device=model.device)
    ev = heldout_eval(model, tok, [t[:400] for t in texts[4:]], "random", progress=False)
    curves = blend_curves(model, again, ev, ev.valid, [0.0, 0.5], progress=False)
    signals = gate_inputs(model, again, ev.keys, ev.doc, ev.values, progress=False)
    gate = train_gate([signals], steps=3, decoder=again)[0].to(model.device)
    for mode, kw in [("base", {}), ("knn", {"store": store, "index": index}),
                     ("memdec", {"decoder": again}),
                     ("memdec", {"decoder": again, "gate": gate, "adaptive": True})]:
        generate_text(model, tok, "Title: GDPR", mode=mode, max_new_tokens=3, top_k=5, **kw)
    assert np.isfinite(history["loss"]).all() and np.isfinite(curves["probs"]).all()
    return {"model": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "decoder": str(next(again.parameters()).device),
            "decoder read on the CPU": str(next(on_cpu.parameters()).device),
            "index": type(index).__name__, "gate": str(gate.mean.device),
            "keep_self targets": f"{own.mean():.2f} of a target on the stored token "
                                 f"(own key dropped: {other.mean():.2f})",
            "cuda": torch.cuda.is_available()}


def seed_corpus(data: Path) -> None:
    """Copy the cached EU-law corpus (1.7 MB) into ``data``, so no run needs the network."""
    import shutil

    from helpers.paths import data_dir
    try:
        source = data_dir() / "cache" / "corpus"
    except FileNotFoundError:  # a MEMDEC_DATA_DIR that does not exist: nothing to copy
        return
    if (source / "regulations.db").is_file() and not (data / "cache" / "corpus").exists():
        shutil.copytree(source, data / "cache" / "corpus")


def run_notebook(name: str, out_dir: Path, model_dir: Path, env: dict,
                 parameters: dict | None = None) -> tuple[bool, str]:
    """Execute ``notebooks/<name>.ipynb`` at smoke size; (ok, last error line)."""
    import papermill as pm

    os.environ.update(env)
    try:
        pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"),
                            str(out_dir / f"{name}.ipynb"), cwd=str(ROOT / "notebooks"),
                            parameters={"MODEL_NAME": str(model_dir), **(parameters or {})},
                            kernel_name="python3",
                            progress_bar=False)
    except Exception as err:  # papermill's PapermillExecutionError names the cell
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        return False, " | ".join(lines[-2:])[:300]
    return True, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake-gpu", action="store_true",
                    help="no GPU here: run on the CPU under helpers.devicecheck")
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="model shape (default: 270m on a GPU, small with --fake-gpu)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="notebook numbers to run, e.g. --only 01 04 (default: all)")
    ap.add_argument("--fresh", action="store_true",
                    help="each notebook in an empty data folder of its own, as a fresh Colab "
                         "runtime: 04 and 05 then run notebook 03 first")
    ap.add_argument("--skip-helpers", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the data and executed notebooks here")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one line per step below, no loading bars
    if not args.fake_gpu and not torch.cuda.is_available():
        print("No CUDA GPU is visible to PyTorch. On Colab: Runtime > Change runtime type > "
              "GPU. Without a GPU run `python scripts/gpu_check.py --fake-gpu` (the CPU "
              "check the tests run).", file=sys.stderr)
        return 2
    shape = args.shape or ("small" if args.fake_gpu else "270m")
    work = args.keep or Path(tempfile.mkdtemp(prefix="memdec-gpu-check-"))
    for sub in ("data", "executed", "ipython/profile_default/startup", "helpers"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    seed_corpus(work / "data")  # before MEMDEC_DATA_DIR points there
    (work / "ipython/profile_default/startup/00-gpu-check.py").write_text(STARTUP)
    env = {"MEMDEC_SMOKE": "1", "MEMDEC_DATA_DIR": str(work / "data"),
           "IPYTHONDIR": str(work / "ipython"), "MEMDEC_FAKE_GPU": "1" if args.fake_gpu else "0",
           "MEMDEC_EARLIER_PARAMETERS": json.dumps(CPU_PARAMETERS if args.fake_gpu else {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    if args.fake_gpu:
        device = "CPU, pretend GPU (helpers.devicecheck)"
    else:
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    print(f"gpu_check: {device}; torch {torch.__version__}; model: random Gemma 3, {shape} "
          f"shape{'' if shape == '270m' else ' (smaller than the real 270M: CPU time)'}; "
          f"{'each notebook in an empty data folder; ' if args.fresh else ''}"
          f"data in {work}", flush=True)

    tic0 = time.perf_counter()
    tic = time.perf_counter()
    model_dir = build_random_model(work / "model", shape)
    print(f"  random model built in {time.perf_counter() - tic:.1f} s", flush=True)
    failures = 0
    if not args.skip_helpers:
        tic = time.perf_counter()
        try:
            if args.fake_gpu:
                from helpers.devicecheck import fake_gpu
                with fake_gpu():
                    seen = check_helpers(model_dir, work / "helpers")
            else:
                seen = check_helpers(model_dir, work / "helpers")
            status = "ok    " + ", ".join(f"{k}: {v}" for k, v in seen.items())
        except Exception as err:  # report and go on to the notebooks
            failures += 1
            status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:240]}"
        print(f"  {'helpers':26} {time.perf_counter() - tic:6.1f} s  {status}", flush=True)
    rows = []
    for name in NOTEBOOKS:
        if args.only and name[:2] not in args.only:
            continue
        log = work / "executed" / f"{name}.devices.json"
        data = work / "data" / (name[:2] if args.fresh else "")
        data.mkdir(parents=True, exist_ok=True)
        (data / "cache").mkdir(exist_ok=True)
        if args.fresh and (work / "data" / "cache" / "corpus").is_dir():
            # empty but for the corpus, which a fresh runtime downloads (this machine may not)
            shutil.copytree(work / "data" / "cache" / "corpus", data / "cache" / "corpus",
                            dirs_exist_ok=True)
        tic = time.perf_counter()
        ok, error = run_notebook(name, work / "executed", model_dir,
                                 {**env, "MEMDEC_DEVICE_LOG": str(log),
                                  "MEMDEC_DATA_DIR": str(data)},
                                 {**PARAMETERS.get(name[:2], {}),
                                  **(CPU_PARAMETERS.get(name[:2], {}) if args.fake_gpu else {})})
        seconds = time.perf_counter() - tic
        seen = json.loads(log.read_text()) if log.exists() else {}
        astray = [k for k in RECORDED[1:] if seen.get(k, seen.get("model")) != seen.get("model")]
        if ok and astray:
            ok, error = False, (f"the {astray[0]} is on {seen[astray[0]]}, the model on "
                                f"{seen['model']}")
        failures += not ok
        where = ", ".join(f"{k} on {v}" for k, v in seen.items())
        print(f"  {name:26} {seconds:6.1f} s  {'ok    ' if ok else 'FAILED'} {where}"
              + (f"\n      {error}" if error else ""), flush=True)
        rows.append({"notebook": name, "ok": ok, "seconds": round(seconds, 1), "devices": seen,
                     "error": error})
    total = time.perf_counter() - tic0
    (work / "gpu_check.json").write_text(json.dumps(
        {"device": device, "shape": shape, "torch": torch.__version__,
         "total_seconds": round(total, 1), "notebooks": rows}, indent=2))
    print(f"  {'total':26} {total:6.1f} s  {'ok' if not failures else f'{failures} FAILED'}"
          f"  (executed notebooks in {work / 'executed'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
