"""The checks of one configuration value, and the error they raise; a leaf module, so the mixers'
``check_config`` and ``hybrids.config`` share it without importing each other."""

from __future__ import annotations

import math


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field and the valid choices."""


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if lo is not None and hi is not None:
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if lo is not None:
    return f" {'>' if lo_open else '≥'} {lo}"
  if hi is not None:
    return f" {'<' if hi_open else '≤'} {hi}"
  return ""


def check_int(value, field: str, lo: int | None = None, hi: int | None = None, note: str = "") -> None:
  """``ConfigError`` unless ``value`` is an int (not a bool) in ``[lo, hi]``; ``note`` explains the field."""
  ok = isinstance(value, int) and not isinstance(value, bool)
  if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
    return
  what = "a positive integer" if lo == 1 and hi is None else "an integer" + _bounds(lo, hi, False, False)
  raise ConfigError(f"{field}={value!r} must be {what}{note}")


def check_number(value, field: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, note: str = "") -> None:
  """``ConfigError`` unless ``value`` is a finite int or float (not a bool, NaN or ∞) within the bounds."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and (lo is None or (value > lo if lo_open else value >= lo)) and (
      hi is None or (value < hi if hi_open else value <= hi)):
    return
  raise ConfigError(f"{field}={value!r} must be a finite number{_bounds(lo, hi, lo_open, hi_open)}{note}")


def check_choice(value, field: str, valid) -> None:
  if not isinstance(value, str) or value not in valid:
    raise ConfigError(f"{field}={value!r}; valid: {', '.join(valid)}")
