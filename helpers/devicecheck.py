"""A pretend GPU on the CPU: catches code that would mix devices on a real one.

Used by the tests and by ``scripts/gpu_check.py --fake-gpu``; the device
convention it checks is explained in ``notebooks/01_hidden_states.ipynb``:
inputs go to ``model.device``, results come back with ``.cpu()`` only where
numpy or FAISS need them.

Inside ``with fake_gpu():`` PyTorch reports a CUDA GPU, ``model.to("cuda")``
and ``x.to(model.device)`` *mark* tensors as being on ``cuda:0`` (their data
stays on the CPU, so everything computes for real), marks spread to every
result computed from a marked tensor, and a marked tensor reports
``device == cuda:0``.  Then each mistake a real GPU would refuse raises
:class:`DeviceMixError` here too:

* an operation mixing a tensor on the GPU with one on the CPU (a CPU 0-dim
  tensor is allowed, as CUDA allows it): CPU ``input_ids`` passed to a model on
  the GPU, a decoder left on the CPU, ``gather`` with a CPU index;
* ``.numpy()`` / ``np.asarray`` of a GPU tensor (``.cpu()`` first);
* indexing a CPU tensor with a GPU index;
* sampling GPU probabilities with a CPU ``torch.Generator`` (and the reverse).

What it cannot see: work inside a single PyTorch call implemented in Python
(only that call's inputs are checked), kernels and numerics (bf16 on a CPU is
not bf16 on a GPU), memory (an out-of-memory on a T4), speed, FAISS's own GPU
code (faiss still sees no GPU), ``torch.save`` files that record ``cuda``
(the marks are not saved), and code that asks ``torch.cuda`` for anything
beyond availability, seeds, RNG state, memory counters and the device name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

GPU = torch.device("cuda", 0)
_T = torch._C.TensorBase


class DeviceMixError(RuntimeError):
    """Code mixed devices in a way a real GPU refuses; the message says what to move."""


def _is_gpu(device) -> bool | None:
    """True for a CUDA device, False for the CPU, None when ``device`` is not a device."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        try:
            return torch.device(device).type == "cuda"
        except RuntimeError:
            return None
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # .to(0): a CUDA device index
    return None


class _FakeCudaGenerator(torch.Generator):
    """A CPU generator that says it belongs to ``cuda:0``."""

    def __new__(cls, device="cpu"):
        gen = torch._C.Generator.__new__(cls, device="cpu")
        gen.on_gpu = bool(_is_gpu(device))
        return gen

    @property
    def device(self):
        return GPU if self.on_gpu else torch.device("cpu")


class FakeGPU(TorchFunctionMode):
    """The mode behind :func:`fake_gpu`: marks tensors on the pretend GPU and checks mixes."""

    _EXEMPT = {"to", "cpu", "cuda", "copy_", "new_tensor", "__repr__", "__format__", "__str__",
               "__len__", "__iter__", "tolist", "item", "__bool__", "__float__", "__int__",
               "__index__", "_has_compatible_shallow_copy_type", "is_same_size",
               "data_ptr", "untyped_storage", "__get__", "__set__"}

    def __init__(self):
        super().__init__()
        self.on = WeakTensorKeyDictionary()  # tensor -> True: lives on the pretend GPU
        self.paused = False

    def gpu(self, t) -> bool:
        return isinstance(t, _T) and t in self.on

    def _mark(self, out, on_gpu: bool):
        for t in tree_flatten(out)[0]:
            if isinstance(t, _T):
                if on_gpu:
                    self.on[t] = True
                else:
                    self.on.pop(t, None)
        return out

    def _move(self, t, on_gpu: bool, **kwargs):
        """``t`` on the CPU (really), marked for the pretend device; a copy when it moves."""
        out = _T.to(t, "cpu", **kwargs)
        if on_gpu != self.gpu(t) and out is t:
            out = out.clone()
        return self._mark(out, on_gpu)

    def _refuse(self, what: str):
        raise DeviceMixError(f"{what} (devicecheck: on a real GPU this line fails; move the "
                             "tensor with .to(model.device), or .cpu() before numpy/FAISS)")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.paused:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name == "__get__" and owner is _T.device:
            return GPU if self.gpu(args[0]) else torch.device("cpu")
        if name == "__get__" and owner is _T.is_cuda:
            return self.gpu(args[0])
        if name == "__get__" and owner is _T.is_cpu:
            return not self.gpu(args[0])
        if name == "__set__" and owner is _T.data:  # param.data = moved copy (Module.to)
            func(*args, **kwargs)
            return self._mark(args[0], self.gpu(args[1]))
        if name == "get_device":
            return 0 if self.gpu(args[0]) else -1
        if name in ("numpy", "__array__") and self.gpu(args[0]):
            self._refuse("can't convert cuda:0 device type tensor to numpy: call .cpu() first")
        if name in ("to", "cuda", "cpu") and isinstance(args[0], _T):
            return self._to(name, args, kwargs)
        target = None
        if "device" in kwargs:
            target = _is_gpu(kwargs["device"])
            if target is not None:
                kwargs["device"] = "cpu"
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, _T)]
        gens = [g for g in kwargs.values() if isinstance(g, torch._C.Generator)]
        self._check(name, args, tensors, gens)
        out = func(*args, **kwargs)
        if target is None:
            target = any(self.gpu(t) for t in tensors) if name not in ("numpy",) else False
        return self._mark(out, target)

    def _to(self, name, args, kwargs):
        t = args[0]
        if name == "cuda":
            return self._move(t, True, non_blocking=kwargs.get("non_blocking", False))
        if name == "cpu":
            return self._move(t, False)
        rest = list(args[1:])
        other = next((a for a in rest if isinstance(a, _T)), kwargs.pop("other", None))
        if other is not None:  # t.to(other): other's device and dtype
            return self._move(t, self.gpu(other), dtype=other.dtype)
        kwargs.pop("copy", None)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
        target = self.gpu(t) if device is None else device.type == "cuda"
        return self._move(t, target, dtype=dtype or t.dtype, non_blocking=non_blocking,
                          memory_format=memory_format or torch.preserve_format)

    def _check(self, name, args, tensors, gens):
        if name in self._EXEMPT or not tensors:
            return
        if name in ("__getitem__", "__setitem__"):
            base = args[0]
            index = [t for t in tree_flatten(args[1])[0] if isinstance(t, _T)]
            if not self.gpu(base) and any(self.gpu(i) for i in index):
                self._refuse("indexing a CPU tensor with a cuda:0 index")
            if name == "__setitem__" and isinstance(args[2], _T) and args[2].dim() > 0 \
                    and self.gpu(args[2]) != self.gpu(base):
                self._refuse("assigning a tensor of one device into a tensor of another")
            return
        on = [self.gpu(t) for t in tensors]
        if any(on) and not all(g or t.dim() == 0 for g, t in zip(on, tensors)):
            shapes = [f"{tuple(t.shape)} on {'cuda:0' if g else 'cpu'}"
                      for g, t in zip(on, tensors)]
            self._refuse(f"{name}: expected all tensors on the same device, got "
                         + ", ".join(shapes))
        for gen in gens:
            if getattr(gen, "on_gpu", False) != any(on):
                self._refuse(f"{name}: the generator is on "
                             f"{'cuda:0' if getattr(gen, 'on_gpu', False) else 'cpu'} but the "
                             f"tensors on {'cuda:0' if any(on) else 'cpu'}")


def _cuda_stand_ins(mode: FakeGPU) -> dict:
    """What ``torch.cuda`` answers while the pretend GPU is on."""
    return {"is_available": lambda: True, "device_count": lambda: 1,
            "current_device": lambda: 0, "synchronize": lambda *a, **k: None,
            "get_device_name": lambda *a, **k: "pretend GPU (helpers.devicecheck)",
            "get_device_capability": lambda *a, **k: (8, 0),
            "is_bf16_supported": lambda *a, **k: True,
            "manual_seed": lambda *a, **k: None, "manual_seed_all": lambda *a, **k: None,
            "get_rng_state": lambda *a, **k: torch.get_rng_state(),
            "set_rng_state": lambda *a, **k: None, "empty_cache": lambda: None,
            "memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
            "reset_peak_memory_stats": lambda *a, **k: None}


@contextlib.contextmanager
def fake_gpu() -> Iterator[FakeGPU]:
    """Pretend a CUDA GPU is present (see the module docstring); yields the mode.

    ``from_pretrained`` runs as without it (on the CPU, unchecked): loading is
    transformers' business; what the check is about starts at ``model.to``.
    """
    from transformers import PreTrainedModel

    mode = FakeGPU()
    saved = {k: getattr(torch.cuda, k) for k in _cuda_stand_ins(mode)}
    saved_gen = torch.Generator
    loader = PreTrainedModel.__dict__["from_pretrained"]

    def pretend(on: bool):
        for k, v in (_cuda_stand_ins(mode) if on else saved).items():
            setattr(torch.cuda, k, v)
        torch.Generator = _FakeCudaGenerator if on else saved_gen
        mode.paused = not on

    def from_pretrained(cls, *args, **kwargs):
        pretend(False)
        try:
            return loader.__func__(cls, *args, **kwargs)
        finally:
            pretend(True)

    # A CUDA build of PyTorch on a machine without a GPU would answer torch.accelerator's
    # questions with "cuda" (it asks torch.cuda.is_available) and then fail in C when, e.g.,
    # AdamW asks for the current stream.  Answer them as a CPU build does, so the check
    # behaves the same whichever build is installed.
    accel = getattr(torch, "accelerator", None)
    accel_saved = {k: getattr(accel, k) for k in ("current_accelerator", "is_available")
                   if accel is not None and hasattr(accel, k)}
    accel_cpu = {"current_accelerator": lambda *a, **k: None, "is_available": lambda: False}

    pretend(True)
    for k in accel_saved:
        setattr(accel, k, accel_cpu[k])
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        with mode:
            yield mode
    finally:
        PreTrainedModel.from_pretrained = loader
        for k, v in accel_saved.items():
            setattr(accel, k, v)
        pretend(False)
