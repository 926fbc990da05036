"""The Memory Decoder: a small transformer that learns to imitate kNN retrieval.

Explained in ``notebooks/03_train_memory_decoder.ipynb``.

Reference: Cao et al. (2025), "Memory Decoder: A Pretrained, Plug-and-Play
Memory for Large Language Models".  Instead of searching the datastore at
inference time, a small network reads the base model's hidden state(s) and
predicts ``p_kNN`` directly; it is then mixed with the base model like kNN-LM.

Here the decoder reads a window of ``W`` consecutive base hidden states (the
datastore keys) and predicts the next token after the last one::

    x (B, W, key_dim) -> Linear -> + position -> TransformerEncoder (causal)
      -> LayerNorm -> last position -> head -> logits (B, V_head)

``W = 1`` reproduces the original design: attention over one position only
ever looks at itself.  Three heads:

* ``"store"``: ``Linear(dim, len(vocab_ids))`` over the datastore's own distinct
  next tokens -- ``p_kNN`` is zero for every other token anyway.
* ``"tied"``: project ``dim -> key_dim`` and multiply by the base model's
  frozen output embedding (full vocabulary).  That embedding is *not* part of
  the checkpoint (it belongs to the base model): attach it after loading with
  ``decoder.attach_output_embedding(model.get_output_embeddings().weight)``.
* ``"full"``: ``Linear(dim, base_vocab_size)``.

Checkpoints are ``model.safetensors`` + ``config.json`` (no pickle), the same
layout ``PyTorchModelHubMixin.save_pretrained`` writes, so both
``load_decoder(folder)`` and ``MemoryDecoder.from_pretrained(folder)`` work.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import resolve_device, tokenizer_fingerprint
from .paths import CorruptFile, load_weights, read_json, require_keys, save_checkpoint
from .validate import ArgumentTypeError, check_float, check_int

HEADS = ("store", "tied", "full")
# Up to this many rows, inference runs the written-out layers (_layer_inference):
# faster at batch 1 (generation), slower than the library's fused kernel from
# about 16 rows (measured at W = 4, dim 256 on 2 cores), so larger batches keep it.
SMALL_BATCH = 8
NOTEBOOK = "notebooks/03_train_memory_decoder.ipynb"


def check_vocab_range(vocab_ids: list[int], base_vocab_size: int) -> None:
    """Refuse sorted ``vocab_ids`` outside ``[0, base_vocab_size)`` (both decoders' heads)."""
    if vocab_ids[0] < 0 or vocab_ids[-1] >= base_vocab_size:
        raise ValueError(f"vocab_ids must lie in [0, {base_vocab_size}); got "
                         f"{vocab_ids[0]}..{vocab_ids[-1]}. Check "
                         "base_vocab_size (the base model's vocabulary size).")


class DecoderMismatch(ValueError):
    """The checkpoint was trained for another base model, tokenizer or datastore."""


@dataclass
class DecoderConfig:
    key_dim: int                # hidden size of the base model = datastore key dim
    base_vocab_size: int        # rows of the base model's output embedding
    dim: int = 256              # DECODER_DIM: width of the decoder's residual stream
    n_layers: int = 6           # transformer encoder layers
    n_heads: int = 32           # attention heads; must divide dim
    window: int = 1             # W: consecutive base hidden states read (1 = original)
    dropout: float = 0.1        # dropout inside each layer while training
    head: str = "store"         # "store", "tied" or "full" (see module docstring)
    vocab_ids: list[int] = field(default_factory=list)  # head="store": its tokens
    base_model_name: str | None = None        # recorded to refuse a wrong base model
    layer: int | None = None                  # which hidden layer the keys come from
    tokenizer_fingerprint: str | None = None  # helpers.model.tokenizer_fingerprint

    def __post_init__(self):
        examples = {"key_dim": 640, "base_vocab_size": 262144, "dim": 256, "n_layers": 6,
                    "n_heads": 32, "window": 1}
        for name, example in examples.items():
            setattr(self, name, check_int(name, getattr(self, name), example=example))
        self.dropout = check_float("dropout", self.dropout, example=0.1)
        if isinstance(self.vocab_ids, (str, bytes)):
            raise ArgumentTypeError("vocab_ids must be a list of token ids; use "
                                    "DecoderConfig.from_store(store, ...).")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}; got {self.head!r}. Pass one of "
                             "those ('store' is the original design).")
        if self.n_heads < 1 or self.dim % self.n_heads:
            fits = [h for h in (1, 2, 4, 8, 16, 32) if self.dim % h == 0]
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                             f"change dim or pick n_heads from {fits}.")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (1 reads only the current hidden "
                             f"state); got {self.window}. Pass window=1 or more.")
        if self.n_layers < 1 or self.key_dim < 1 or self.base_vocab_size < 1:
            raise ValueError("n_layers, key_dim and base_vocab_size must be >= 1; got "
                             f"{self.n_layers}, {self.key_dim}, {self.base_vocab_size}. Use "
                             "DecoderConfig.from_store(store, vocab_size) for the last two.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}. Pass e.g. "
                             "dropout=0.1.")
        self.vocab_ids = sorted({int(i) for i in self.vocab_ids})  # JSON-able, fixed order
        if self.head == "store":
            if not self.vocab_ids:
                raise ValueError("head='store' needs vocab_ids, the datastore's distinct "
                                 "next tokens: use DecoderConfig.from_store(store, ...).")
            check_vocab_range(self.vocab_ids, self.base_vocab_size)

    @classmethod
    def from_store(cls, store, base_vocab_size: int, **knobs) -> "DecoderConfig":
        """A config that fits ``store`` (key dim, next-token ids, model, layer)."""
        m = store.manifest
        return cls(key_dim=store.dim, base_vocab_size=base_vocab_size,
                   vocab_ids=np.unique(np.asarray(store.values)).tolist(),
                   base_model_name=m.get("model_name"), layer=m.get("layer"),
                   tokenizer_fingerprint=m.get("tokenizer_fingerprint"), **knobs)


class MemoryDecoder(nn.Module, PyTorchModelHubMixin):
    """``forward(x (B, W, key_dim), pad_mask (B, W)) -> logits (B, V_head)``."""

    def __init__(self, config: DecoderConfig | dict):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained passes config.json as a dict
            config = DecoderConfig(**config)
        self.config = c = config
        self._hub_mixin_config = asdict(c)  # what save_pretrained writes
        self.inp = nn.Linear(c.key_dim, c.dim)
        self.pos = nn.Parameter(0.02 * torch.randn(c.window, c.dim))  # (W, dim)
        layer = nn.TransformerEncoderLayer(c.dim, c.n_heads, 4 * c.dim, c.dropout,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        if c.head == "store":
            self.head = nn.Linear(c.dim, len(c.vocab_ids))
            column = torch.full((c.base_vocab_size,), -1, dtype=torch.long)
            column[c.vocab_ids] = torch.arange(len(c.vocab_ids))
        else:
            self.head = (nn.Linear(c.dim, c.key_dim) if c.head == "tied"
                         else nn.Linear(c.dim, c.base_vocab_size))
            column = torch.arange(c.base_vocab_size)
        # base token id -> head column; rebuilt from the config, never saved
        self.register_buffer("column", column, persistent=False)
        self.register_buffer("vocab", torch.tensor(c.vocab_ids, dtype=torch.long),
                             persistent=False)
        # head="tied": the base model's output embedding, attached later, never saved
        self.register_buffer("output_embedding", None, persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "MemoryDecoder":
        """``load_decoder(folder, **kwargs)`` for a local folder: the same checks, strict.

        A Hub id is downloaded first (``huggingface_hub.snapshot_download``),
        then loaded the same way.  ``kwargs`` are ``load_decoder``'s.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from .model import hub_reachable
            name = str(pretrained_model_name_or_path)
            if not hub_reachable():
                raise FileNotFoundError(
                    f"{name} is not a folder here and the Hugging Face Hub is unreachable; "
                    f"pass the folder of a decoder trained in {NOTEBOOK}.")
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(name))
        return load_decoder(folder, **kwargs)

    def attach_output_embedding(self, weight: torch.Tensor) -> None:
        """Give a ``head="tied"`` decoder the base model's frozen output embedding."""
        c = self.config
        if tuple(weight.shape) != (c.base_vocab_size, c.key_dim):
            raise DecoderMismatch(f"output embedding has shape {tuple(weight.shape)} but the "
                                  f"decoder expects ({c.base_vocab_size}, {c.key_dim}); "
                                  "attach the embedding of the base model it was trained for.")
        device = self.inp.weight.device
        self.register_buffer("output_embedding", weight.detach().to(device),
                             persistent=False)  # frozen, not saved in checkpoints

    def count_parameters(self) -> int:
        """Trainable parameters (the attached base-model embedding is not one)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _attention_mask(self, pad_mask: torch.Tensor | None, B: int, W: int, device):
        """Bool ``(B * n_heads, W, W)``, True = blocked: causal + padded keys.

        A padded slot may still see itself, so no row is fully blocked (that
        would give NaN); real slots never see padded ones.
        """
        blocked = ~_allowed(pad_mask, W, device)[:, 0].expand(B, W, W)  # (B, W, W)
        return blocked.repeat_interleave(self.config.n_heads, dim=0)

    def hidden(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's final state at the last window position ``(B, dim)``."""
        c = self.config
        if x.ndim != 3 or x.shape[1:] != (c.window, c.key_dim):
            raise ValueError(f"x must have shape (B, {c.window}, {c.key_dim}) = (batch, "
                             f"window, key_dim); got {tuple(x.shape)}. Use "
                             "window_batch(keys, doc, rows, decoder.config.window).")
        x = x.to(self.inp.weight.device, self.inp.weight.dtype)
        if pad_mask is not None:
            pad_mask = pad_mask.to(device=x.device, dtype=torch.bool)  # (B, W)
            x = torch.where(pad_mask[..., None], 0.0, x)  # padded slots carry nothing
        h = self.inp(x) + self.pos                               # (B, W, dim)
        if c.window == 1:  # attention over one position: see _one_position
            for layer in self.encoder.layers:
                h = _one_position(layer, h)
            return self.norm(h[:, -1])                           # (B, dim)
        *body, last = self.encoder.layers
        if not self.training and len(x) <= SMALL_BATCH:  # generation: fewer, plainer calls
            allowed = _allowed(pad_mask, c.window, x.device)    # (B | 1, 1, W, W)
            for layer in body:
                h = _layer_inference(layer, h, allowed)
            return self.norm(_layer_inference(last, h, allowed, last_only=True)[:, -1])
        mask = self._attention_mask(pad_mask, *x.shape[:2], x.device)
        with _attention_kernel(x.device):
            for layer in body:                 # what self.encoder(h, mask) does, minus the
                h = layer(h, src_mask=mask)    # per-call checks that cost ms at batch 1
            h = _last_position(last, h, mask)                    # (B, dim)
        return self.norm(h)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(self.hidden(x, pad_mask))                  # (B, V_head | key_dim)
        if self.config.head != "tied":
            return h
        if self.output_embedding is None:
            raise RuntimeError("head='tied' needs the base model's output embedding, which "
                               "checkpoints do not contain: call decoder.attach_output_"
                               "embedding(model.get_output_embeddings().weight) first.")
        e = self.output_embedding                                # (V, key_dim)
        return F.linear(h.to(e.dtype), e).float()                # (B, V)

    def head_index(self, token_ids) -> torch.Tensor:
        """Head column of each base token id (same shape); -1 if the head lacks it."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.column.device)
        inside = (ids >= 0) & (ids < self.config.base_vocab_size)
        return torch.where(inside, self.column[ids.clamp(0, len(self.column) - 1)], -1)

    def log_probs_full(self, x, pad_mask=None, floor: float = -30.0) -> torch.Tensor:
        """``log p_dec`` over the whole base vocabulary ``(B, base_vocab_size)``.

        For ``head="store"`` tokens outside the store get ``floor`` (their
        probability is 0; ``exp(-30)`` is 1e-13 and keeps sums finite).
        """
        logp = torch.log_softmax(self(x, pad_mask).float(), dim=-1)  # (B, V_head)
        if self.config.head != "store":
            return logp
        full = logp.new_full((len(logp), self.config.base_vocab_size), floor)
        full[:, self.vocab] = logp
        return full

    def log_prob_of(self, x, targets, pad_mask=None, floor: float = -30.0) -> torch.Tensor:
        """``log p_dec(target)`` per row ``(B,)``, without a ``(B, V)`` tensor."""
        logp = torch.log_softmax(self(x, pad_mask).float(), dim=-1)  # (B, V_head)
        col = self.head_index(targets).to(logp.device)                # (B,)
        got = logp.gather(1, col.clamp(min=0)[:, None])[:, 0]
        return torch.where(col >= 0, got, torch.full_like(got, floor))


def _one_position(layer: nn.TransformerEncoderLayer, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)`` for a window of one position ``h (B, 1, dim)``, computed directly.

    A softmax over a single key is 1, so self-attention returns that position's
    value: ``out_proj(v_proj(norm1(h)))``.  The query and key projections, the
    scores and the softmax are skipped (a sixth of the layer's work at W = 1).
    In training, attention dropout drops that single weight per row and head,
    so each head's value is zeroed with probability p or scaled by 1/(1-p) --
    exactly what ``nn.MultiheadAttention`` does with one key.
    """
    attn = layer.self_attn
    dim, heads = attn.embed_dim, attn.num_heads
    value = F.linear(layer.norm1(h), attn.in_proj_weight[2 * dim:],
                     attn.in_proj_bias[2 * dim:])                  # (B, 1, dim)
    if layer.training and attn.dropout > 0:
        keep = torch.empty(h.shape[0], 1, heads, 1, device=h.device, dtype=h.dtype)
        keep.bernoulli_(1.0 - attn.dropout).div_(1.0 - attn.dropout)
        value = (value.unflatten(-1, (heads, dim // heads)) * keep).flatten(-2)
    h = h + layer.dropout1(attn.out_proj(value))
    return h + layer._ff_block(layer.norm2(h))


def _attention_kernel(device: torch.device):
    """The attention kernel for the library layers on a CPU: plain math.

    PyTorch's default CPU kernel for ``scaled_dot_product_attention`` is a flash
    kernel built for long sequences; for this decoder's windows (``W = 4`` keys,
    32 heads of 8 dimensions, thousands of tiny problems a batch) it took half of
    each training step, forward and backward.  Timed alone at those shapes in bf16
    it took 18 ms where the math kernel, which computes the same two small matmuls
    and softmax, took 6; a whole training step is 1.5x faster in bf16 autocast
    (``benchmarks/bench_attention.py``), and batched inference a little faster too.
    Generation (up to ``SMALL_BATCH`` rows, ``_layer_inference``) does not come here
    and keeps the default; so does a GPU.  The setting is process-wide while the
    layers run (``torch.nn.attention.sdpa_kernel``).
    """
    if device.type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def _allowed(pad_mask: torch.Tensor | None, W: int, device) -> torch.Tensor:
    """Bool ``(B | 1, 1, W, W)``, True = may attend: causal, and no padded key but a
    slot's own; shared by every head (the shape ``scaled_dot_product_attention``
    broadcasts).  ``MemoryDecoder._attention_mask`` is its negation, per head."""
    i = torch.arange(W, device=device)
    allowed = (i[None, :] <= i[:, None])[None, None]              # (1, 1, W, W) causal
    if pad_mask is not None:  # a padded slot still sees itself: no row fully blocked
        allowed = allowed & (~pad_mask[:, None, None, :] | (i[:, None] == i[None, :]))
    return allowed


def _layer_inference(layer: nn.TransformerEncoderLayer, h: torch.Tensor,
                     allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """``layer(h, src_mask=...)`` in eval mode, written out: ``(B, W, dim)``.

    The ``norm_first`` layer as plain functional calls -- LayerNorm, one
    query/key/value projection, ``scaled_dot_product_attention``, output
    projection, feed-forward -- without ``nn.MultiheadAttention``'s argument
    handling, which costs more than the arithmetic at batch 1: generation
    with the ``W = 4`` decoder runs about a millisecond per token faster
    (``benchmarks/bench_sampling.py``); used for batches of up to
    ``SMALL_BATCH`` rows.  ``last_only`` computes the output of
    the last position only (``(B, 1, dim)``; the keys and values still come
    from the whole window), as ``_last_position`` does.  No dropout: the
    training path keeps the library's layers (``tests/test_decoder.py``
    checks that both give the same numbers).
    """
    attn = layer.self_attn
    B, W, dim = h.shape
    heads = attn.num_heads
    normed = F.layer_norm(h, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    qkv = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)        # (B, W, 3 dim)
    q, k, v = qkv.view(B, W, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # (B, H, W, d)
    if last_only:
        q, allowed, h = q[:, :, -1:], allowed[:, :, -1:], h[:, -1:]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)        # (B, H, W', d)
    h = h + F.linear(o.transpose(1, 2).reshape(B, -1, dim), attn.out_proj.weight,
                     attn.out_proj.bias)
    normed = F.layer_norm(h, (dim,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    up = layer.activation(F.linear(normed, layer.linear1.weight, layer.linear1.bias))
    return h + F.linear(up, layer.linear2.weight, layer.linear2.bias)


def _last_position(layer: nn.TransformerEncoderLayer, h: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """``layer(h, src_mask=mask)[:, -1]`` for ``W > 1``, without the other positions.

    Only the last position's output is read, so in the final layer only its
    query, feed-forward and residual are needed; the keys and values still come
    from the whole window.  Same parameters and the same arithmetic as the
    layer's own ``norm_first`` forward (``tests/test_decoder.py`` checks it).
    For ``W = 4`` this skips about a tenth of the decoder's work.
    """
    normed = layer.norm1(h)                                        # (B, W, dim)
    query = normed[:, -1:]                                         # (B, 1, dim)
    attn_mask = None if mask is None else mask[:, -1:]             # (B*heads, 1, W)
    attended = layer.self_attn(query, normed, normed, attn_mask=attn_mask,
                               need_weights=False)[0]
    x = h[:, -1:] + layer.dropout1(attended)                      # (B, 1, dim)
    x = x + layer._ff_block(layer.norm2(x))
    return x[:, -1]                                               # (B, dim)


def save_decoder(decoder: MemoryDecoder, folder) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically)."""
    return save_checkpoint(decoder, asdict(decoder.config), folder)


def _read_config(folder: Path) -> DecoderConfig:
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no Memory Decoder checkpoint at {folder} (need config.json "
                                f"and model.safetensors). Train one in {NOTEBOOK} "
                                "(train_decoder(..., checkpoint_dir=folder)) or call "
                                "save_decoder(decoder, folder).")
    raw = read_json(folder / "config.json", _advice(folder), ())
    if raw.get("kind") == "token":
        raise DecoderMismatch(f"{folder} holds a token-level Memory Decoder (it reads token "
                              "ids, not hidden states): load it with helpers.token_decoder."
                              "load_token_decoder(folder, tokenizer=...).")
    require_keys(raw, folder / "config.json", ("key_dim", "base_vocab_size"), _advice(folder))
    known = {f.name for f in fields(DecoderConfig)}
    try:
        return DecoderConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CorruptFile(f"{folder / 'config.json'} is not a valid Memory Decoder config "
                          f"({err}); {_advice(folder)}") from None


def _advice(folder) -> str:
    return (f"delete {folder} and train the decoder again ({NOTEBOOK}), or save it with "
            "save_decoder(decoder, folder).")


def load_decoder(folder, *, base_model_name: str | None = None, tokenizer=None,
                 store=None, vocab_size: int | None = None,
                 output_embedding: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> MemoryDecoder:
    """Load a checkpoint (in eval mode), refusing one made for another setup.

    Every argument given is checked against what the checkpoint recorded:
    ``base_model_name``, the ``tokenizer``'s fingerprint, ``vocab_size`` (the
    base model's), and the ``store``'s key dim, model, layer and tokenizer.
    ``output_embedding`` (``model.get_output_embeddings().weight``) is attached
    when the checkpoint has ``head="tied"`` and ignored otherwise, so a caller
    can pass it whichever head notebook 03 trained.
    """
    folder = Path(folder)
    c = _read_config(folder)
    checks = [("base_model_name", base_model_name, c.base_model_name),
              ("base_vocab_size", vocab_size, c.base_vocab_size),
              ("tokenizer_fingerprint", None if tokenizer is None
               else tokenizer_fingerprint(tokenizer), c.tokenizer_fingerprint)]
    if store is not None:
        m = store.manifest
        checks += [("key_dim (the store's dim)", store.dim, c.key_dim),
                   ("layer (the store's)", m.get("layer"), c.layer),
                   ("base_model_name (the store's)", m.get("model_name"), c.base_model_name),
                   ("tokenizer_fingerprint (the store's)", m.get("tokenizer_fingerprint"),
                    c.tokenizer_fingerprint)]
    diffs = [f"{name} is {here!r} here but {recorded!r} in the checkpoint"
             for name, here, recorded in checks
             if here is not None and recorded is not None and here != recorded]
    if diffs:
        raise DecoderMismatch(
            f"the decoder in {folder} was trained for another setup: " + "; ".join(diffs) +
            f". Retrain it for this setup in {NOTEBOOK}, or load the matching base model "
            f"({c.base_model_name!r}) and datastore.")
    device = resolve_device(device)  # "cuda" without a GPU: says what to use instead
    decoder = MemoryDecoder(c)  # weights are read onto the CPU, wherever they were saved
    load_weights(decoder, folder / "model.safetensors", _advice(folder))
    if output_embedding is not None and c.head == "tied":
        decoder.attach_output_embedding(output_embedding)
    return decoder.to(device).eval()
