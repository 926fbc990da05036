"""Train the Memory Decoder data parallel on N processes (``accelerate launch``).

    # one process
    python scripts/train_decoder.py --size quick --out data/artifacts/memory_decoder_dp

    # N processes on one machine (GPUs; CPU processes use the gloo backend)
    accelerate launch --multi_gpu --num_processes 2 scripts/train_decoder.py --size quick

``--batch-size`` is the global batch (split over the processes), so N
processes take the same steps as one (``helpers.distributed.
train_decoder_data_parallel``).  The store comes from notebook 02 or
``scripts/build_datastore.py``; process 0 computes the kNN targets if they are
not cached (``precompute_knn_targets``), the others wait and open them.  The
decoder is saved by process 0 with ``finish_run`` (weights, config, run.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="datastore folder (default: notebook 02's for --size)")
    ap.add_argument("--size", default="quick", choices=("smoke", "quick", "full"))
    ap.add_argument("--out", required=True, help="folder for the trained decoder")
    ap.add_argument("--base-vocab-size", type=int,
                    help="the base model's vocabulary (default: read from the embedded model)")
    ap.add_argument("--index", default="Flat", help="FAISS factory for the kNN targets")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=500.0)
    ap.add_argument("--keep-self", action="store_true",
                    help="keep each row's own key in its kNN target (the paper drops it)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads per process")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    from helpers.datastore import Datastore, default_store_path
    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.distributed import train_decoder_data_parallel
    from helpers.index import load_or_build_index
    from helpers.reuse import finish_run
    from helpers.sizes import SIZES
    from helpers.train_decoder import precompute_knn_targets

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    path = Path(args.store) if args.store else default_store_path(
        "gemma-3-270m", "eu-law", tag=SIZES[args.size].tag)
    store = Datastore.open(path)
    if accelerator.is_main_process:  # the others would race to write the same cache
        index = load_or_build_index(store, args.index, use_gpu="auto")
        precompute_knn_targets(store, index, k=args.k, temperature=args.temperature,
                               keep_self=args.keep_self)
        del index
    accelerator.wait_for_everyone()
    index = load_or_build_index(store, args.index, use_gpu=False)
    targets = precompute_knn_targets(store, index, k=args.k, temperature=args.temperature,
                                     keep_self=args.keep_self)
    del index
    vocab = args.base_vocab_size
    if vocab is None:
        from transformers import AutoConfig

        from helpers.model import embedded_model_dir
        vocab = AutoConfig.from_pretrained(embedded_model_dir()).get_text_config().vocab_size
    torch.manual_seed(args.seed)
    decoder = MemoryDecoder(DecoderConfig.from_store(
        store, vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        window=args.window, dropout=args.dropout))
    tic = time.perf_counter()
    history = train_decoder_data_parallel(
        decoder, store, targets, accelerator, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, beta=args.beta, seed=args.seed, max_steps=args.max_steps)
    seconds = time.perf_counter() - tic
    if accelerator.is_main_process:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
        settings["store"] = store.fingerprint
        finish_run(accelerator.unwrap_model(decoder), args.out, settings, history=history,
                   seconds=seconds, processes=accelerator.num_processes)
        print(json.dumps({"processes": accelerator.num_processes, "steps": len(history["loss"]),
                          "seconds": round(seconds, 2),
                          "last_loss": history["loss"][-1] if history["loss"] else None}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
