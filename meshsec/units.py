"""Durations and sizes as written in the agent's YAML config and the controller's
inventory (``30s``, ``15m``, ``10G``, ``1Gi``), parsed by one set of rules for both sides.

Pure module: imports neither ``agent`` nor ``controller``. Errors are ValueError naming
the value and the accepted forms; callers add the file, line and key.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

from meshsec.defaults import MAX_LIFETIME_VOLUME

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?$", re.IGNORECASE)
_SIZE_EXP = {"k": 1, "m": 2, "g": 3, "t": 4}
_NOT_A_COUNT = "is not a count; write a whole number or e.g. 64k, 500M, 10G, 1Gi"


def parse_duration(value: str | int | float) -> float:
    """``"90"``, ``"30s"``, ``"15m"``, ``"4h"``, ``"1d"``, ``"1.5h"`` or a number -> seconds (float).

    Raises ValueError for anything else, a negative value or one too large to be finite."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        try:
            secs = float(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too large for a duration") from None
        if not math.isfinite(secs):
            raise ValueError(f"{value!r} is not a finite number of seconds")
    else:
        m = _DURATION.match(str(value).strip().lower())
        if not m:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 15m, 4h or 1d")
        secs = float(m.group(1)) * _UNITS[m.group(2)]
        if not math.isfinite(secs):
            raise ValueError(f"{value!r} is too large for a duration")
    if secs < 0:
        raise ValueError(f"{value!r} is negative; give a non-negative time such as 30s, 15m, 4h")
    return secs


def parse_size(value: str | int) -> int:
    """A byte or packet count: an integer, or a number with a suffix ``k``, ``M``, ``G``, ``T``
    (decimal: 1000^n, as in 10G = 10 000 000 000) or ``Ki``, ``Mi``, ``Gi``, ``Ti`` (binary:
    1024^n), case-insensitive, an optional trailing ``B`` (``64k``, ``500M``, ``1.5GiB``).
    Fractions are rounded down to a whole count. Raises ValueError for anything else, a
    negative value or one above 2^64 - 1."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"{value!r} {_NOT_A_COUNT}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value).strip())
        if not m:
            raise ValueError(f"{value!r} {_NOT_A_COUNT}")
        num, prefix, binary = m.groups()
        if "." in num and not prefix:
            raise ValueError(f"{value!r} is not a whole number")
        base = 1024 if binary else 1000
        n = int(Fraction(num) * base ** _SIZE_EXP[prefix.lower()]) if prefix else int(num)
    if n < 0:
        raise ValueError(f"{value!r} is negative")
    if n > MAX_LIFETIME_VOLUME:
        raise ValueError(f"{value!r} is more than 2^64 - 1")
    return n
