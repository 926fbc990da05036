"""Argument checks shared by the public helpers: say what was expected, and what came.

Used by every notebook's helpers: a wrong type (``temperature="0.7"``,
``max_new_tokens=2.5``) gets a sentence naming the argument, the value and
an example of what works, instead of a ``TypeError`` from deep inside torch.
"""

from __future__ import annotations

import math
import numbers


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``ValueError`` too, so callers that catch
    bad values catch it)."""


def _got(value) -> str:
    shown = repr(value)
    return f"{shown[:60]}{'...' if len(shown) > 60 else ''} ({type(value).__name__})"


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None,
              example: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``, or ``ValueError``/``TypeError``."""
    value = _scalar(value)
    example = (1 if minimum is None else minimum) if example is None else example
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or (isinstance(value, float) and not value.is_integer())
            or (isinstance(value, numbers.Real) and not math.isfinite(value))):
        raise ArgumentTypeError(f"{name} must be a whole number; got {_got(value)}. Pass an "
                                f"int such as {name}={example}.")
    value = int(value)
    _check_range(name, value, minimum, maximum)
    return value


def check_float(name: str, value, minimum: float | None = None,
                maximum: float | None = None, example: float | None = None) -> float:
    """``value`` as a finite ``float`` in ``[minimum, maximum]``."""
    value = _scalar(value)
    example = (0.5 if minimum is None else minimum) if example is None else example
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number; got {_got(value)}. Pass a float "
                                f"such as {name}={example} (no quotes).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}. Pass one such as "
                         f"{name}={example}.")
    _check_range(name, value, minimum, maximum)
    return value


def check_str(name: str, value, example: str = "", allow_empty: bool = False) -> str:
    """``value`` if it is a (non-empty) ``str``; bytes get a hint to decode them."""
    if isinstance(value, (bytes, bytearray)):
        raise ArgumentTypeError(f"{name} must be text (str), not bytes; got {_got(value)}. "
                                f"Decode it first: {name}.decode('utf-8').")
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str; got {_got(value)}. Pass text"
                                f"{f' such as {name}={example!r}' if example else ''}.")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty; pass some text"
                         f"{f' such as {name}={example!r}' if example else ''}.")
    return value


def _scalar(value):
    """A 0-d tensor or array (``torch.tensor(0.5)``) as the Python number it holds."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _check_range(name, value, minimum, maximum) -> None:
    low = minimum is not None and value < minimum
    high = maximum is not None and value > maximum
    if low or high:
        span = (f"between {minimum} and {maximum}" if minimum is not None
                and maximum is not None else f">= {minimum}" if minimum is not None
                else f"<= {maximum}")
        raise ValueError(f"{name} must be {span}; got {value}. Pass a value {span}.")
