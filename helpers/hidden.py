"""Batched hidden-state extraction: the keys of the datastore.

Explained in ``notebooks/01_hidden_states.ipynb``.

For every token position ``t`` of a text the base model's hidden state
``h_t`` is the vector that predicts token ``t+1``.  kNN-LM stores the pair
``(h_t, token_{t+1})``.  We only run the model's *body*: the LM head (a
262,144-wide matmul for Gemma) is never computed, because keys do not need it.

Long texts are cut into overlapping windows so that every token is a target
exactly once, and each target still sees ``overlap`` tokens of left context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from .validate import ArgumentTypeError, check_int

from .fastpath import fast_forward


def plan_windows(n_tokens: int, window: int, overlap: int,
                 prepend_bos: bool) -> list[tuple[int, int, int]]:
    """Cover targets ``1..n_tokens-1`` of a token sequence exactly once.

    Returns ``(start, end, first_target)`` triples: the model reads tokens
    ``[start, end)`` (plus a BOS token in front when ``prepend_bos`` and
    ``start > 0``) and the keys for targets ``first_target..end-1`` are kept.
    Every window after the first repeats ``overlap`` tokens as context.
    """
    extra = 1 if prepend_bos else 0
    if window < 2 + extra or not 0 <= overlap < window - 1 - extra:
        raise ValueError(f"Need window >= {2 + extra} and 0 <= overlap < window - "
                         f"{1 + extra}; got window={window}, overlap={overlap}. Pass e.g. "
                         "window=256, overlap=64.")
    plans, end = [], min(n_tokens, window)
    plans.append((0, end, 1))
    while end < n_tokens:
        first = end
        start = first - overlap
        end = min(n_tokens, start + window - extra)
        plans.append((start, end, first))
    return plans


@dataclass
class Extraction:
    """Keys and values for every target token of a list of texts.

    Row ``i`` says: in text ``doc[i]``, the hidden state at position
    ``pos[i]`` (``keys[i]``) is followed by token ``values[i]``.
    """
    keys: np.ndarray          # (N, D) float32
    values: np.ndarray        # (N,) int64: the next token id
    doc: np.ndarray           # (N,) int32: index of the text
    pos: np.ndarray           # (N,) int32: position of the key in the text
    token_ids: list = field(repr=False)  # per text: all its token ids
    seconds: float = 0.0      # wall time of the forward passes
    tokens_processed: int = 0  # tokens fed to the model (incl. overlap, no pad)
    tokens_computed: int = 0   # positions the model ran: batches x their width (pad incl.)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_processed / max(self.seconds, 1e-9)


def body(model):
    """The model without its LM head (``model.model`` for Gemma)."""
    return getattr(model, "base_model", model)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, with the tokenizer's BOS token if it uses one."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text #{i} is empty. Drop empty records before "
                             "extracting (load_corpus already does).")
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


@torch.inference_mode()
def hidden_states_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     layer: int = -1, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Hidden states ``(B, T, D)`` after ``layer`` decoder layers.

    ``layer=-1`` is the final, normalised state that the LM head reads;
    ``layer=0`` is the token embeddings; ``1..L`` are block outputs.
    ``autocast`` (e.g. ``torch.bfloat16``) runs the matmuls in that dtype
    while the residual stream and the norms stay in the model's float32.
    """
    with torch.autocast(input_ids.device.type, dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):
        out = body(model)(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=layer != -1, use_cache=False)
    return out.last_hidden_state if layer == -1 else out.hidden_states[layer]


def extract_keys(model, tokenizer, texts: list[str], layer: int = -1,
                 window: int = 256, overlap: int = 64, batch_size: int = 8,
                 sort_by_length: bool = True, progress: bool = False,
                 autocast: torch.dtype | None = None, fast: bool = True) -> Extraction:
    """Run the body over ``texts`` and return one key per target token.

    Windows are sorted by length (longest first) so batches carry little
    padding.  Keys come back as float32 whatever the model's dtype.  For bf16
    matmuls keep the model in float32 and pass ``autocast=torch.bfloat16``:
    the residual stream stays in float32, so the keys stay closer to the fp32
    ones than those of a model loaded with ``dtype=torch.bfloat16``
    (``benchmarks/bench_extraction.py`` measures both).  It only pays on
    hardware with native bf16 (a GPU, a CPU with AVX-512-bf16 or AMX).

    The forward pass computes the same function as the model's own, with
    less work (``helpers/fastpath.py``): freed activations stay in the
    process, a tanh-GELU runs through a sigmoid, and causal attention skips
    the scores its mask would discard.  Rows are padded on the right of a
    causal model, so no real token ever attends to a pad and the padding mask
    cannot change a key we keep: it is left out, which lets padded batches
    take the causal path too.  A model whose config asks for bidirectional
    attention keeps its mask.  ``fast=False`` runs the model's own forward
    pass with the mask instead (the benchmark's "no fast path" row).
    """
    if isinstance(texts, (str, bytes)):
        raise ArgumentTypeError("texts must be a list of strings, not a single string; "
                                "wrap it: [text].")
    layer = check_int("layer", layer, example=-1)
    window = check_int("window", window, example=256)
    overlap = check_int("overlap", overlap, example=64)
    batch_size = check_int("batch_size", batch_size, 1, example=8)
    n_layers = model.config.get_text_config().num_hidden_layers
    if layer != -1 and not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer={layer} does not exist: the model has {n_layers} layers, so "
                         f"pass -1 (the final, normalised state) or 0..{n_layers} (0 = the "
                         "embeddings).")
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    ids = tokenize(tokenizer, texts)
    prepend = bos is not None and all(x and x[0] == bos for x in ids)
    jobs = []  # (doc, start, end, first_target)
    for d, seq in enumerate(ids):
        jobs += [(d, *p) for p in plan_windows(len(seq), window, overlap, prepend)]
    if sort_by_length:
        jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
    dim = model.config.get_text_config().hidden_size
    n_targets = sum(len(s) - 1 for s in ids)
    keys = np.empty((n_targets, dim), np.float32)
    offsets = np.cumsum([0] + [len(s) - 1 for s in ids])  # row of (doc, target 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="extracting", unit="batch")
    drop_mask = fast and not getattr(model.config.get_text_config(),
                                     "use_bidirectional_attention", False)
    seconds, processed, computed = 0.0, 0, 0
    with fast_forward(model, enabled=fast):
        for batch in batches:
            rows = [([bos] if prepend and s > 0 else []) + ids[d][s:e] for d, s, e, _ in batch]
            width = max(map(len, rows))
            inp = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                inp[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            tic = time.perf_counter()
            h = hidden_states_at(model, inp.to(device), None if drop_mask else mask.to(device),
                                 layer, autocast)
            h = h.float().cpu().numpy()
            seconds += time.perf_counter() - tic
            processed += int(mask.sum())
            computed += inp.numel()
            for r, (d, s, e, first) in enumerate(batch):
                shift = 1 if prepend and s > 0 else 0
                # the key for target t sits at input index (t - 1 - s) + shift
                lo, hi = first - 1 - s + shift, e - 1 - s + shift
                keys[offsets[d] + first - 1: offsets[d] + e - 1] = h[r, lo:hi]
    values = np.concatenate([np.asarray(s[1:], np.int64) for s in ids])
    doc = np.concatenate([np.full(len(s) - 1, d, np.int32) for d, s in enumerate(ids)])
    pos = np.concatenate([np.arange(len(s) - 1, dtype=np.int32) for s in ids])
    return Extraction(keys, values, doc, pos, ids, seconds, processed, computed)


@torch.inference_mode()
def keys_by_layer(model, tokenizer, texts: list[str], max_tokens: int = 256,
                  batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every layer's hidden states for the first ``max_tokens`` of each text.

    Returns ``keys (L+2, N, D)`` -- index 0 is the embeddings, ``1..L`` the
    raw output of each block, and ``L+1`` (``-1``) the final normalised state
    the head reads -- plus ``values (N,)`` (next token ids) and ``doc (N,)``.
    Used in notebook 01 to ask which layer makes the best datastore key.

    transformers' ``hidden_states`` ends with the *normalised* state, not the
    last block's raw output, so that one is caught with a forward hook.
    """
    device = next(model.parameters()).device
    ids = [x[:max_tokens] for x in tokenize(tokenizer, texts)]
    per_layer, values, docs = [], [], []
    model_body = body(model)
    caught = {}
    def catch(module, args, output):  # the last block's raw output (B, T, D)
        caught["last"] = output[0] if isinstance(output, tuple) else output
    hook = model_body.layers[-1].register_forward_hook(catch)
    try:
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
            out = model_body(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             output_hidden_states=True, use_cache=False)
            # hidden_states: embeddings, blocks 1..L-1, then norm(block L)
            states = torch.stack(list(out.hidden_states[:-1])
                                 + [caught.pop("last"), out.last_hidden_state])
            for r, row in enumerate(chunk):
                per_layer.append(states[:, r, :len(row) - 1].float().cpu().numpy())
                values.append(np.asarray(row[1:], np.int64))
                docs.append(np.full(len(row) - 1, i + r, np.int32))
    finally:
        hook.remove()
    return (np.concatenate(per_layer, axis=1), np.concatenate(values),
            np.concatenate(docs))
