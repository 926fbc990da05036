"""Blended sampling: base model + memory, one token at a time, streamed.

Explained in ``notebooks/04_blended_sampling.ipynb``.

At every step the base model gives ``log p_base`` and a memory gives
``log p_mem`` -- the Memory Decoder (mode ``"memdec"``) or the kNN search of
notebook 02 (mode ``"knn"``).  Mode ``"memdec"`` takes either decoder: the
hidden-state one of notebook 03 (it reads the base model's last ``W`` hidden
states) or the token-level one of ``helpers.token_decoder`` (it reads the token
ids, with its own KV cache, and so serves any model with the same tokenizer).
They are mixed in one of two ways::

    blend="probs":  p      = (1 - alpha) * p_base + alpha * p_mem   (kNN-LM)
    blend="logits": logits = (1 - alpha) * logits_base + alpha * log p_mem
                    (the original tutorial; a geometric mixture)

``generate`` runs ONE forward of the base model per new token: the KV cache
keeps the prefix, and ``output_hidden_states=True`` gives the memory's query
(the final hidden state) from the same pass.  It yields a ``Step`` as soon as
each token exists, so a chat panel can show text while it is being written.
``original_style_step`` is the slow reference the benchmark compares against.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .knn import knn_distribution, lookup_values, search
from .model import cache_argument, returned_cache
from .token_decoder import TokenMemoryDecoder, cache_length
from .validate import check_float, check_int, check_str

MODES = ("base", "knn", "memdec")
BLENDS = ("logits", "probs")
LOG_FLOOR = -30.0  # blend="logits": log p_mem = -inf (p = 0) is clipped here
NOTEBOOK_03 = "notebooks/03_train_memory_decoder.ipynb"


def _check_alpha(alpha) -> float:
    alpha = check_float("alpha", alpha, example=0.5)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 (base model only) and 1 (memory only); "
                         f"got {alpha}. Move the slider back into [0, 1].")
    return alpha


def blend_logits(base_logits: torch.Tensor, memory_logp, alpha: float,
                 mode: str = "logits", base_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities ``(..., V)`` of the base model mixed with a memory.

    ``base_logits`` are the model's logits, ``memory_logp`` the memory's
    log-probabilities: dense ``(..., V)`` (``-inf`` allowed for p = 0), or
    sparse ``(ids (K,), logp (..., K))`` for a memory that gives mass to the
    tokens ``ids`` only (the kNN neighbours' tokens, a decoder head over the
    datastore's vocabulary) -- the same blend, without ``V``-wide work on
    the memory's side.  ``alpha=0`` returns the base model's and ``alpha=1``
    the memory's distribution exactly.  ``base_logp``: the base model's
    log-probabilities ``log_softmax(base_logits)`` if the caller has them
    already (the generation loop does), so they are not computed twice; at
    ``alpha=0`` that tensor itself is returned.
    """
    alpha = _check_alpha(alpha)
    if base_logp is not None and (not isinstance(base_logp, torch.Tensor)
                                  or base_logp.shape != base_logits.shape):
        raise ValueError(f"base_logp must be the tensor log_softmax(base_logits) of shape "
                         f"{tuple(base_logits.shape)}; got "
                         f"{getattr(base_logp, 'shape', type(base_logp).__name__)}. Leave it "
                         "out to have it computed here.")
    if mode not in BLENDS:
        raise ValueError(f"mode must be 'logits' (geometric mixture, the original "
                         f"tutorial) or 'probs' (kNN-LM mixture); got {mode!r}.")
    base = (torch.log_softmax(base_logits.float(), dim=-1) if base_logp is None
            else base_logp.float().to(base_logits.device))       # (..., V)
    if alpha == 0.0:
        return base
    if isinstance(memory_logp, tuple):
        return _blend_sparse(base_logits.float(), base, *memory_logp, alpha, mode)
    memory = memory_logp.float().to(base.device)                 # (..., V)
    if alpha == 1.0:
        return torch.log_softmax(memory, dim=-1)
    if mode == "logits":  # clip -inf so that alpha * log p_mem stays finite
        mixed = (1 - alpha) * base_logits.float() + alpha * memory.clamp(min=LOG_FLOOR)
        return torch.log_softmax(mixed, dim=-1)
    # log((1-a) p_base + a p_mem) without ever forming log(0) of a sum
    return torch.logaddexp(base + np.log1p(-alpha), memory + np.log(alpha))


def _blend_sparse(logits, base, ids, logp, alpha: float, mode: str) -> torch.Tensor:
    """``blend_logits`` for a memory with mass on ``ids (K,)`` only: V-wide work once."""
    ids, logp = ids.to(base.device), logp.float().to(base.device)    # (K,), (..., K)
    if alpha == 1.0:  # the memory's distribution: p = 0 off its tokens
        out = base.new_full(base.shape, float("-inf"))
        out[..., ids] = torch.log_softmax(logp, dim=-1)
        return out
    if mode == "logits":  # off its tokens log p_mem = -inf, clipped to LOG_FLOOR
        mixed = (1 - alpha) * logits + alpha * LOG_FLOOR           # (..., V)
        mixed[..., ids] += alpha * (logp.clamp(min=LOG_FLOOR) - LOG_FLOOR)
        return torch.log_softmax(mixed, dim=-1)
    out = base + np.log1p(-alpha)                                    # (..., V)
    out[..., ids] = torch.logaddexp(out[..., ids], logp + np.log(alpha))
    return out


def _check_sampling(temperature, top_k, vocab_size: int | None = None) -> None:
    temperature = check_float("temperature", temperature, example=0.7)
    if top_k is not None:
        check_int("top_k", top_k, example=50)
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy, 1 = the distribution as "
                         f"is, higher = more random); got {temperature}. Pass e.g. "
                         "temperature=0.7.")
    if top_k is None:
        return
    if top_k < 0 or int(top_k) != top_k:
        raise ValueError(f"top_k must be a whole number >= 1, or 0 / None for the whole "
                         f"vocabulary; got {top_k}. Pass e.g. top_k=50.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"top_k={top_k} is larger than the vocabulary ({vocab_size} "
                         f"tokens); use 1 <= top_k <= {vocab_size}, or 0 / None for all.")


def sampling_distribution(logp: torch.Tensor, temperature: float,
                          top_k: int | None = None) -> torch.Tensor:
    """What ``sample_next`` draws from: ``softmax(logp / T)`` over the ``top_k`` best.

    Probabilities ``(..., V)``; tokens outside the top k get 0 (ties with the
    k-th are kept).  ``temperature`` must be > 0.  Exercise 2 of notebook 04.
    """
    scaled = logp.float() / temperature                          # (..., V)
    if top_k:
        kth = scaled.topk(int(top_k), dim=-1).values[..., -1:]   # (..., 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.softmax(scaled, dim=-1)


def sample_next(logp: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``()`` or ``(B,)`` drawn from ``logp (V,)`` or ``(B, V)``.

    ``temperature=0`` or ``top_k=1`` is greedy; otherwise the ``top_k`` most
    likely tokens (``None`` / 0: all) are sampled from ``softmax(logp / T)``.
    """
    _check_sampling(temperature, top_k, logp.shape[-1])
    if torch.isnan(logp).any() or not (logp > float("-inf")).any(dim=-1).all():
        raise FloatingPointError(
            "the next-token distribution is NaN (or gives every token probability 0): "
            "the model's numbers overflowed. Load the base model with dtype=torch.float32 "
            "(float16 overflows on a CPU) and check the memory's weights.")
    if temperature == 0 or top_k == 1:
        return logp.argmax(dim=-1)
    probs = sampling_distribution(logp, temperature, top_k).reshape(-1, logp.shape[-1])
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    ids = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
    return ids.to(logp.device).reshape(logp.shape[:-1])


@dataclass
class Step:
    """One generated token and what produced it."""
    index: int                  # 0 for the first new token
    token_id: int
    text: str                   # the text it adds ("" while a character is incomplete)
    logprob: float              # log p(token) under the blended distribution
    base_logprob: float         # log p_base(token)
    memory_top_id: int | None   # the memory's most likely token (None in mode "base")
    alpha: float                # weight of the memory (alpha_t when adaptive; 0.0 in "base")
    doc_ids: list[int] | None = None  # mode "knn": store doc of each neighbour
    truncated: int = 0          # prompt tokens cut from the left (first step only)
    finished: str | None = None  # "eos" or "max_new_tokens" on the last step
    key: torch.Tensor | None = field(default=None, repr=False)  # (D,) query state


class _Detokenizer:
    """New text per token: decode the whole continuation, emit the new suffix."""

    def __init__(self, tokenizer, context_ids: list[int]):
        self.tokenizer, self.context = tokenizer, list(context_ids[-4:])
        self.ids, self.emitted = [], ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        # decoding after a little prompt context keeps a word's leading space
        head, full = self._decode(self.context), self._decode(self.context + self.ids)
        text = full[len(head):] if full.startswith(head) else self._decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # half a multi-byte character: wait for the rest
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def _eos_ids(model, tokenizer) -> set[int]:
    """Every end token the tokenizer, config or generation config names."""
    found = [tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None),
             getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    flat = [j for i in found for j in (i if isinstance(i, (list, tuple)) else [i])]
    return {int(i) for i in flat if i is not None}


def _check_token_decoder(model, tokenizer, decoder) -> None:
    """A token-level memory fits any model whose tokenizer it was trained with."""
    from .model import tokenizer_fingerprint
    from .token_decoder import check_tokenizer
    check_tokenizer(decoder.config, tokenizer_fingerprint(tokenizer), "this tokenizer",
                    vocab_size=model.get_output_embeddings().weight.shape[0])


def _check_memory(model, tokenizer, mode, decoder, store, index, k, knn_temperature, hidden):
    if mode == "memdec":
        if decoder is None:
            raise ValueError("mode='memdec' needs decoder=...: load one with "
                             f"load_decoder(folder) (trained in {NOTEBOOK_03}) or "
                             "load_token_decoder(folder) (helpers.token_decoder).")
        if decoder.training:
            raise ValueError("the decoder is in training mode (dropout on); call "
                             "decoder.eval() before generating.")
        if isinstance(decoder, TokenMemoryDecoder):
            return _check_token_decoder(model, tokenizer, decoder)
        c, vocab = decoder.config, model.get_output_embeddings().weight.shape[0]
        if c.base_vocab_size != vocab or c.key_dim != hidden:
            raise ValueError(f"the decoder expects a base model with {c.base_vocab_size} "
                             f"tokens and hidden size {c.key_dim}; this one has {vocab} "
                             f"and {hidden}. Train a decoder for this model in "
                             f"{NOTEBOOK_03}.")
        if c.head == "tied" and decoder.output_embedding is None:
            raise ValueError("this head='tied' decoder needs decoder.attach_output_"
                             "embedding(model.get_output_embeddings().weight) first.")
    if mode == "knn":
        if store is None or index is None:
            raise ValueError("mode='knn' needs store=Datastore.open(path) and "
                             "index=load_or_build_index(store): pass both (notebook 02 "
                             "builds them).")
        if store.dim != hidden or index.d != hidden or index.ntotal != len(store):
            raise ValueError(f"store (dim {store.dim}, {len(store)} keys) and index "
                             f"(dim {index.d}, {index.ntotal} keys) must match the model's "
                             f"hidden size {hidden}; rebuild them for this model.")
        if not 1 <= k <= len(store) or not knn_temperature > 0:
            raise ValueError(f"need 1 <= k <= {len(store)} (the store's size) and "
                             f"knn_temperature > 0; got k={k}, "
                             f"knn_temperature={knn_temperature}. Pass values in those "
                             "ranges, e.g. k=32, knn_temperature=300.0.")


def generate(model, tokenizer, prompt: str, *, mode: str = "base", alpha: float = 0.5,
             blend: str = "probs", temperature: float = 0.7, top_k: int | None = 50,
             max_new_tokens: int = 64, seed: int = 0, decoder=None, store=None,
             index=None, k: int = 32, knn_temperature: float = 300.0, stop_event=None,
             truncate_left: bool = True, gate=None, adaptive: bool = False,
             no_repeat_ngram: int = 0):
    """Yield one ``Step`` per new token, as soon as it is produced.

    Arguments are checked here, before the first token; iterate the result
    (``for step in generate(...)``) to run the model.  ``stop_event`` (a
    ``threading.Event``) stops it between two tokens.  ``adaptive=True``
    (mode ``"memdec"``) lets a trained ``gate`` (``helpers.gate``) set the
    memory's weight per token: ``alpha_t = alpha * gate(...)``, reported in
    ``Step.alpha``.  ``no_repeat_ngram=n`` (0 = off) never writes the same
    ``n`` tokens twice in one answer (``banned_tokens``), in every mode alike.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}. Pass one of those "
                         "(lower case).")
    if blend not in BLENDS:
        raise ValueError(f"blend must be 'probs' (kNN-LM mixture) or 'logits' (the "
                         f"original tutorial's); got {blend!r}. Pass one of those.")
    alpha = _check_alpha(alpha)
    _check_sampling(temperature, top_k, model.get_output_embeddings().weight.shape[0])
    config = model.config.get_text_config()
    if mode == "knn":
        k = check_int("k", k, 1, example=32)
        knn_temperature = check_float("knn_temperature", knn_temperature, example=300.0)
    _check_memory(model, tokenizer, mode, decoder, store, index, k, knn_temperature,
                  config.hidden_size)
    if adaptive:
        _check_adaptive(mode, gate, decoder)
    else:
        gate = None
    if not isinstance(prompt, str):
        check_str("prompt", prompt, "What is personal data?")
    if not prompt.strip():
        raise ValueError("The prompt is empty: type something for the model to continue.")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, example=64)
    check_int("seed", seed, 0, example=0)
    no_repeat_ngram = check_int("no_repeat_ngram", no_repeat_ngram, 0, example=4)
    limit = config.max_position_embeddings - max_new_tokens  # room left for the prompt
    if max_new_tokens < 1 or limit < 2:
        raise ValueError(f"max_new_tokens must be >= 1 and leave room for a prompt in the "
                         f"model's {config.max_position_embeddings}-token context; got "
                         f"{max_new_tokens}. Pass a value from 1 to "
                         f"{config.max_position_embeddings - 2}.")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    cut = max(0, len(ids) - limit)
    if cut and not truncate_left:
        raise ValueError(f"The prompt has {len(ids)} tokens but only {limit} fit before "
                         f"the {max_new_tokens} new ones; cut {cut} tokens (or pass "
                         "truncate_left=True).")
    if cut:  # keep BOS, drop the oldest tokens after it
        keep = 1 if ids[0] == tokenizer.bos_token_id else 0
        ids = ids[:keep] + ids[keep + cut:]
    if mode == "base":
        memory, layer, W, alpha = None, -1, 1, 0.0
    elif mode == "memdec" and isinstance(decoder, TokenMemoryDecoder):
        memory, layer, W = _token_memory(decoder), -1, 1
    elif mode == "memdec":
        def memory(x, pad, new_ids):  # (1, W, D), (1, W) -> (log p_dec, no provenance)
            if decoder.config.head == "store":  # sparse: (head's token ids, (1, V_s))
                return (decoder.vocab, torch.log_softmax(decoder(x, pad).float(), -1)), None
            return decoder.log_probs_full(x, pad), None                 # dense (1, V)
        W, layer = decoder.config.window, decoder.config.layer
        layer = -1 if layer is None else layer
    else:
        memory, W = _knn_memory(store, index, k, knn_temperature), 1
        layer = store.manifest.get("layer", -1)
    return _steps(model, tokenizer, ids, memory=memory, layer=layer, W=W, alpha=alpha,
                  blend=blend, temperature=temperature, top_k=top_k,
                  max_new_tokens=max_new_tokens, seed=seed, stop_event=stop_event,
                  cut=cut, gate=gate, no_repeat_ngram=no_repeat_ngram)


def banned_tokens(ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an ``n``-gram already in ``ids`` (the answer so far).

    The next token may not complete an ``n``-gram that occurred before:
    transformers' ``no_repeat_ngram_size``, over the new tokens only (a title
    word may be recited).  ``n = 0`` bans nothing.
    """
    if n < 1 or len(ids) < n:
        return []
    head = tuple(ids[len(ids) - n + 1:])  # the last n - 1 tokens
    return sorted({ids[i + n - 1] for i in range(len(ids) - n + 1)
                   if tuple(ids[i:i + n - 1]) == head})


def _check_adaptive(mode, gate, decoder) -> None:
    from .gate import check_gate, gate_notebook
    from .token_decoder import GATE_FOLDERS
    if mode != "memdec":
        raise ValueError(f"adaptive α is trained on the Memory Decoder's signals; use "
                         f"mode='memdec' with adaptive=True (mode {mode!r} takes a fixed "
                         "alpha).")
    if gate is None:
        folder = GATE_FOLDERS["token" if isinstance(decoder, TokenMemoryDecoder) else "hidden"]
        raise ValueError("adaptive=True needs gate=load_gate(folder): no α gate is trained "
                         f"yet. Train one in {gate_notebook(decoder)}; it is saved to "
                         f"{folder}/ in that size's artifacts folder (data/artifacts/ at the "
                         "full size, data/artifacts/quick/ at the quick one).")
    check_gate(gate, decoder)


def _token_memory(decoder: TokenMemoryDecoder):
    """``memory(x, pad, new_ids (1, n)) -> ((token ids, log p_dec (1, V_s)), None)``.

    The token decoder keeps its own KV cache over the ids it has read.  It reads
    at most ``context`` positions: a prompt longer than that is read from its
    last ``context`` tokens, and when the cache is full it starts again on the
    last ``context // 2`` tokens (one forward over those, then one token per
    step again), like a later training chunk that starts inside a text.
    """
    ctx = decoder.config.context
    state = {"ids": [], "cache": None}
    device = decoder.vocab.device

    def memory(x, pad, new_ids):
        new = [int(i) for i in new_ids[0]]
        state["ids"].extend(new)
        cache = state["cache"]
        read = cache_length(cache)                            # positions in the cache
        if cache is None or read + len(new) > ctx:
            keep = state["ids"][-(ctx if cache is None else ctx // 2):]
            logits, state["cache"] = decoder.step(torch.tensor([keep], device=device))
        else:
            logits, state["cache"] = decoder.step(torch.tensor([new], device=device), cache)
        return (decoder.vocab, torch.log_softmax(logits.float(), -1)), None   # (1, V_s)
    return memory


def _knn_memory(store, index, k: int, temperature: float):
    """``memory(x (1, 1, D), pad, new_ids) -> ((token ids, log p_kNN (1, n)), store doc of each
    neighbour)``: p_kNN is sparse, at most ``k`` tokens have mass."""
    def memory(x, pad, new_ids):
        query = x[0, -1].float().cpu().numpy()[None]              # (1, D)
        distances, rows = search(index, query, k)                 # (1, k) each
        tok, prob = knn_distribution(distances, lookup_values(store, rows), temperature)
        keep = tok[0] >= 0
        ids = torch.from_numpy(tok[0][keep]).to(x.device)         # (n,) distinct tokens
        logp = torch.from_numpy(prob[0][keep]).to(x.device).log()[None]  # (1, n)
        return (ids, logp), np.asarray(store.doc)[rows[0][rows[0] >= 0]].tolist()
    return memory


def _forward_kwargs(model) -> tuple[str, dict]:
    """The KV cache's argument name and extras (``logits_to_keep=1``: skip (T-1, V))."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return cache_argument(model), extra


@torch.inference_mode()
def _steps(model, tokenizer, ids, *, memory, layer, W, alpha, blend, temperature, top_k,
           max_new_tokens, seed, stop_event, cut, gate=None, no_repeat_ngram=0):
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos, text = _eos_ids(model, tokenizer), _Detokenizer(tokenizer, ids)
    cache_name, extra = _forward_kwargs(model)
    # the first forward reads the prompt (1, T) and creates a transformers
    # DynamicCache; every later one reads one token (1, 1) and extends the cache
    new_input, cache = torch.tensor([ids], device=device), None
    window = deque(maxlen=W)  # the last W hidden states, prompt included
    new_ids = []  # the answer so far, for no_repeat_ngram
    for i in range(max_new_tokens):
        if stop_event is not None and stop_event.is_set():
            return
        out = model(input_ids=new_input, use_cache=True, output_hidden_states=True,
                    **{cache_name: cache}, **extra)
        cache = returned_cache(out)
        # Gemma's final_logit_softcapping is already applied to out.logits by
        # transformers' forward: it must not be applied a second time here.
        logits = out.logits[0, -1].float()                        # (V,)
        window.extend(out.hidden_states[layer][0, -W:].float())   # (D,) each
        base = torch.log_softmax(logits, dim=-1)                  # (V,)
        logp, top, docs = base, None, None
        if memory is not None:
            x = logits.new_zeros(1, W, window[-1].shape[0])       # (1, W, D)
            x[0, W - len(window):] = torch.stack(list(window))
            pad = (torch.arange(W, device=device) < W - len(window))[None]  # (1, W)
            mem, docs = memory(x, pad, new_input)  # dense (1, V) or sparse (ids, (1, n))
            if isinstance(mem, tuple):
                ids, lp = mem[0].to(device), mem[1][0].to(device)  # (n,), (n,)
                mem, top = (ids, lp), int(ids[lp.argmax()])
            else:
                ids, lp = None, mem[0].to(device)                   # (V,)
                mem, top = lp, int(lp.argmax())
            a = alpha if gate is None else float(gate.alpha(logits, lp, alpha, ids)[0])
            logp = blend_logits(logits, mem, a, blend, base_logp=base)
        banned = banned_tokens(new_ids, no_repeat_ngram)
        allowed = logp.index_fill(0, torch.tensor(banned, device=device), float("-inf")) \
            if banned else logp                                   # (V,)
        token = int(sample_next(allowed, temperature, top_k, generator))
        new_ids.append(token)
        finished = ("eos" if token in eos else
                    "max_new_tokens" if i == max_new_tokens - 1 else None)
        yield Step(i, token, text.push(token), float(logp[token]), float(base[token]),
                   top, alpha if memory is None else a, docs, cut if i == 0 else 0,
                   finished, window[-1].cpu())
        if finished:
            return
        new_input = torch.tensor([[token]], device=device)


def generate_text(model, tokenizer, prompt: str, **kw) -> tuple[str, list[Step]]:
    """Run ``generate`` to the end: ``(the new text, its steps)``."""
    steps = list(generate(model, tokenizer, prompt, **kw))
    return "".join(s.text for s in steps), steps


def ms_per_token(stream) -> float:
    """Mean wall time (ms) between consecutive tokens of a ``generate`` stream.

    The first token, whose step reads the whole prompt, is excluded: what is
    left is the cost of one cached step.  Needs at least 2 tokens.
    """
    import time

    stamps = [time.perf_counter() for _ in stream]
    if len(stamps) < 2:
        raise ValueError("need a stream of at least 2 tokens (max_new_tokens >= 2, and no "
                         "end token right away) to time a step.")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def cost_per_token(model, tokenizer, prompt: str, runs: dict, rounds: int = 1,
                   tokens: int = 24) -> dict:
    """Median ms per generated token of each of ``runs`` (name -> ``generate`` keywords).

    Greedy, ``tokens`` cached steps after the prompt's; the modes take turns in
    each of ``rounds`` rounds, so every mode sees the same machine load.  Used
    by notebooks 03 and 06 for their cost column.
    """
    import statistics

    rounds = check_int("rounds", rounds, 1, example=3)
    tokens = check_int("tokens", tokens, 1, example=24)
    timings = {name: [] for name in runs}
    for _ in range(rounds):
        for name, kw in runs.items():
            steps = generate(model, tokenizer, prompt, temperature=0, top_k=None,
                             max_new_tokens=tokens + 1, **kw)
            timings[name].append(ms_per_token(steps))
    return {name: statistics.median(v) for name, v in timings.items()}


# --- the slow reference: how the original tutorial sampled -----------------------

@torch.inference_mode()
def original_style_step(model, input_ids: torch.Tensor, decoder, alpha: float,
                        index=None, values=None, k: int = 32):
    """SLOW REFERENCE: the next greedy token ``(B,)`` the original tutorial's way.

    Its generation loop (``app.py`` of manceps/MemoryDecoder), as written: per
    token, no cache, one full forward over the whole prefix ``input_ids (B, T)``
    for the logits (at every position), one body-only forward for the query
    (the last hidden state), one FAISS search of ``index`` for ``k`` neighbours
    whose ``values`` fill a dense vocabulary-wide count distribution (which the
    original computes and then does not use), the decoder on the query, then
    ``(1 - alpha) * logits + alpha * decoder logits`` and (here) the argmax.
    Without ``index`` the search is skipped.
    """
    logits = model(input_ids).logits[:, -1]                             # (B, V)
    body = model.get_decoder()                                          # no LM head
    hidden = body(input_ids, output_hidden_states=True).hidden_states[-1]  # (B, T, D)
    if index is not None:
        query = hidden[:, -1].float().cpu().numpy()                     # (B, D)
        _, ids = index.search(query, k)                                 # (B, k)
        knn = np.zeros((len(query), logits.shape[-1]), np.float32)      # (B, V) dense
        for b in range(len(query)):
            for row in ids[b]:
                knn[b, int(values[row])] += 1
        knn /= knn.sum(axis=1, keepdims=True) + 1e-9
    W, T = decoder.config.window, input_ids.shape[1]
    x = hidden.new_zeros(len(hidden), W, hidden.shape[-1])              # (B, W, D)
    x[:, W - min(W, T):] = hidden[:, -W:]
    pad = (torch.arange(W) < W - min(W, T)).expand(len(hidden), W)      # (B, W)
    memory = decoder.log_probs_full(x.float(), pad)                     # (B, V)
    return blend_logits(logits, memory, alpha, "logits").argmax(dim=-1)
