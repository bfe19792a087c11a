"""Sizes as people type them: 4096, 4k, 64K, 1G (binary multiples)."""

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.I)


def parse_size(text):
    m = _RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4k, 64K, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n):
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
