"""Faster CPU forward passes for key extraction: same model, same function.

Explained in ``notebooks/01_hidden_states.ipynb``; measured by
``benchmarks/bench_fastpath.py`` (each part) and
``benchmarks/bench_extraction.py`` (the whole).  ``helpers.hidden.extract_keys`` uses all
three through ``fast_forward``; each also stands alone:

* ``freed_memory_kept``: glibc keeps big freed blocks instead of unmapping
  them, so the next batch does not fault the same memory in again (CPU
  only, and only inside the ``with`` block).
* ``sigmoid_gelu``: the tanh-GELU written through a sigmoid (PyTorch's CPU
  ``tanh`` is slow).
* ``causal_blocks``: causal attention that never computes the scores a causal
  mask would throw away.

Each one falls back to the library's own code wherever it does not apply.
"""

from __future__ import annotations

import ctypes
import math
import platform
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # the ceiling of glibc's dynamic mmap threshold (64-bit)


def _glibc():
    """The C library for ``mallopt``, or None where it is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory(mmap_mb: int = 32, trim_mb: int = 256) -> bool:
    """Stop glibc from handing big freed blocks back to the OS at once.

    By default glibc serves a block of 16 MB or more (one 8 x 256 x 2048
    float32 MLP activation of Gemma 3 270M) with a fresh ``mmap`` and unmaps
    it on free, so the next batch faults the same memory in again, 4 KB at a
    time: 23,000-210,000 page faults per forward pass of 8 x 256 tokens in
    three runs of ``benchmarks/bench_fastpath.py`` here, up to 11 % of its
    time, varying from run to run.  This raises glibc's mmap threshold to ``mmap_mb`` (32 MB
    is its maximum) and lets up to ``trim_mb`` of free memory stay at the top
    of the heap.  The settings last for the rest of the process (glibc has no
    way to read them back); :func:`freed_memory_kept` keeps the 256 MB to a
    block and leaves glibc's own steady state after it.  Returns False,
    changing nothing, where the C library is not glibc (macOS, Windows, musl).
    """
    libc = _glibc()
    return libc is not None and (libc.mallopt(M_MMAP_THRESHOLD, mmap_mb << 20) == 1
                                 and libc.mallopt(M_TRIM_THRESHOLD, trim_mb << 20) == 1)


def restore_malloc_defaults() -> bool:
    """Undo :func:`keep_freed_memory`: hand the kept memory back, keep no more than glibc would.

    glibc cannot go back to its own dynamic mode once ``mallopt`` has set a
    threshold, so this sets the state that mode reaches by itself in any process
    that has freed a large block (every PyTorch workload here): blocks below
    32 MB from the heap, up to twice that kept free at its top.  Then
    ``malloc_trim`` returns the rest.  An earlier version set both thresholds
    back to their starting 128 KiB instead; glibc then no longer raised them, so
    every later block over 128 KiB was mapped afresh and faulted in page by page,
    and ``W = 4`` decoder training after a key extraction in the same process
    ran at 382-388 samples/s against 424-440 before it (one A/B run on 2 cores;
    490-493 against 455-495 with this version).  ``tests/test_fastpath.py`` pins
    both halves.  Returns False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = (libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX) == 1)
    libc.malloc_trim(0)
    return ok


@contextmanager
def freed_memory_kept():
    """:func:`keep_freed_memory` for the body of a ``with`` block only.

    ``extract_keys`` runs inside it, so a Jupyter kernel, Voila or a test
    session does not keep up to 256 MB of freed memory after key extraction;
    see :func:`restore_malloc_defaults` for what differs from a fresh process.
    """
    changed = keep_freed_memory()
    try:
        yield changed
    finally:
        if changed:
            restore_malloc_defaults()


class SigmoidGELU(nn.Module):
    """The tanh-approximate GELU, computed through a sigmoid.

    ``0.5 * (1 + tanh(z)) == sigmoid(2 * z)``, so
    ``gelu_tanh(x) = x * sigmoid(2c * (x + 0.044715 * x**3))`` with
    ``c = sqrt(2 / pi)``: the same function as
    ``F.gelu(x, approximate="tanh")``, equal to float rounding.  It is faster
    on a CPU because PyTorch's vectorised ``tanh`` costs about 3.5 sigmoids:
    4.0 ms instead of 12.5 ms for one Gemma 3 270M MLP activation of 8 x 256
    tokens (2 cores, ``bench_fastpath.py``).  Elsewhere it calls ``F.gelu``: with gradients on (the
    in-place steps would break autograd), on a GPU (where ``F.gelu`` is one
    fast kernel) and in bf16/fp16 (where ``F.gelu`` computes in float32 and
    rounds once, and these five steps would each round).
    """

    C = 2 * math.sqrt(2 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or not _cpu_float32(x):
            return nn.functional.gelu(x, approximate="tanh")
        u = torch.addcmul(x.new_tensor(self.C), x, x, value=self.C * 0.044715)
        return u.mul_(x).sigmoid_().mul_(x)


def _cpu_float32(x: torch.Tensor) -> bool:
    """Float32 on a CPU, outside autocast (which would run matmuls in bf16)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def _is_tanh_gelu(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return module.approximate == "tanh"
    try:  # transformers' GELUTanh ("gelu_pytorch_tanh": Gemma, Gemma 2, Gemma 3)
        from transformers.activations import GELUTanh
    except ImportError:  # older transformers
        return False
    act = getattr(module, "act", None)
    return (isinstance(module, GELUTanh) and getattr(act, "func", None) is nn.functional.gelu
            and act.keywords == {"approximate": "tanh"})


@contextmanager
def sigmoid_gelu(model):
    """Inside the block, ``model``'s tanh-GELU modules are ``SigmoidGELU``.

    The model computes the same function, faster on a CPU; other activations
    are left alone, and the original modules are back when the block ends.
    """
    swapped = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if _is_tanh_gelu(child)]
    for parent, name, _ in swapped:
        setattr(parent, name, SigmoidGELU())
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def causal_block_attention(module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, block: int = 64,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """Causal self-attention that skips the scores a causal mask would zero.

    A transformers attention function: ``query (B, H, T, D)``,
    ``key``/``value (B, Hk, T, D)`` with ``H`` a multiple of ``Hk``
    (grouped-query attention; Gemma 3 270M has 4 query heads and 1 key/value
    head).  Returns ``(B, T, H, D)`` and no weights.

    Query positions are cut into blocks of ``block``; the block ending at
    position ``e`` only multiplies against keys ``[0, e)``.  The query heads
    that share a key head are stacked into one matrix, so each block is two
    ordinary matmuls and a softmax.  For ``T = 256`` and blocks of 64 that is
    62.5 % of the full ``T x T`` work.  PyTorch's CPU flash kernel gains
    little from ``is_causal=True``: for 8 x 256 tokens of Gemma 3 270M it
    takes 14.2 ms, this 11.2 ms (``bench_fastpath.py``).

    Anything else -- a GPU, a dtype other than float32 or autocast (SDPA's
    fused kernels are the better choice there), a mask (padding, or a sliding
    window shorter than the text), a KV cache, dropout, logit soft-capping,
    attention sinks, a model that is not causal -- goes to transformers' own
    SDPA function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, T, D = query.shape
    Hk = key.shape[1]
    if (attention_mask is not None or key.shape[2] != T or T <= block or not _cpu_float32(query)
            or (dropout and module.training) or not getattr(module, "is_causal", True)
            or (sliding_window is not None and sliding_window < T)
            or H % Hk or any(kwargs.get(k) is not None
                             for k in ("softcap", "s_aux", "sinks", "position_bias"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    g = H // Hk
    scaling = D ** -0.5 if scaling is None else scaling
    # rows (t, head) for each key head: (B, Hk, T * g, D)
    q = query.view(B, Hk, g, T, D).transpose(2, 3).reshape(B, Hk, T * g, D)
    key_t = key.transpose(2, 3)
    out = query.new_empty(B, Hk, T * g, D)
    t_of_row = torch.arange(T, device=query.device).repeat_interleave(g)
    positions = torch.arange(T, device=query.device)
    for start in range(0, T, block):
        end = min(T, start + block)
        rows = slice(start * g, end * g)
        scores = torch.matmul(q[:, :, rows], key_t[..., :end]).mul_(scaling)
        future = positions[:end] > t_of_row[rows, None]  # key after the query's position
        scores.masked_fill_(future, float("-inf"))
        torch.matmul(scores.softmax(-1), value[:, :, :end], out=out[:, :, rows])
    out = out.view(B, Hk, T, g, D).permute(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return out, None


_NAME = "memdec_causal_blocks"


@contextmanager
def causal_blocks(model):
    """Inside the block, ``model`` attends with ``causal_block_attention``.

    Only a model set to transformers' ``"sdpa"`` attention switches; it gets
    SDPA's masks, so where SDPA would have needed a mask it still runs SDPA.
    Older transformers without attention registries change nothing.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        yield False
        return
    configs = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"]
    if not configs:
        yield False
        return
    AttentionInterface.register(_NAME, causal_block_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, sdpa_mask)
    # the internal field: the public setter would also switch sub-configs
    # (a vision tower, say) that were not using SDPA
    field = "_attn_implementation_internal"
    for c in configs:
        setattr(c, field, _NAME)
    try:
        yield True
    finally:
        for c in configs:
            setattr(c, field, "sdpa")


def _configs(model):
    seen = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen[id(cfg)] = cfg
    return list(seen.values())


@contextmanager
def fast_forward(model, enabled: bool = True):
    """``freed_memory_kept``, ``sigmoid_gelu`` and ``causal_blocks`` at once.

    All three change nothing outside the ``with`` block.  The malloc setting is
    applied only for a model on the CPU (the GPU allocator is not malloc), and
    ``enabled=False`` changes nothing, for comparisons.
    """
    if not enabled:
        yield
        return
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    with (freed_memory_kept() if on_cpu else nullcontext()), sigmoid_gelu(model), \
            causal_blocks(model):
        yield
