"""The token-level Memory Decoder: a small causal language model over token ids.

To be explained in notebook 06 (issue 18).

Reference: Cao et al. (2025), "Memory Decoder: A Pretrained, Plug-and-Play
Memory for Large Language Models" (LUMIA-Group/MemoryDecoder).  The decoder
of ``helpers/decoder.py`` reads the base model's hidden states, so it serves
one base model at one layer.  This one reads the *tokens*, like the paper's
memory: it is trained on the same kNN targets, and any model with the same
tokenizer can be blended with it, unchanged::

    ids (B, T) base token ids -> compact ids -> embedding + position
      -> n_layers pre-LayerNorm causal blocks -> LayerNorm -> head
      -> logits (B, T, V)       V = len(vocab_ids)

**A pretrained start** (``trunk="base"``, ``TokenMemoryDecoder.from_base_model``):
instead of its own blocks, the decoder copies a base model's first
``n_layers`` transformer layers and final norm, and takes the embedding rows
of the compact vocabulary (their mean for the unknown id) as input and tied
head -- the paper starts its memory from a small pretrained model of the family.
Its checkpoint holds the truncated transformers config (``trunk_config``), so
loading it needs no base model.  Quick size: test perplexity 6.87 blended with
Gemma 3 270M from its first 2 layers, 8.70 from scratch (notebook 06).

The vocabulary is compact: ``vocab_ids`` are the datastore's distinct next
tokens plus the token every stored text starts with (``bos_id``); every other
base id -- including ids outside ``[0, base_vocab_size)`` -- reads one shared
*unknown* embedding.  The head has a column per ``vocab_ids`` entry and none
for the unknown id: ``p_kNN`` is zero outside the store's tokens, as for the
hidden-state decoder's ``"store"`` head, and ``head_index`` means the same
thing, so ``helpers.train_decoder.memdec_loss`` trains both.

Generation uses the decoder's own KV cache: ``step(new_ids, cache)`` gives
the logits of the last new token and the grown cache, equal to the full
``forward`` on the whole sequence (``tests/test_token_decoder.py``).

Checkpoints are ``model.safetensors`` + ``config.json`` with ``"kind":
"token"`` (no pickle); ``load_token_decoder`` refuses a tokenizer other than
the one it was trained with, and a hidden-state checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderMismatch, check_vocab_range
from .model import (cache_argument, resolve_device, returned_cache,
                    tokenizer_fingerprint)
from .paths import CorruptFile, load_weights, read_json, save_checkpoint
from .validate import ArgumentTypeError, check_float, check_int

KIND = "token"
TRUNKS = ("own", "base")
NOTEBOOK = "notebooks/06 (token-level Memory Decoder, issue 18)"


@dataclass
class TokenDecoderConfig:
    base_vocab_size: int        # rows of the base model's output embedding
    vocab_ids: list[int] = field(default_factory=list)  # compact vocabulary (base ids)
    bos_id: int | None = None   # token at position 0 of every stored text (Gemma: <bos>)
    dim: int = 256              # width of the residual stream
    n_layers: int = 6           # transformer blocks
    n_heads: int = 8            # attention heads; must divide dim (8 of 32 dims at 256)
    context: int = 256          # most positions read at once (learned position table)
    dropout: float = 0.1        # dropout on the residual branches while training
    base_model_name: str | None = None        # the model whose store taught it (a note only)
    tokenizer_fingerprint: str | None = None  # helpers.model.tokenizer_fingerprint
    kind: str = KIND            # "token"; hidden-state checkpoints have no "kind"
    trunk: str = "own"          # "own": blocks above; "base": a base model's first layers
    trunk_config: dict | None = None  # trunk "base": its transformers config (truncated)

    def __post_init__(self):
        if self.trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}; got {self.trunk!r}. 'own' builds "
                             "the decoder's own blocks, 'base' starts from a base model's "
                             "first layers (TokenMemoryDecoder.from_base_model).")
        if self.trunk == "base":
            tc = self.trunk_config
            if not isinstance(tc, dict) or "model_type" not in tc:
                raise ValueError("trunk='base' needs trunk_config, the transformers config "
                                 "of the base model's first layers; build the decoder with "
                                 "TokenMemoryDecoder.from_base_model(model, store, ...).")
            # the shape is the base model's: width, layers and heads follow its config
            self.dim, self.n_layers, self.n_heads = (
                tc.get("hidden_size"), tc.get("num_hidden_layers"),
                tc.get("num_attention_heads"))
        examples = {"base_vocab_size": 262144, "dim": 256, "n_layers": 6, "n_heads": 8,
                    "context": 256}
        for name, example in examples.items():
            setattr(self, name, check_int(name, getattr(self, name), 1, example=example))
        self.dropout = check_float("dropout", self.dropout, example=0.1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}. Pass e.g. "
                             "dropout=0.1.")
        if self.trunk == "own" and self.dim % self.n_heads:
            fits = [h for h in (1, 2, 4, 8, 16, 32) if self.dim % h == 0]
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                             f"change dim or pick n_heads from {fits}.")
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND!r} for a token-level decoder; got "
                             f"{self.kind!r}. A hidden-state decoder uses DecoderConfig.")
        if isinstance(self.vocab_ids, (str, bytes)):
            raise ArgumentTypeError("vocab_ids must be a list of token ids; use "
                                    "TokenDecoderConfig.from_store(store, vocab_size, "
                                    "bos_id=tokenizer.bos_token_id).")
        if self.bos_id is not None:
            self.bos_id = check_int("bos_id", self.bos_id, 0, example=2)
        ids = {int(i) for i in self.vocab_ids} | ({self.bos_id} - {None})
        self.vocab_ids = sorted(ids)  # JSON-able, fixed order
        if not self.vocab_ids:
            raise ValueError("vocab_ids is empty: build the config from a datastore with "
                             "TokenDecoderConfig.from_store(store, vocab_size, bos_id=...).")
        check_vocab_range(self.vocab_ids, self.base_vocab_size)

    @classmethod
    def from_store(cls, store, base_vocab_size: int, bos_id: int | None,
                   **knobs) -> "TokenDecoderConfig":
        """A config over ``store``'s next tokens plus ``bos_id`` (``tokenizer.bos_token_id``).

        The store keeps the token *after* every position, never the one at
        position 0, so the first token of each text is passed here: the
        tokenizer's BOS, which ``extract_keys`` puts in front of every text.
        """
        m = store.manifest
        return cls(base_vocab_size=base_vocab_size,
                   vocab_ids=np.unique(np.asarray(store.values)).tolist(), bos_id=bos_id,
                   base_model_name=m.get("model_name"),
                   tokenizer_fingerprint=m.get("tokenizer_fingerprint"), **knobs)


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention + MLP, with an optional KV cache."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, past: tuple | None = None):
        """``h (B, n, dim)`` after ``past = (k, v)`` ``(B, H, P, hd)``; returns ``(h, (k, v))``."""
        B, n, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(dim, dim=-1)            # (B, n, dim) each
        q, k, v = (t.view(B, n, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        P = 0 if past is None else past[0].shape[2]
        if P:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, H, P+n, hd)
        if n == 1:
            mask, causal = None, False          # one new query sees everything before it
        elif P == 0:
            mask, causal = None, True
        else:                                   # query i (position P+i) sees keys <= P+i
            i = torch.arange(n, device=h.device)[:, None]
            mask, causal = torch.arange(P + n, device=h.device)[None] <= P + i, False
        p = self.drop.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                           is_causal=causal)            # (B, H, n, hd)
        h = h + self.drop(self.out(a.transpose(1, 2).reshape(B, n, dim)))
        h = h + self.drop(self.mlp(self.norm2(h)))
        return h, (k, v)


class TokenMemoryDecoder(nn.Module):
    """``forward(ids (B, T)) -> logits (B, T, V)``; ``step`` for generation."""

    def __init__(self, config: TokenDecoderConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = TokenDecoderConfig(**config)
        self.config = c = config
        V = len(c.vocab_ids)
        self.unknown = V                                       # the shared unknown id
        if c.trunk == "base":     # a base model's first layers; embedding = head (tied)
            self.trunk = _base_trunk(c.trunk_config)
            self.embed = self.trunk.get_input_embeddings()     # (V + 1, dim), last = unknown
            self.softcap = c.trunk_config.get("final_logit_softcapping")
            self._cache_arg = cache_argument(self.trunk)      # transformers 5: "cache"
        else:
            self.embed = nn.Embedding(V + 1, c.dim)            # (V + 1, dim), last = unknown
            self.pos = nn.Parameter(0.02 * torch.randn(c.context, c.dim))  # (context, dim)
            self.blocks = nn.ModuleList(Block(c.dim, c.n_heads, c.dropout)
                                        for _ in range(c.n_layers))
            self.norm = nn.LayerNorm(c.dim)
            self.head = nn.Linear(c.dim, V)
            nn.init.normal_(self.embed.weight, std=0.02)
        column = torch.full((c.base_vocab_size,), V, dtype=torch.long)
        column[c.vocab_ids] = torch.arange(V)
        # base token id -> compact id (V = unknown); rebuilt from the config, never saved
        self.register_buffer("column", column, persistent=False)
        self.register_buffer("vocab", torch.tensor(c.vocab_ids, dtype=torch.long),
                             persistent=False)

    @classmethod
    def from_store(cls, store, base_vocab_size: int, bos_id: int | None,
                   **knobs) -> "TokenMemoryDecoder":
        """A fresh decoder over ``store``'s tokens (see ``TokenDecoderConfig.from_store``)."""
        return cls(TokenDecoderConfig.from_store(store, base_vocab_size, bos_id, **knobs))

    @classmethod
    def from_base_model(cls, model, store, bos_id: int | None, n_layers: int = 2,
                        context: int = 256, dropout: float = 0.0) -> "TokenMemoryDecoder":
        """A decoder that starts from ``model``'s first ``n_layers`` layers (the paper's start).

        Cao et al. start their memory from a small pretrained model of the family
        (GPT2-small for GPT-2).  Here: ``model``'s embedding rows of the store's
        tokens (plus their mean for the unknown id), its first ``n_layers``
        transformer layers and its final norm, and the embedding as the head
        (tied, as in Gemma).  It still reads only token ids, so it plugs into
        any model with the same tokenizer.  The weights are copies: training it
        leaves ``model`` unchanged.
        """
        text = model.config.get_text_config()
        total = int(getattr(text, "num_hidden_layers"))
        n_layers = check_int("n_layers", n_layers, 1, total, example=2)
        d = text.to_dict()
        for key in _NOT_COPIED:
            d.pop(key, None)
        own_config = TokenDecoderConfig.from_store(store, text.vocab_size, bos_id,
                                                   context=context, dropout=dropout)
        d.update(num_hidden_layers=n_layers, vocab_size=len(own_config.vocab_ids) + 1,
                 pad_token_id=None, attention_dropout=float(dropout), use_cache=True)
        if d.get("layer_types"):
            d["layer_types"] = list(d["layer_types"][:n_layers])
        decoder = cls(replace(own_config, trunk="base", trunk_config=d))
        source = {k: v.detach() for k, v in model.get_decoder().state_dict().items()}
        own = decoder.trunk.state_dict()
        missing = [k for k in own if k != "embed_tokens.weight" and
                   (k not in source or source[k].shape != own[k].shape)]
        if missing:
            raise ValueError(f"{type(model).__name__}'s layers do not fit the truncated copy "
                             f"(no {missing[:3]}); use trunk='own' (TokenMemoryDecoder."
                             "from_store) for this model.")
        weights = {k: source[k].to(own[k].dtype).cpu() for k in own if k in source
                   and k != "embed_tokens.weight"}
        E = model.get_input_embeddings().weight.detach().float().cpu()   # (base V, dim)
        rows = torch.tensor(decoder.config.vocab_ids)
        weights["embed_tokens.weight"] = torch.cat([E[rows], E.mean(0, keepdim=True)])
        decoder.trunk.load_state_dict(weights, strict=True)
        return decoder

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def compact(self, ids) -> torch.Tensor:
        """Compact id of each base id (same shape); the unknown id for any other id."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.column.device)
        inside = (ids >= 0) & (ids < self.config.base_vocab_size)
        return torch.where(inside, self.column[ids.clamp(0, len(self.column) - 1)],
                           self.unknown)

    def head_index(self, token_ids) -> torch.Tensor:
        """Head column of each base token id (same shape); -1 if the head lacks it."""
        col = self.compact(token_ids)
        return torch.where(col == self.unknown, -1, col)

    def _run(self, ids: torch.Tensor, cache, use_cache: bool = True):
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, T) = (batch, tokens); got "
                             f"{tuple(ids.shape)}. Add a batch axis: ids[None].")
        P = cache_length(cache)
        n, ctx = ids.shape[1], self.config.context
        if P + n > ctx:
            raise ValueError(f"the token decoder reads at most {ctx} positions; got "
                             f"{P + n}. Keep the last {ctx} tokens (start a new cache on "
                             "them) or build it with a larger context.")
        x = self.compact(ids.to(self.column.device))                      # (B, n)
        if self.config.trunk == "base":
            out = self.trunk(input_ids=x, use_cache=use_cache, **{self._cache_arg: cache})
            h = out["last_hidden_state"]                                  # (B, n, dim), normed
            logits = F.linear(h, self.embed.weight[:self.unknown])        # (B, n, V) tied head
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits, returned_cache(out) if use_cache else None
        h = self.embed(x) + self.pos[P:P + n]                             # (B, n, dim)
        out = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, cache[i] if cache else None)
            out.append(kv)
        return self.head(self.norm(h)), out                               # (B, n, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(torch.as_tensor(ids), None, use_cache=False)[0]

    def step(self, ids_new, cache=None) -> tuple[torch.Tensor, object]:
        """Logits ``(B, V)`` after the last of ``ids_new (B, n)``, and the grown cache.

        ``cache=None`` starts a sequence (the prompt); then feed one token at
        a time.  Same result as ``forward`` on the whole sequence.  The cache is
        a list of ``(k, v)`` per block (trunk ``"own"``) or transformers' cache
        (trunk ``"base"``); ``cache_length(cache)`` is the positions it holds.
        """
        logits, cache = self._run(torch.as_tensor(ids_new), cache)
        return logits[:, -1], cache

    def log_probs_full(self, logits: torch.Tensor, floor: float = -30.0) -> torch.Tensor:
        """``log p_dec`` ``(..., base_vocab_size)`` from head logits; ``floor`` off the vocab."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        full = logp.new_full((*logp.shape[:-1], self.config.base_vocab_size), floor)
        full[..., self.vocab] = logp
        return full


# keys of the base model's config that do not describe its first layers' shape
_NOT_COPIED = ("quantization_config", "dtype", "torch_dtype", "architectures", "auto_map",
               "_name_or_path", "transformers_version", "id2label", "label2id")


def _base_trunk(trunk_config: dict):
    """The transformers body (no head) that ``trunk_config`` describes, float32, SDPA."""
    from transformers import AutoConfig, AutoModel
    d = dict(trunk_config)
    try:
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"trunk_config does not describe a transformers model ({err}); "
                         "build the decoder with TokenMemoryDecoder.from_base_model(model, "
                         "store, ...) or use trunk='own'.") from None
    return AutoModel.from_config(config, attn_implementation="sdpa").float()


def cache_length(cache) -> int:
    """Positions a token decoder's cache holds (``None``: 0)."""
    if cache is None or (isinstance(cache, (list, tuple)) and not cache):
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[2])


def save_token_decoder(decoder: TokenMemoryDecoder, folder) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``"kind": "token"``) atomically."""
    return save_checkpoint(decoder, asdict(decoder.config), folder)


def _advice(folder) -> str:
    return (f"delete {folder} and train the token decoder again ({NOTEBOOK}), or save one "
            "with save_token_decoder(decoder, folder).")


def _read_config(folder: Path) -> TokenDecoderConfig:
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no token-level Memory Decoder at {folder} (need config.json "
                                "and model.safetensors). Train one with train_token_decoder "
                                "and save it with save_token_decoder(decoder, folder).")
    raw = read_json(folder / "config.json", _advice(folder), ("base_vocab_size",))
    if raw.get("kind") != KIND:
        raise DecoderMismatch(f"{folder} holds a hidden-state Memory Decoder (it reads the "
                              "base model's hidden states), not a token-level one: load it "
                              "with helpers.decoder.load_decoder(folder, ...).")
    known = {f.name for f in fields(TokenDecoderConfig)}
    try:
        return TokenDecoderConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CorruptFile(f"{folder / 'config.json'} is not a valid token decoder config "
                          f"({err}); {_advice(folder)}") from None


def check_tokenizer(config: TokenDecoderConfig, fingerprint: str | None, what: str,
                    vocab_size: int | None = None, where: str = "") -> None:
    """Refuse a tokenizer (by ``helpers.model.tokenizer_fingerprint``) other than the one
    the token decoder was trained with, and a model head too small for its token ids.

    ``what`` names the tokenizer's owner in the message ("the tokenizer", "the second
    model"); ``where`` says where the decoder came from.  One check for loading, for
    ``generate`` and for notebook 06's second model.
    """
    c = config
    if fingerprint is not None and c.tokenizer_fingerprint is not None \
            and fingerprint != c.tokenizer_fingerprint:
        raise DecoderMismatch(
            f"the token decoder{where} was trained for the tokenizer of "
            f"{c.base_model_name!r} (fingerprint {c.tokenizer_fingerprint}), but {what} has "
            f"fingerprint {fingerprint}: its token ids mean other words. Use a model that "
            f"shares {c.base_model_name!r}'s tokenizer, or train a token decoder on a "
            "datastore built with this one.")
    if vocab_size is not None and max(c.vocab_ids, default=-1) >= vocab_size:
        raise DecoderMismatch(
            f"the token decoder{where} predicts token ids up to {max(c.vocab_ids)}, but "
            f"{what}'s head has {vocab_size} rows. Use a model that shares "
            f"{c.base_model_name!r}'s tokenizer.")


def second_model_path(name, tag: str = ""):
    """The second model of notebook 06: ``name`` itself, or for ``"auto"`` the fine-tuned
    copy that ``benchmarks/bench_finetune_sweep.py`` saves (``None`` if there is none)."""
    from .paths import artifacts_dir

    if name is None or name is False:
        return None
    if name != "auto":
        return str(name)
    folder = artifacts_dir(tag) / "finetuned"
    return str(folder) if (folder / "config.json").is_file() else None


def load_token_decoder(folder, *, tokenizer=None, store=None,
                       device: str | torch.device = "cpu") -> TokenMemoryDecoder:
    """Load a token-level checkpoint (eval mode), refusing another tokenizer.

    Unlike the hidden-state decoder it is *not* tied to a base model: any
    model whose tokenizer has the recorded fingerprint may use it.  Given a
    ``tokenizer`` or a ``store``, their fingerprints are checked.
    """
    folder = Path(folder)
    c = _read_config(folder)
    for what, fp in [("the tokenizer", None if tokenizer is None
                      else tokenizer_fingerprint(tokenizer)),
                     ("the datastore's tokenizer", None if store is None
                      else store.manifest.get("tokenizer_fingerprint"))]:
        check_tokenizer(c, fp, what, where=f" in {folder}")
    device = resolve_device(device)
    decoder = TokenMemoryDecoder(c)
    load_weights(decoder, folder / "model.safetensors", _advice(folder))
    return decoder.to(device).eval()



# Where each kind of decoder's α gate is saved, beside it in artifacts_dir(size.tag).
GATE_FOLDERS = {"hidden": "alpha_gate",          # notebook 04, section 6
                "token": "token_alpha_gate"}     # notebook 06, section 7


def decoder_kind(folder) -> str:
    """``"token"`` if ``folder``'s ``config.json`` is a token-level decoder's, else
    ``"hidden"`` (also when it is missing or unreadable: the hidden-state loader then
    says what is wrong with it)."""
    import json

    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "hidden"
    return "token" if isinstance(raw, dict) and raw.get("kind") == KIND else "hidden"


def load_either_decoder(folder, *, base_model_name: str | None = None, tokenizer=None,
                        store=None, vocab_size: int | None = None, output_embedding=None,
                        device: str | torch.device = "cpu"):
    """The decoder saved in ``folder``, of whichever kind: ``(decoder, kind)``.

    ``kind`` is ``"token"`` for notebook 06's token-level checkpoint (loaded with
    :func:`load_token_decoder`, which checks the tokenizer) and ``"hidden"`` for a
    hidden-state one (``helpers.decoder.load_decoder``, which checks the base model,
    tokenizer and datastore too).  ``GATE_FOLDERS[kind]`` names where its α gate is
    saved.  The chat panel (notebook 05) opens its ``DECODER`` this way.
    """
    from .decoder import load_decoder

    if decoder_kind(folder) == "token":
        return load_token_decoder(folder, tokenizer=tokenizer, store=store,
                                  device=device), "token"
    return load_decoder(folder, base_model_name=base_model_name, tokenizer=tokenizer,
                        store=store, vocab_size=vocab_size, output_embedding=output_embedding,
                        device=device), "hidden"
