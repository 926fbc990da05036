"""Build a datastore from the command line, on one process or many (``accelerate``).

    # one process: exactly what notebook 02 does (same store, same folder)
    python scripts/build_datastore.py --size quick

    # N processes on one machine (GPUs, or CPU processes with the gloo backend)
    accelerate launch --multi_gpu --num_processes 2 scripts/build_datastore.py --size quick

    # several machines: `accelerate config` on each (machine rank, main address), then
    accelerate launch scripts/build_datastore.py --size full --out /shared/disk/store

Each process extracts its share of the documents into a part with its own
manifest (``helpers/distributed.py``); process 0 merges the parts into one
store with the rows of a one-process build, in the same order.  Rerunning a
launch that was interrupted skips the finished parts and resumes the others.

``--texts FILE`` (one JSON object per line with a "text" field, or a ``.txt``
with one document per line) and ``--model FOLDER`` (a ``save_pretrained``
folder) build from anything else.  ``--rank R --world-size N`` builds one part
in a plain process (e.g. a part that failed); ``--merge-only`` merges parts
that are already there.
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
    ap.add_argument("--model", default="gemma-3-270m",
                    help="gemma-3-270m (embedded), a Hub id or a save_pretrained folder")
    ap.add_argument("--model-name", help="name recorded in the manifest (default: --model)")
    ap.add_argument("--corpus", default="eu-law", help="corpus for helpers.corpus.load_corpus")
    ap.add_argument("--texts", help="a .jsonl ({'text': ...} per line) or .txt (a document a "
                                    "line) to use instead of --corpus")
    ap.add_argument("--size", default="quick", choices=("smoke", "quick", "full"),
                    help="which training articles, as notebooks 02-05 pick them")
    ap.add_argument("--limit", type=int, help="only the first N documents (a trial run)")
    ap.add_argument("--out", help="store folder (default: where notebook 02 looks for it)")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--key-dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--shard-docs", type=int, default=32,
                    help="documents per saved block (a rerun resumes from the last block)")
    ap.add_argument("--threads", type=int, help="torch threads per process")
    ap.add_argument("--rank", type=int, help="build only this part (with --world-size)")
    ap.add_argument("--world-size", type=int, help="number of parts (with --rank)")
    ap.add_argument("--merge-only", action="store_true",
                    help="merge the parts already built (--world-size of them)")
    ap.add_argument("--keep-parts", action="store_true", help="keep <store>.shards/")
    ap.add_argument("--report", help="write a JSON line of what was built to this file")
    return ap.parse_args(argv)


def load_texts(args) -> tuple[list[str], str]:
    """The documents and the corpus name recorded in the manifest."""
    from helpers.sizes import SIZES

    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            sys.exit(f"--texts {path}: no such file. Pass a .jsonl or .txt file.")
        lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        texts = [json.loads(l)["text"] for l in lines] if path.suffix == ".jsonl" else lines
        return texts, path.stem
    from helpers.corpus import load_corpus, split_by_document
    split = split_by_document(load_corpus(args.corpus))
    return SIZES[args.size].train_texts(split["train"]["text"], None), args.corpus


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from helpers.datastore import build_datastore, default_store_path
    from helpers.distributed import build_datastore_sharded, merge_parts
    from helpers.model import load_base_model
    from helpers.sizes import SIZES

    state = None
    if args.rank is None and not args.merge_only:
        from accelerate import PartialState
        state = PartialState(cpu=not torch.cuda.is_available())
        device = state.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_base_model(args.model, device=str(device),
                                       dtype=torch.float32 if device.type == "cpu" else None)
    texts, corpus_name = load_texts(args)
    if args.limit:
        texts = texts[:args.limit]
    model_name = args.model_name or args.model
    tag = "" if args.texts else SIZES[args.size].tag
    out = Path(args.out) if args.out else default_store_path(model_name, corpus_name,
                                                             args.layer, args.key_dtype, tag)
    settings = dict(model_name=model_name, corpus_name=corpus_name, split="train",
                    layer=args.layer, window=args.window, overlap=args.overlap,
                    batch_size=args.batch_size, key_dtype=args.key_dtype)
    tic = time.perf_counter()
    if args.merge_only:
        if not args.world_size:
            sys.exit("--merge-only needs --world-size N (how many parts were built).")
        store = merge_parts(model, tokenizer, texts, out, args.world_size,
                            shard_docs=args.shard_docs, keep_parts=args.keep_parts, **settings)
    elif state is not None and state.num_processes == 1:  # a plain process: notebook 02's call
        store = build_datastore(model, tokenizer, texts, out, shard_docs=args.shard_docs,
                                progress=True, **settings)
    else:
        if args.rank is not None and not args.world_size:
            sys.exit("--rank needs --world-size N.")
        store = build_datastore_sharded(
            model, tokenizer, texts, out, state=state, rank=args.rank or 0,
            world=args.world_size or 1, shard_docs=args.shard_docs, progress=True,
            keep_parts=args.keep_parts, **settings)
    seconds = time.perf_counter() - tic
    rank = state.process_index if state is not None else (args.rank or 0)
    if store is None:
        print(f"part {args.rank} of {args.world_size} built in {seconds:.1f} s; merge with "
              f"--merge-only --world-size {args.world_size} once every part is there.")
        return
    if rank == 0:
        print(f"{store} in {seconds:.1f} s")
        if args.report:
            with open(args.report, "a") as f:
                f.write(json.dumps({"processes": 1 if state is None else state.num_processes,
                                    "threads": torch.get_num_threads(), "seconds": seconds,
                                    "rows": len(store), "path": str(out)}) + "\n")


if __name__ == "__main__":
    main()
