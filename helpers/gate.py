"""Adaptive α: a small gate that decides, token by token, how much the memory speaks.

Explained in ``notebooks/04_blended_sampling.ipynb`` (section 6).

A fixed α trusts the Memory Decoder as much on a GDPR article as on a Python
docstring, where the decoder (trained only on EU law) is confidently wrong.
The gate turns signals the blended step already has into a per-token weight::

    alpha_t = alpha * gate(features_t)          gate(.) in (0, 1)

``alpha`` is the user's slider (a scale: at 1 the gate decides alone, at 0
the base model speaks), and the features come from the two distributions that
the step computes anyway, so the gate costs a few vector reductions per token
and no search:

==========================  ====================================================
``base_entropy``            entropy of p_base (nats): is the base model unsure?
``base_max_logp``           log of p_base's top probability
``dec_entropy``             entropy of p_dec: does the memory know this context?
``dec_max_logp``            log of p_dec's top probability
``dec_logp_of_base_top``    log p_dec(base model's top token): do they agree?
``base_logp_of_dec_top``    log p_base(decoder's top token)
``overlap``                 sum_y min(p_base(y), p_dec(y)), from 0 to 1
==========================  ====================================================

The gate is trained like the interpolation weight of adaptive kNN-LMs (He et
al. 2021): maximise the likelihood of the mixture
``(1 - alpha_t) p_base(y) + alpha_t p_dec(y)`` of the true next token ``y``,
on held-out in-domain text and on off-domain text, each domain weighted
equally.  Neither the base model nor the decoder changes.

Gates are saved as ``model.safetensors`` + ``config.json`` and record the
decoder they were trained with (a hash of its weights) and the base model:
a gate for another decoder is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import tokenizer_fingerprint
from .paths import CorruptFile, load_weights, read_json, save_checkpoint
from .validate import ArgumentTypeError, check_float, check_int

FEATURES = ("base_entropy", "base_max_logp", "dec_entropy", "dec_max_logp",
            "dec_logp_of_base_top", "base_logp_of_dec_top", "overlap")
NOTEBOOK = "notebooks/04_blended_sampling.ipynb (section 6)"
TOKEN_NOTEBOOK = "notebooks/06_token_memory.ipynb (section 7)"  # a token decoder's gate


def gate_notebook(decoder=None) -> str:
    """Where a gate for ``decoder`` is trained: notebook 06 for a token-level decoder
    (``helpers.token_decoder``), notebook 04 otherwise."""
    from .token_decoder import TokenMemoryDecoder

    return TOKEN_NOTEBOOK if isinstance(decoder, TokenMemoryDecoder) else NOTEBOOK
DEC_FLOOR = -30.0  # log p_dec of a token outside the decoder's head (as log_probs_full)
PROB_FLOOR = 1e-12


class GateMismatch(ValueError):
    """The gate was trained for another decoder, base model or feature set."""


def decoder_fingerprint(decoder) -> str:
    """Short hash of a decoder's config and weights: equal hash, same decoder."""
    digest = hashlib.sha256(json.dumps(asdict(decoder.config), sort_keys=True).encode())
    for name, tensor in sorted(decoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def gate_features(base_logits: torch.Tensor, dec_logp: torch.Tensor, names=FEATURES,
                  vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The gate's inputs ``(N, F)`` from base logits ``(N, V)`` and decoder log-probs.

    ``dec_logp`` is ``(N, V)`` over the base vocabulary (a floor such as -30
    instead of ``-inf`` is fine: it is renormalised here), or, with ``vocab``
    (sorted token ids ``(V_s,)``), ``(N, V_s)`` over those tokens only, every
    other token having probability 0: the cheap form for a decoder whose head
    covers the datastore's vocabulary.  Both forms give the same features.
    """
    return gate_features_and_normaliser(base_logits, dec_logp, names, vocab)[0]


@torch.inference_mode()
def gate_features_and_normaliser(base_logits, dec_logp, names=FEATURES, vocab=None):
    """``gate_features(...)`` and the base side's ``max`` and ``logsumexp`` ``(N, 1)``.

    The two statistics fall out of the features' pass over the base logits, so a
    caller that needs them too (``helpers.evaluation.score_rows``) does not read
    the ``(N, 262144)`` logits again for them.
    """
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown features {unknown}; choose from {FEATURES}.")
    # The base side is (N, 262144) wide: each pass over it costs more than all
    # of the decoder side, so it is read as few times as possible (max, one exp,
    # one sum, one dot product) and p_base is only formed where it is needed.
    z = base_logits.float()
    z_max, top_b = z.max(-1, keepdim=True)                            # (N, 1) each
    e = (z - z_max).exp_()                                            # (N, V) unnormalised
    total = e.sum(-1, keepdim=True)                                   # (N, 1)
    lse = z_max + total.log()                                         # log normaliser
    ld = torch.log_softmax(dec_logp.float().to(z.device), dim=-1)     # (N, V) or (N, V_s)
    pd = ld.exp()
    top_d = ld.argmax(-1, keepdim=True)                               # (N, 1) column of ld
    if vocab is None:
        ld_at_top_b, top_d_id = ld.gather(1, top_b), top_d
        pb_cols = lambda: e / total                                   # noqa: E731
    else:
        vocab = torch.as_tensor(vocab, device=z.device)
        col = torch.searchsorted(vocab, top_b).clamp(max=len(vocab) - 1)  # (N, 1)
        found = vocab[col] == top_b
        ld_at_top_b = torch.where(found, ld.gather(1, col), torch.full_like(z[:, :1], DEC_FLOOR))
        top_d_id = vocab[top_d]                                       # (N, 1)
        pb_cols = lambda: e[:, vocab] / total                         # noqa: E731  (N, V_s)
    out = {
        # H = -sum p (z - lse) = lse - E_p[z]
        "base_entropy": lambda: lse[:, 0] - torch.linalg.vecdot(e, z) / total[:, 0],
        "base_max_logp": lambda: (z_max - lse)[:, 0],
        "dec_entropy": lambda: -(pd * ld).sum(-1),
        "dec_max_logp": lambda: ld.gather(1, top_d)[:, 0],
        "dec_logp_of_base_top": lambda: ld_at_top_b[:, 0],
        "base_logp_of_dec_top": lambda: (z.gather(1, top_d_id) - lse)[:, 0],
        "overlap": lambda: torch.minimum(pb_cols(), pd).sum(-1),
    }
    return torch.stack([out[n]() for n in names], dim=1), z_max, lse  # (N, F), (N, 1), (N, 1)


@dataclass
class GateConfig:
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    hidden: int = 16                          # width of the gate's one hidden layer
    decoder_fingerprint: str | None = None    # decoder_fingerprint(decoder) at training
    base_model_name: str | None = None
    tokenizer_fingerprint: str | None = None

    def __post_init__(self):
        if isinstance(self.features, str):
            raise ArgumentTypeError(f"features must be a list of names from {FEATURES}, "
                                    f"not one string; got {self.features!r}.")
        self.features = list(self.features)
        self.hidden = check_int("hidden", self.hidden, 1, example=16)
        unknown = [n for n in self.features if n not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"features must be a non-empty subset of {FEATURES}; "
                             f"got {self.features}.")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1; got {self.hidden}.")


class AlphaGate(nn.Module):
    """``forward(features (N, F)) -> gate (N,)`` in (0, 1); ``alpha_t = alpha * gate``."""

    def __init__(self, config: GateConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = GateConfig(**config)
        self.config = config
        n = len(config.features)
        self.register_buffer("mean", torch.zeros(n))  # feature standardisation,
        self.register_buffer("std", torch.ones(n))    # set from the training data
        self.net = nn.Sequential(nn.Linear(n, config.hidden), nn.Tanh(),
                                 nn.Linear(config.hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.std
        return torch.sigmoid(self.net(z))[:, 0]

    @torch.inference_mode()
    def alpha(self, base_logits: torch.Tensor, dec_logp: torch.Tensor, scale: float = 1.0,
              vocab: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha_t (N,)`` for one or more steps: ``scale * gate(features)``.

        ``dec_logp`` and ``vocab`` as in ``gate_features`` (dense, or over ``vocab``).
        """
        feats = gate_features(base_logits.reshape(-1, base_logits.shape[-1]),
                              dec_logp.reshape(-1, dec_logp.shape[-1]), self.config.features,
                              vocab)
        return scale * self(feats.to(self.mean.device))


def mixture_nll(alpha, p_base, p_dec) -> torch.Tensor:
    """``-log((1 - alpha) p_base + alpha p_dec)`` per row (tensors, differentiable)."""
    return -torch.log(((1 - alpha) * p_base + alpha * p_dec).clamp_min(PROB_FLOOR))


def train_gate(domains: list[dict], *, features=FEATURES, hidden: int = 16,
               steps: int = 400, lr: float = 0.02, weight_decay: float = 1e-3,
               seed: int = 0, decoder=None, base_model_name: str | None = None,
               tokenizer=None) -> tuple[AlphaGate, dict]:
    """Fit a gate on ``domains``: one dict per domain with arrays ``features (N, F_all)``,
    ``p_base (N,)``, ``p_dec (N,)`` (from ``gate_inputs``).

    Full-batch AdamW on the mean mixture NLL of each domain, domains weighted
    equally (so a small off-domain set counts as much as a large in-domain
    one).  Returns the gate (eval mode) and ``{"loss": [...]}`` per step.
    """
    steps = check_int("steps", steps, 1, example=400)
    hidden = check_int("hidden", hidden, 1, example=16)
    seed = check_int("seed", seed, example=0)
    lr = check_float("lr", lr, example=0.02)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, example=1e-3)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}. Pass e.g. lr=0.02.")
    if (not isinstance(domains, (list, tuple)) or not domains
            or not all(isinstance(d, dict) for d in domains)):
        raise ValueError("train_gate needs at least one domain: a list of dicts from "
                         "gate_inputs(...) (one per domain: in-domain, off-domain); got "
                         f"{domains!r:.60}.")
    missing = [k for d in domains for k in ("features", "p_base", "p_dec") if k not in d]
    if missing:
        raise ValueError(f"each domain needs features, p_base and p_dec (gate_inputs "
                         f"returns them); missing {sorted(set(missing))}.")
    if any(len(d["p_base"]) == 0 for d in domains):
        raise ValueError("train_gate needs at least one domain, each with rows.")
    cols = [FEATURES.index(n) for n in features]
    config = GateConfig(features=list(features), hidden=hidden,
                        decoder_fingerprint=None if decoder is None
                        else decoder_fingerprint(decoder),
                        base_model_name=base_model_name,
                        tokenizer_fingerprint=None if tokenizer is None
                        else tokenizer_fingerprint(tokenizer))
    data = [(torch.as_tensor(np.asarray(d["features"])[:, cols], dtype=torch.float32),
             torch.as_tensor(d["p_base"], dtype=torch.float32),
             torch.as_tensor(d["p_dec"], dtype=torch.float32)) for d in domains]
    everything = torch.cat([x for x, _, _ in data])
    if not torch.isfinite(everything).all():
        raise ValueError("gate features contain NaN/inf; check the decoder's output.")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gate = AlphaGate(config)
    gate.mean.copy_(everything.mean(0))
    gate.std.copy_(everything.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    history = {"loss": []}
    for _ in range(steps):
        loss = sum(mixture_nll(gate(x), pb, pd).mean() for x, pb, pd in data) / len(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(loss.item())
    return gate.eval(), history


def gate_alpha(gate: AlphaGate, domain: dict) -> np.ndarray:
    """``alpha_t (N,)`` of ``gate`` on one domain's rows (``features (N, F_all)``
    as ``gate_inputs`` returns them; the gate picks its own columns)."""
    cols = [FEATURES.index(n) for n in gate.config.features]
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(domain["features"])[:, cols], dtype=torch.float32)
        return gate(x.to(gate.mean.device)).cpu().numpy()


def gate_loss(gate: AlphaGate, domains: list[dict]) -> float:
    """``train_gate``'s objective on other rows: each domain's mean mixture NLL
    (nats), the domains averaged.  Lower is better; notebook 04 chooses among
    gates with it on a validation split of their own."""
    losses = [mixture_nll(torch.as_tensor(gate_alpha(gate, d)),
                          torch.as_tensor(d["p_base"], dtype=torch.float32),
                          torch.as_tensor(d["p_dec"], dtype=torch.float32)).mean().item()
              for d in domains]
    return float(np.mean(losses))


def gate_inputs(model, decoder, keys, doc, values, chunk: int = 128,
                progress: bool = True) -> dict:
    """``features (N, F)``, ``p_base (N,)`` and ``p_dec (N,)`` of the true next tokens.

    ``keys``/``doc``/``values`` as in ``helpers.hidden.Extraction`` (or a
    ``HeldOut``).  Runs the base model's LM head and the decoder on ``chunk``
    rows at a time: the ``(chunk, 262144)`` distributions stay small.  The
    same as ``helpers.evaluation.score_rows`` without blend curves; call that
    instead when you also need the curves, so the head runs once.
    """
    from .evaluation import score_rows

    scores = score_rows(model, decoder, keys, doc, values, chunk=chunk, progress=progress,
                        desc="gate signals")
    return {k: scores[k] for k in ("features", "p_base", "p_dec")}


def token_gate_inputs(model, decoder, rows_like, chunk: int = 128,
                      progress: bool = True) -> dict:
    """``gate_inputs`` for a token-level decoder (notebook 06): ``rows_like`` is a
    ``HeldOut`` or an ``Extraction``, whose tokens the decoder reads
    (``helpers.evaluation.score_token_rows``)."""
    from .evaluation import score_token_rows

    scores = score_token_rows(model, decoder, rows_like, chunk=chunk, progress=progress,
                              desc="gate signals")
    return {k: scores[k] for k in ("features", "p_base", "p_dec")}


def save_gate(gate: AlphaGate, folder) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically)."""
    return save_checkpoint(gate, asdict(gate.config), folder)


def check_gate(gate: AlphaGate, decoder=None, base_model_name: str | None = None,
               tokenizer=None) -> None:
    """Raise ``GateMismatch`` unless ``gate`` was trained for this decoder and model."""
    c = gate.config
    checks = [("decoder", None if decoder is None else decoder_fingerprint(decoder),
               c.decoder_fingerprint),
              ("base model", base_model_name, c.base_model_name),
              ("tokenizer", None if tokenizer is None else tokenizer_fingerprint(tokenizer),
               c.tokenizer_fingerprint)]
    if decoder is not None and decoder.config.base_model_name and c.base_model_name:
        checks.append(("decoder's base model", decoder.config.base_model_name,
                       c.base_model_name))
    diffs = [f"the {name} is {here!r} here but {recorded!r} when the gate was trained"
             for name, here, recorded in checks
             if here is not None and recorded is not None and here != recorded]
    if decoder is not None and c.decoder_fingerprint is None:
        diffs.append("the gate does not record which decoder it was trained with (train_gate "
                     "was called without decoder=), so it cannot be checked against this one")
    if diffs:
        raise GateMismatch("this α gate was trained for another setup: " + "; ".join(diffs) +
                           f". Train a gate for this decoder in {gate_notebook(decoder)} "
                           "(helpers.gate.train_gate(..., decoder=decoder)), or load the "
                           "decoder it was trained with.")


def load_gate(folder, *, decoder=None, base_model_name: str | None = None,
              tokenizer=None) -> AlphaGate:
    """Load a gate (eval mode), refusing one trained for another decoder or model."""
    folder, where = Path(folder), gate_notebook(decoder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no α gate at {folder} (need config.json and "
                                f"model.safetensors). Train one in {where}, which saves "
                                "it there with save_gate(gate, folder).")
    advice = (f"delete {folder} and train the gate again in {where}, or save it with "
              "save_gate(gate, folder).")
    raw = read_json(folder / "config.json", advice, ("features",))
    known = {f.name for f in fields(GateConfig)}
    try:
        gate = AlphaGate(GateConfig(**{k: v for k, v in raw.items() if k in known}))
    except (TypeError, ValueError) as err:
        raise CorruptFile(f"{folder / 'config.json'} is not a valid α gate config ({err}); "
                          f"{advice}") from None
    load_weights(gate, folder / "model.safetensors", advice)
    check_gate(gate, decoder, base_model_name, tokenizer)
    return gate.eval()
