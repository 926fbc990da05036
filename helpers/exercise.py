"""How an exercise check reports: one line, never a stack trace.

Used by ``helpers/checks.py``.  A check raises ``Failed("expected ..., got
...")``; ``exercise`` prints it as one "failed: ..." line (or "passed") and
returns a bool.  ``NotImplementedError`` goes through, so the notebook's stub
cell can say "not implemented yet".
"""

from __future__ import annotations

import functools

import numpy as np
import torch


class Failed(Exception):
    """One line for the learner: what was expected, what came back."""


def exercise(check):
    """Turn a check's ``Failed``/exceptions into one printed line and a bool."""
    @functools.wraps(check)
    def run(fn) -> bool:
        try:
            check(fn)
        except Failed as err:
            print(f"failed: {err}")
            return False
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 - an answer the comparison cannot read
            print(f"failed: could not compare your answer ({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})")
            return False
        print("passed")
        return True
    return run


def call(fn, *args):
    """``fn(*args)``; an exception (other than NotImplementedError) becomes one line."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's code may raise anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise Failed(f"your function raised {type(err).__name__}: {first}") from None


def describe(x) -> str:
    """``float32 tensor of shape (5, 3) on cpu`` and the like."""
    if torch.is_tensor(x):
        return f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)} " \
               f"on {x.device.type}"
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return f"{type(x).__name__} {x!r}"[:80]


def expect_tensor(got, what: str, shape, device=None, floating: bool | None = None):
    """A tensor of ``shape`` (on ``device``; float or integer) with no NaN."""
    want = (f"{'a floating' if floating else 'an integer' if floating is False else 'a'} "
            f"tensor of shape {tuple(shape)}" + (f" on {device.type}" if device else ""))
    if not torch.is_tensor(got):
        raise Failed(f"{what}: expected {want}; got {describe(got)}")
    if (tuple(got.shape) != tuple(shape) or (device is not None and got.device != device)
            or (floating is not None and got.is_floating_point() != floating)):
        raise Failed(f"{what}: expected {want}; got {describe(got)}")
    if got.is_floating_point() and torch.isnan(got).any():
        raise Failed(f"{what}: expected no NaN; got {int(torch.isnan(got).sum())} NaN "
                      "entries")


def expect_number(got, what: str) -> float:
    """A finite Python/numpy/0-d tensor number."""
    if torch.is_tensor(got) or isinstance(got, np.ndarray):
        if got.ndim != 0 and tuple(got.shape) != (1,):
            raise Failed(f"{what}: expected one number; got {describe(got)}")
        got = got.reshape(()).item()
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, float, np.number)):
        raise Failed(f"{what}: expected one number; got {describe(got)}")
    got = float(got)
    if got != got:
        raise Failed(f"{what}: expected a finite number; got NaN")
    return got
