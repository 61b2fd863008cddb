"""Checks of config values that name the key: values torch refuses only deep inside (a zero or negative size), or
never (``bool("no")`` is True), are refused when the data and model are built, before the run folder gets its
``config.yaml``."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool: ``true`` would pass as 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_flag(key: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming ``key`` (a string such as 'off' would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")
    return value


def check_count(key: str, value: Any, hint: str = "") -> int:
    """``value`` if it is a whole number >= 1 (not a bool, a float or a string), else ``ValueError`` naming ``key``."""
    if type(value) is not int or value < 1:
        raise ValueError(f"{key}={value!r} must be a whole number >= 1{hint}")
    return value
