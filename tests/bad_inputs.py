"""A sweep of bad inputs through the public helpers: wrong values and types, damaged files,
saves into folders that hold other files, disks that fail, no network.

Each case says what must happen: an error whose message names the problem (``problem``,
a regex) and says what to do next (``ADVICE``), or, for a damaged cache, a correct result
(``check``).  Files named in ``keep`` must survive.  ``tests/test_bad_inputs.py`` runs every
case; ``scripts/sweep_bad_inputs.py`` counts the outcomes.  Everything runs on the tiny
random model of ``tests/conftest.py``, offline.
"""

from __future__ import annotations

import errno
import json
import math
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ADVICE = re.compile(r"\b(use|pass|call|delete|rerun|run|train|build|retrain|rebuild|set|choose|"
                    r"pick|load|give|type|move|free|make|check|install|wrap|decode|fix|lower|"
                    r"shorten|switch|untick|save|rename|drop|try|attach|recompute|"
                    r"computing|extracting|rebuilding|starting|kept)\b", re.I)
HANG_S = 20


@dataclass
class Case:
    id: str
    call: Callable          # call(ctx) -> result; ctx: model, tok, store, index, decoder, gate, tmp
    problem: str = ""       # regex the error must match (what is wrong: the name, path, value)
    check: Callable | None = None  # for cases that must succeed: check(ctx, result) -> bool
    keep: Callable | None = None   # keep(ctx) -> {path: bytes} that must be unchanged after
    tags: tuple = field(default_factory=tuple)


# --- the context: a tiny model, a store, an index, a decoder, a gate ---------------------

def make_context(root: Path) -> dict:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import STORE_TEXTS, make_model, make_tokenizer
    from helpers.datastore import build_datastore
    from helpers.decoder import DecoderConfig, MemoryDecoder
    from helpers.gate import train_gate
    from helpers.index import build_index

    torch.set_num_threads(1)
    tok = make_tokenizer()
    tok.padding_side = "right"
    model = make_model(len(tok))
    store = build_datastore(model, tok, STORE_TEXTS, root / "store", model_name="tiny",
                            corpus_name="words")
    index = build_index(store, use_gpu=False)
    torch.manual_seed(0)
    decoder = MemoryDecoder(DecoderConfig.from_store(store, len(tok), dim=16, n_layers=1,
                                                     n_heads=2, dropout=0.0)).eval()
    rng = np.random.default_rng(0)
    domain = {"features": rng.standard_normal((20, 7)).astype(np.float32),
              "p_base": rng.random(20).astype(np.float32),
              "p_dec": rng.random(20).astype(np.float32)}
    gate, _ = train_gate([domain], steps=2, decoder=decoder)
    qa = root / "qa.json"
    qa.write_text(json.dumps([{"Title": f"t{i}", "Question": "q", "Answer": f"a {i}"}
                              for i in range(4)]))
    from helpers.corpus import load_corpus
    return dict(model=model, tok=tok, store=store, index=index, decoder=decoder, gate=gate,
                root=root, texts=STORE_TEXTS, qa=qa, ds=load_corpus(str(qa)))


# --- cases: wrong types and values of every numeric and text argument --------------------

INT_BAD = ["3", 2.5, True, None, float("nan"), [3], -7]
FLOAT_BAD = ["0.7", None, float("nan"), float("inf"), True, [0.7], -3.0]
STR_BAD = [b"text", 123, None, "", ["a"]]


def _gen(c, name):
    from helpers.sampling import generate
    return lambda **kw: list(generate(c["model"], c["tok"], "the data",
                                      **{"max_new_tokens": 2, "top_k": 5, **kw}))


def _arg_targets():
    """(function label, parameter, kind, call(ctx, value), values that are fine)."""
    from helpers import corpus, datastore, decoder as dec, gate, hidden, index, knn, offdomain
    from helpers import paths, sampling, train_decoder as td
    from helpers.chat import ChatPanel
    from helpers.model import load_base_model

    def targets_call(c, **kw):
        return td.precompute_knn_targets(c["store"], c["index"], **{"k": 4, **kw})

    def train(c, **kw):
        t = td.precompute_knn_targets(c["store"], c["index"], k=4)
        return td.train_decoder(c["decoder"], c["store"], t,
                                **{"progress": False, "max_steps": 1, **kw})

    def domain():
        rng = np.random.default_rng(0)
        return {"features": rng.standard_normal((10, 7)), "p_base": rng.random(10),
                "p_dec": rng.random(10)}

    def cfg(**kw):
        base = dict(key_dim=8, base_vocab_size=50, vocab_ids=[1, 2], dim=16, n_layers=1,
                    n_heads=2)
        return dec.DecoderConfig(**{**base, **kw})

    def store_call(c, **kw):
        return datastore.build_datastore(c["model"], c["tok"], c["texts"][:1],
                                         Path(tempfile.mkdtemp(dir=c["root"])) / "s",
                                         **{"model_name": "tiny", "corpus_name": "w", **kw})

    T = []
    for p in ("temperature", "alpha", "knn_temperature"):
        T.append(("generate", p, "float", lambda c, v, p=p: _gen(c, p)(
            **{p: v, "mode": "knn" if p == "knn_temperature" else "memdec",
               "store": c["store"], "index": c["index"], "decoder": c["decoder"]}), ()))
    for p in ("max_new_tokens", "seed", "k", "top_k"):
        T.append(("generate", p, "int", lambda c, v, p=p: _gen(c, p)(
            **{"mode": "knn", "store": c["store"], "index": c["index"], p: v}),
            (None,) if p == "top_k" else ()))
    T.append(("generate", "prompt", "str", lambda c, v: list(sampling.generate(
        c["model"], c["tok"], v, max_new_tokens=1, top_k=5)), ()))
    T.append(("sample_next", "temperature", "float",
              lambda c, v: sampling.sample_next(torch.zeros(5), v), ()))
    T.append(("blend_logits", "alpha", "float",
              lambda c, v: sampling.blend_logits(torch.zeros(5), torch.zeros(5), v), ()))
    T.append(("search", "k", "int", lambda c, v: knn.search(c["index"], c["store"].keys[:2],
                                                            v), ()))
    T.append(("neighbour_weights", "temperature", "float", lambda c, v: knn.neighbour_weights(
        np.ones((1, 2)), np.ones((1, 2)), v), ()))
    T.append(("interpolate", "lam", "float", lambda c, v: knn.interpolate(0.5, 0.5, v), ()))
    T.append(("load_corpus", "limit", "int",
              lambda c, v: corpus.load_corpus(str(c["qa"]), limit=v), (None,)))
    T.append(("load_corpus", "source", "str", lambda c, v: corpus.load_corpus(v), ()))
    T.append(("split_by_document", "heldout_every", "int",
              lambda c, v: corpus.split_by_document(c["ds"], v), ()))
    for p in ("layer", "window", "overlap", "batch_size", "shard_docs"):
        T.append(("build_datastore", p, "int", lambda c, v, p=p: store_call(c, **{p: v}), ()))
    for p in ("model_name", "corpus_name"):
        T.append(("build_datastore", p, "str", lambda c, v, p=p: store_call(c, **{p: v}), ()))
    for p in ("window", "overlap", "batch_size"):
        T.append(("extract_keys", p, "int", lambda c, v, p=p: hidden.extract_keys(
            c["model"], c["tok"], c["texts"][:1], **{p: v}), ()))
    T.append(("build_index", "factory", "str",
              lambda c, v: index.build_index(c["store"], v, use_gpu=False), ()))
    T.append(("build_index", "nprobe", "int",
              lambda c, v: index.build_index(c["store"], nprobe=v, use_gpu=False), ()))
    for p, kind in (("k", "int"), ("temperature", "float"), ("batch_size", "int")):
        T.append(("precompute_knn_targets", p, kind,
                  lambda c, v, p=p: targets_call(c, **{p: v}), ()))
    for p, kind in (("epochs", "int"), ("lr", "float"), ("batch_size", "int"),
                    ("beta", "float"), ("patience", "int"), ("max_steps", "int")):
        T.append(("train_decoder", p, kind, lambda c, v, p=p: train(c, **{p: v}),
                  (None,) if p == "max_steps" else ()))
    for p in ("key_dim", "dim", "n_layers", "n_heads", "window"):
        T.append(("DecoderConfig", p, "int", lambda c, v, p=p: cfg(**{p: v}), ()))
    T.append(("DecoderConfig", "dropout", "float", lambda c, v: cfg(dropout=v), ()))
    for p, kind in (("steps", "int"), ("lr", "float"), ("hidden", "int")):
        T.append(("train_gate", p, kind,
                  lambda c, v, p=p: gate.train_gate([domain()], **{p: v}), ()))
    T.append(("ChatPanel", "context_window", "int",
              lambda c, v: ChatPanel(c["model"], c["tok"], context_window=v), (None,)))
    T.append(("load_offdomain", "limit", "int",
              lambda c, v: offdomain.load_offdomain(limit=v), (None,)))
    T.append(("load_base_model", "name", "str", lambda c, v: load_base_model(v), ()))
    T.append(("artifacts_dir", "tag", "str", lambda c, v: paths.artifacts_dir(v), ("",)))
    T.append(("window_batch", "W", "int", lambda c, v: td.window_batch(
        c["store"].keys, c["store"].doc, [0, 1], v), ()))
    return T


def argument_cases() -> list[Case]:
    cases = []
    for label, param, kind, call, fine in _arg_targets():
        bad = {"int": INT_BAD, "float": FLOAT_BAD, "str": STR_BAD}[kind]
        for value in bad:
            if any(value is f or (value == f and type(value) is type(f)) for f in fine):
                continue
            if label == "build_datastore" and param == "layer" and value == -7:
                value = 99  # -7 does not exist either, but 99 is the plainer mistake
            shown = repr(value) if not isinstance(value, float) or math.isfinite(value) \
                else str(value)
            problem = re.escape(param) if not (label == "artifacts_dir") else "tag"
            cases.append(Case(f"{label}({param}={shown})",
                              lambda c, call=call, value=value: call(c, value), problem,
                              tags=("argument",)))
    return cases


# --- cases: damaged files ------------------------------------------------------------------

def _fresh_store(c) -> Path:
    """A copy of the context's store folder (arrays + manifest) to damage."""
    import shutil
    dst = Path(tempfile.mkdtemp(dir=c["root"])) / "store"
    shutil.copytree(c["store"].path, dst, ignore=shutil.ignore_patterns("targets_*", "index*"))
    return dst


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 3], "empty": b"",
                      "garbage": b"\x93NUMPY garbage \xff" * 7,
                      "json-garbage": b'{"count": 3, "dim"', "json-list": b"[1, 2]",
                      "json-missing": b"{}"}[how])


DAMAGE = ("truncate", "empty", "garbage")
JSON_DAMAGE = ("truncate", "empty", "json-garbage", "json-list", "json-missing")


def file_cases() -> list[Case]:
    from helpers import evaluation, gate as g, index as ix, paths, train_decoder as td
    from helpers.datastore import Datastore, build_datastore
    from helpers.decoder import MemoryDecoder, load_decoder, save_decoder
    from helpers.reuse import finished_run

    cases = []
    for name in ("keys.npy", "values.npy", "doc.npy", "pos.npy"):
        for how in DAMAGE:
            def call(c, name=name, how=how):
                path = _fresh_store(c)
                _damage(path / name, how)
                return Datastore.open(path)
            cases.append(Case(f"Datastore.open({name} {how})", call, re.escape(name),
                              tags=("file",)))
    for how in JSON_DAMAGE:
        def call(c, how=how):
            path = _fresh_store(c)
            _damage(path / "manifest.json", how)
            return Datastore.open(path)
        cases.append(Case(f"Datastore.open(manifest.json {how})", call, "manifest.json",
                          tags=("file",)))

        def rebuild(c, how=how):  # build_datastore over a damaged store rebuilds it
            path = _fresh_store(c)
            _damage(path / "manifest.json", how)
            return build_datastore(c["model"], c["tok"], c["texts"], path, model_name="tiny",
                                   corpus_name="words")
        cases.append(Case(f"build_datastore(over manifest.json {how})", rebuild,
                          check=lambda c, s: len(s) == len(c["store"]) and np.array_equal(
                              s.values, c["store"].values), tags=("file", "recover")))

    def with_index(c):
        path = _fresh_store(c)
        store = Datastore.open(path)
        ix.save_index(ix.build_index(store, use_gpu=False), store)
        return store

    for fname, hows in (("index.faiss", DAMAGE), ("index.json", JSON_DAMAGE)):
        for how in hows:
            def call(c, fname=fname, how=how):
                store = with_index(c)
                _damage(store.path / fname, how)
                return ix.load_index(store, use_gpu=False)
            cases.append(Case(f"load_index({fname} {how})", call, "index",
                              tags=("file",)))

            def recover(c, fname=fname, how=how):
                store = with_index(c)
                _damage(store.path / fname, how)
                return store, ix.load_or_build_index(store, use_gpu=False)
            cases.append(Case(f"load_or_build_index({fname} {how})", recover,
                              check=lambda c, r: r[1].ntotal == len(r[0]),
                              tags=("file", "recover")))

    def other_store_index(c, via):
        a = Datastore.open(_fresh_store(c))
        b = build_datastore(c["model"], c["tok"], list(reversed(c["texts"])),
                            Path(tempfile.mkdtemp(dir=c["root"])) / "b", model_name="tiny",
                            corpus_name="words")
        ix.save_index(ix.build_index(a, use_gpu=False), a)
        for name in ("index.faiss", "index.json"):
            (b.path / name).write_bytes((a.path / name).read_bytes())
        if via == "load":
            return ix.load_index(b, use_gpu=False)
        index = ix.load_or_build_index(b, use_gpu=False)
        return b, index
    cases.append(Case("load_index(index of another store)",
                      lambda c: other_store_index(c, "load"), "another datastore",
                      tags=("file", "mismatch")))
    cases.append(Case("load_or_build_index(index of another store)",
                      lambda c: other_store_index(c, "build"),
                      check=lambda c, r: (r[1].search(np.asarray(r[0].keys[:20]), 1)[1][:, 0]
                                          == np.arange(20)).all(),
                      tags=("file", "mismatch", "recover")))

    def decoder_dir(c):
        folder = Path(tempfile.mkdtemp(dir=c["root"])) / "dec"
        save_decoder(c["decoder"], folder)
        return folder

    def gate_dir(c):
        folder = Path(tempfile.mkdtemp(dir=c["root"])) / "gate"
        g.save_gate(c["gate"], folder)
        return folder

    for what, make, load in (("load_decoder", decoder_dir, lambda f, c: load_decoder(f)),
                             ("from_pretrained", decoder_dir,
                              lambda f, c: MemoryDecoder.from_pretrained(f)),
                             ("load_gate", gate_dir, lambda f, c: g.load_gate(f))):
        for fname, hows in (("model.safetensors", DAMAGE + ("json-garbage",)),
                            ("config.json", JSON_DAMAGE)):
            for how in hows:
                def call(c, make=make, load=load, fname=fname, how=how):
                    folder = make(c)
                    _damage(folder / fname, how)
                    return load(folder, c)
                cases.append(Case(f"{what}({fname} {how})", call, re.escape(fname),
                                  tags=("file",)))
        for fname in ("model.safetensors", "config.json"):
            def call(c, make=make, load=load, fname=fname):
                folder = make(c)
                (folder / fname).unlink()
                return load(folder, c)
            cases.append(Case(f"{what}({fname} missing)", call, "need config.json",
                              tags=("file",)))

    def bad_config_value(c, key, value):
        folder = decoder_dir(c)
        raw = json.loads((folder / "config.json").read_text())
        raw[key] = value
        (folder / "config.json").write_text(json.dumps(raw))
        return load_decoder(folder)
    for key, value in (("dim", "16"), ("head", "nope"), ("n_heads", 3), ("window", 0),
                       ("vocab_ids", [999999])):
        cases.append(Case(f"load_decoder(config {key}={value!r})",
                          lambda c, key=key, value=value: bad_config_value(c, key, value),
                          "config.json", tags=("file",)))

    def missing_tensor(c, loader):
        from safetensors.torch import load_file, save_file
        folder = decoder_dir(c)
        weights = load_file(folder / "model.safetensors")
        weights.pop("inp.weight")
        save_file(weights, folder / "model.safetensors")
        return loader(folder)
    for label, loader in (("load_decoder", load_decoder),
                          ("from_pretrained", MemoryDecoder.from_pretrained)):
        cases.append(Case(f"{label}(a tensor missing)",
                          lambda c, loader=loader: missing_tensor(c, loader), "inp.weight",
                          tags=("file",)))

    def targets(c, fname, how):
        store = Datastore.open(_fresh_store(c))
        index = ix.build_index(store, use_gpu=False)
        good = np.array(td.precompute_knn_targets(store, index, k=4).ids)
        _damage(store.path / "targets_k4_t500" / fname, how)
        return good, td.precompute_knn_targets(store, index, k=4)
    for fname, hows in (("ids.npy", DAMAGE), ("probs.npy", DAMAGE),
                        ("targets.json", JSON_DAMAGE)):
        for how in hows:
            cases.append(Case(f"precompute_knn_targets({fname} {how})",
                              lambda c, f=fname, h=how: targets(c, f, h),
                              check=lambda c, r: np.array_equal(r[0], r[1].ids),
                              tags=("file", "recover")))

    def heldout(c, how):
        ev = evaluation.heldout_eval(c["model"], c["tok"], c["texts"][:2], "tiny",
                                     progress=False)
        (entry,) = [p for p in paths.cache_dir("eval").glob("*.npz")
                    if "tiny" in p.name][:1]
        _damage(entry, how)
        again = evaluation.heldout_eval(c["model"], c["tok"], c["texts"][:2], "tiny",
                                        progress=False)
        return ev, again
    for how in DAMAGE:
        cases.append(Case(f"heldout_eval(cache entry {how})", lambda c, h=how: heldout(c, h),
                          check=lambda c, r: np.array_equal(r[0].p_base, r[1].p_base),
                          tags=("file", "recover")))

    def shard(c, how):
        from helpers import datastore
        path = Path(tempfile.mkdtemp(dir=c["root"])) / "s"
        real = datastore._concatenate
        datastore._concatenate = lambda *a: 1 / 0
        try:
            build_datastore(c["model"], c["tok"], c["texts"][:2], path, model_name="tiny",
                            corpus_name="w", shard_docs=1)
        except ZeroDivisionError:
            pass
        finally:
            datastore._concatenate = real
        _damage(path.with_name("s.partial") / "shard_00000.npz", how)
        return build_datastore(c["model"], c["tok"], c["texts"][:2], path, model_name="tiny",
                               corpus_name="w", shard_docs=1)
    for how in DAMAGE:
        cases.append(Case(f"build_datastore(resume, shard {how})",
                          lambda c, h=how: shard(c, h),
                          check=lambda c, s: set(np.asarray(s.doc)) == {0, 1},
                          tags=("file", "recover")))

    def metrics(c, how):
        path = Path(tempfile.mkdtemp(dir=c["root"])) / "metrics.json"
        path.write_text('{"a": 1}')
        _damage(path, how)
        return paths.update_metrics({"b": 2}, path)
    for how in ("truncate", "json-garbage", "json-list"):
        cases.append(Case(f"update_metrics(metrics.json {how})",
                          lambda c, h=how: metrics(c, h), "metrics.json", tags=("file",)))

    def run_json(c, how):
        from helpers.reuse import finish_run
        folder = Path(tempfile.mkdtemp(dir=c["root"])) / "d"
        finish_run(c["decoder"], folder, {"a": 1})
        _damage(folder / "run.json", how)
        return finished_run(folder, {"a": 1})
    for how in JSON_DAMAGE:
        cases.append(Case(f"finished_run(run.json {how})", lambda c, h=how: run_json(c, h),
                          check=lambda c, r: r is None, tags=("file", "recover")))
    return cases


# --- cases: saves into occupied folders, full disks, read-only folders --------------------

def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def save_cases() -> list[Case]:
    from helpers import gate as g, paths, train_decoder as td
    from helpers.datastore import Datastore, build_datastore
    from helpers.decoder import save_decoder
    from helpers.index import build_index
    from helpers.reuse import finish_run, save_run

    cases = []
    savers = {
        "save_decoder": lambda c, f: save_decoder(c["decoder"], f),
        "save_gate": lambda c, f: g.save_gate(c["gate"], f),
        "finish_run": lambda c, f: finish_run(c["decoder"], f, {"a": 1}),
        "build_datastore": lambda c, f: build_datastore(c["model"], c["tok"], c["texts"][:1],
                                                        f, model_name="t", corpus_name="w"),
    }
    occupants = {"notes.txt": b"my notes", "metrics.csv": b"epoch,loss\n1,2\n",
                 "other_ckpt.safetensors": b"weights", "sub/inner.txt": b"nested"}
    for saver_name, saver in savers.items():
        for occupant, content in occupants.items():
            def setup(c, occupant=occupant, content=content):
                folder = Path(tempfile.mkdtemp(dir=c["root"])) / "target"
                (folder / occupant).parent.mkdir(parents=True, exist_ok=True)
                (folder / occupant).write_bytes(content)
                return folder
            holder = {}

            def call(c, saver=saver, setup=setup, holder=holder):
                holder["folder"] = folder = setup(c)
                holder["before"] = _snapshot(folder)
                return saver(c, folder)
            cases.append(Case(f"{saver_name}(into a folder with {occupant})", call,
                              re.escape(occupant.split("/")[0]),
                              keep=lambda c, holder=holder: holder, tags=("save",)))

    def targets_with_user_file(c):
        store = Datastore.open(_fresh_store(c))
        index = build_index(store, use_gpu=False)
        td.precompute_knn_targets(store, index, k=4)
        folder = store.path / "targets_k4_t500"
        (folder / "targets.json").write_text("{}")  # stale: will be recomputed
        (folder / "my_plot.png").write_bytes(b"png")
        holder_t["folder"], holder_t["before"] = folder, {folder / "my_plot.png": b"png"}
        return td.precompute_knn_targets(store, index, k=4)
    holder_t = {}
    cases.append(Case("precompute_knn_targets(folder with a user file)",
                      targets_with_user_file, "my_plot.png",
                      keep=lambda c: holder_t, tags=("save",)))

    import errno as _errno
    import os
    for err, label in ((_errno.ENOSPC, "disk full"), (_errno.EROFS, "read-only"),
                       (_errno.EACCES, "permission denied")):
        for saver_name in ("save_decoder", "save_gate", "finish_run"):
            holder = {}

            def call(c, err=err, saver=savers[saver_name], holder=holder):
                folder = Path(tempfile.mkdtemp(dir=c["root"])) / "ckpt"
                saver(c, folder)  # a good previous state
                holder["folder"], holder["before"] = folder, _snapshot(folder)
                real = paths._fsync_tree

                def fail(tmp):
                    raise OSError(err, os.strerror(err))
                paths._fsync_tree = fail
                try:
                    return saver(c, folder)
                finally:
                    paths._fsync_tree = real
            cases.append(Case(f"{saver_name}({label} during the save)", call, "could not save",
                              keep=lambda c, holder=holder: holder, tags=("save",)))

        def no_tmp(c, err=err):
            real = tempfile.mkdtemp

            def fail(*a, **k):
                raise OSError(err, os.strerror(err))
            tempfile.mkdtemp = fail
            try:
                return save_decoder(c["decoder"], Path(c["root"]) / "ro" / "ckpt")
            finally:
                tempfile.mkdtemp = real
        cases.append(Case(f"save_decoder({label} data folder)", no_tmp, "could not save",
                          tags=("save",)))

        def no_file(c, err=err):
            real = tempfile.mkstemp

            def fail(*a, **k):
                raise OSError(err, os.strerror(err))
            tempfile.mkstemp = fail
            try:
                return paths.update_metrics({"a": 1}, Path(c["root"]) / "m" / "metrics.json")
            finally:
                tempfile.mkstemp = real
        cases.append(Case(f"update_metrics({label} data folder)", no_file, "could not save",
                          tags=("save",)))

    def read_only_mkdir(c, err, what):
        real = Path.mkdir

        def fail(self, *a, **k):
            raise OSError(err, os.strerror(err))
        Path.mkdir = fail
        try:
            if what == "build_datastore":
                return build_datastore(c["model"], c["tok"], c["texts"][:1],
                                       Path(c["root"]) / "nowhere" / "s", model_name="t",
                                       corpus_name="w")
            return paths.cache_dir("eval", "new")
        finally:
            Path.mkdir = real
    for err, label in ((_errno.EROFS, "read-only"), (_errno.ENOSPC, "disk full")):
        for what in ("build_datastore", "cache_dir"):
            cases.append(Case(f"{what}({label} data folder)",
                              lambda c, e=err, w=what: read_only_mkdir(c, e, w),
                              "could not save", tags=("save",)))

    def save_run_without_checkpoint(c):
        return save_run(Path(tempfile.mkdtemp(dir=c["root"])), {"a": 1})
    cases.append(Case("save_run(folder without a checkpoint)", save_run_without_checkpoint,
                      "no checkpoint", tags=("save",)))
    cases.append(Case("save_decoder(onto a file)", lambda c: save_decoder(
        c["decoder"], _a_file(c)), "is a file", tags=("save",)))
    return cases


def _a_file(c) -> Path:
    path = Path(tempfile.mkdtemp(dir=c["root"])) / "ckpt"
    path.write_text("a file, not a folder")
    return path


# --- cases: mismatched pieces, missing pieces, no network ---------------------------------

def mismatch_cases() -> list[Case]:
    from helpers import gate as g
    from helpers.chat import ChatPanel
    from helpers.corpus import load_corpus
    from helpers.decoder import load_decoder, save_decoder
    from helpers.model import load_base_model
    from helpers.sampling import generate, sample_next

    def dec_folder(c):
        folder = Path(tempfile.mkdtemp(dir=c["root"])) / "dec"
        save_decoder(c["decoder"], folder)
        return folder

    def gen(c, **kw):
        return list(generate(c["model"], c["tok"], "the data", max_new_tokens=2, top_k=5,
                             **kw))

    def other_decoder(c):
        from helpers.decoder import MemoryDecoder
        torch.manual_seed(5)
        return MemoryDecoder(c["decoder"].config).eval()

    def untracked_gate(c):
        rng = np.random.default_rng(0)
        gate, _ = g.train_gate([{"features": rng.standard_normal((10, 7)),
                                 "p_base": rng.random(10), "p_dec": rng.random(10)}], steps=1)
        return gate

    def nan_model(c):
        from conftest import make_model
        m = make_model(len(c["tok"]))
        with torch.no_grad():
            m.model.embed_tokens.weight.fill_(float("nan"))
        return list(generate(m, c["tok"], "the data", max_new_tokens=2, top_k=None,
                             temperature=0))

    def fp16_folder(c):
        folder = Path(tempfile.mkdtemp(dir=c["root"])) / "m"
        with torch.no_grad():
            saved = c["model"].model.embed_tokens.weight.clone()
            c["model"].model.embed_tokens.weight.fill_(6e4)
            c["model"].save_pretrained(folder)
            c["model"].model.embed_tokens.weight.copy_(saved)
        c["tok"].save_pretrained(folder)
        return load_base_model(str(folder), device="cpu", dtype=torch.float16)

    def stopped_compare(c):
        import threading
        panel = ChatPanel(c["model"], c["tok"], decoder=c["decoder"], mode="memdec",
                          top_k=5, max_new_tokens=40)
        panel.compare.value = True
        hook_calls = []

        def slow(module, args, out):  # stop while the α = 0 answer is being written
            hook_calls.append(1)
            if len(hook_calls) == 45:
                panel._stop.set()
            out[..., c["tok"].eos_token_id] -= 100.0
        handle = c["model"].lm_head.register_forward_hook(slow)
        try:
            panel.send("What is personal data?")
            panel.wait(60)
        finally:
            handle.remove()
        return panel

    cases = [
        Case("load_decoder(vocab_size of another model)",
             lambda c: load_decoder(dec_folder(c), vocab_size=99), "base_vocab_size"),
        Case("load_decoder(another store's layer)", lambda c: load_decoder(
            dec_folder(c), base_model_name="google/gemma-2b"), "base_model_name"),
        Case("load_gate(another decoder)", lambda c: g.check_gate(c["gate"], other_decoder(c)),
             "decoder"),
        Case("check_gate(gate trained without decoder=)",
             lambda c: g.check_gate(untracked_gate(c), c["decoder"]), "does not record"),
        Case("generate(memdec without a decoder)", lambda c: gen(c, mode="memdec"), "decoder"),
        Case("generate(knn without a store)", lambda c: gen(c, mode="knn"), "store"),
        Case("generate(adaptive without a gate)", lambda c: gen(
            c, mode="memdec", decoder=c["decoder"], adaptive=True), "gate"),
        Case("generate(adaptive, gate of another decoder)", lambda c: gen(
            c, mode="memdec", decoder=other_decoder(c), adaptive=True, gate=c["gate"]),
             "decoder"),
        Case("generate(decoder in training mode)", lambda c: gen(
            c, mode="memdec", decoder=other_decoder(c).train()), "training mode"),
        Case("generate(mode='kNN')", lambda c: gen(c, mode="kNN"), "mode"),
        Case("generate(blend='prob')", lambda c: gen(c, blend="prob"), "blend"),
        Case("generate(prompt of spaces)", lambda c: gen_prompt(c, "   "), "empty"),
        Case("generate(prompt longer than the context, truncate_left=False)",
             lambda c: list(generate(c["model"], c["tok"], "the " * 600, max_new_tokens=2,
                                     truncate_left=False, top_k=5)), "prompt"),
        Case("generate(max_new_tokens=600 > context)", lambda c: gen_n(c, 600),
             "max_new_tokens"),
        Case("generate(top_k=100 > vocabulary)", lambda c: list(generate(
            c["model"], c["tok"], "the data", max_new_tokens=1, top_k=100)), "top_k"),
        Case("generate(NaN logits)", nan_model, "NaN"),
        Case("sample_next(NaN distribution)",
             lambda c: sample_next(torch.full((5,), float("nan")), 0.7), "NaN"),
        Case("sample_next(all -inf)",
             lambda c: sample_next(torch.full((5,), float("-inf")), 0.0), "probability 0"),
        Case("load_base_model(float16 giving NaN on CPU)", fp16_folder, "NaN"),
        Case("load_base_model(dtype='float16')", lambda c: load_base_model(
            "gemma-3-270m", dtype="float16"), "dtype"),
        Case("load_base_model(device='gpu')", lambda c: load_base_model(
            str(Path(c["root"])), device="gpu"), "device"),
        Case("load_base_model(device='cuda' without GPU)", lambda c: load_base_model(
            str(Path(c["root"])), device="cuda"), "cuda"),
        Case("load_base_model(a folder without a model)", lambda c: load_base_model(
            tempfile.mkdtemp(dir=c["root"]), device="cpu"), "Could not load"),
        Case("load_corpus(missing file)", lambda c: load_corpus("/nonexistent/qa.json"),
             "No such file"),
        Case("load_corpus(broken JSON)", lambda c: load_corpus(str(_bad_json(c))), "qa.json"),
        Case("load_corpus(JSON without Answer)", lambda c: load_corpus(str(_no_answer(c))),
             "Answer"),
        Case("ChatPanel(context_window=0)", lambda c: ChatPanel(c["model"], c["tok"],
                                                                context_window=0),
             "context_window"),
        Case("ChatPanel(context_window > model's)", lambda c: ChatPanel(
            c["model"], c["tok"], context_window=10_000), "context_window"),
        Case("ChatPanel(stop during the α = 0 answer)", stopped_compare,
             check=lambda c, p: ("Stopped by you" in p.status.value
                                 and "Done" not in p.status.value.split(":")[0]
                                 and p.history[-1][1] != (p._turns[-1].base_answer or "")
                                 .strip())),
    ]
    for case in cases:
        case.tags = ("mismatch",)
    return cases


def gen_prompt(c, prompt):
    from helpers.sampling import generate
    return list(generate(c["model"], c["tok"], prompt, max_new_tokens=1, top_k=5))


def gen_n(c, n):
    from helpers.sampling import generate
    return list(generate(c["model"], c["tok"], "the data", max_new_tokens=n, top_k=5))


def _bad_json(c) -> Path:
    path = Path(tempfile.mkdtemp(dir=c["root"])) / "qa.json"
    path.write_text('[{"Title": "a", "Question": "b", "Answer": ')
    return path


def _no_answer(c) -> Path:
    path = Path(tempfile.mkdtemp(dir=c["root"])) / "qa.json"
    path.write_text(json.dumps([{"Title": "a", "Question": "b"}]))
    return path


def hub_cases() -> list[Case]:
    """Hub names with the network cut (every connection refused at once)."""
    from helpers.corpus import load_corpus
    from helpers.decoder import MemoryDecoder
    from helpers.model import load_base_model
    cases = [Case("load_base_model(unknown Hub name, offline)",
                  lambda c: load_base_model("no-such-org/no-such-model"), "unreachable"),
             Case("load_base_model(google/gemma-2b, offline)",
                  lambda c: load_base_model("google/gemma-2b"), "unreachable"),
             Case("load_corpus(Hub id, offline)",
                  lambda c: load_corpus("ibunescu/qa_legal_dataset_train"), "unreachable"),
             Case("MemoryDecoder.from_pretrained(Hub id, offline)",
                  lambda c: MemoryDecoder.from_pretrained("someone/memdec"), "unreachable")]
    for case in cases:
        case.tags = ("offline",)
    return cases


def all_cases() -> list[Case]:
    return (argument_cases() + file_cases() + save_cases() + mismatch_cases() + hub_cases())


# --- running a case ------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    kind: str        # "clear", "unclear", "silent", "recovered", "lost", "hang"
    seconds: float
    message: str = ""


class _Hang(Exception):
    pass


def offline():
    """Cut the network for the Hub cases: every connection is refused at once."""
    import socket
    from contextlib import ExitStack
    from unittest import mock

    from helpers import model
    stack = ExitStack()

    def refuse(*a, **k):
        raise OSError("Network is unreachable")
    stack.enter_context(mock.patch.object(model, "_HUB_REACHABLE", {}))
    stack.enter_context(mock.patch.object(socket, "create_connection", refuse))
    stack.enter_context(mock.patch.object(socket.socket, "connect", refuse))
    return stack


def run_case(case: Case, ctx: dict) -> Outcome:
    import warnings

    def alarm(*_):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    tic, result, error = time.perf_counter(), None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "offline" in case.tags:
                with offline():
                    result = case.call(ctx)
            else:
                result = case.call(ctx)
    except _Hang:
        return Outcome(case, "hang", time.perf_counter() - tic)
    except Exception as err:  # noqa: BLE001 -- classifying every error is the point
        error = err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - tic
    if case.keep is not None:
        held = case.keep(ctx)
        if held and held.get("before") and any(
                not p.exists() or p.read_bytes() != b for p, b in held["before"].items()):
            return Outcome(case, "lost", seconds, str(error or ""))
    if error is None:
        ok = case.check is not None and bool(case.check(ctx, result))
        return Outcome(case, "recovered" if ok else "silent", seconds)
    message = f"{type(error).__name__}: {error}"
    if case.check is not None:  # it had to succeed
        return Outcome(case, "unclear", seconds, message)
    named = bool(re.search(case.problem, str(error), re.I | re.S))
    advised = bool(ADVICE.search(str(error)))
    return Outcome(case, "clear" if named and advised else "unclear", seconds, message)
