"""Sizes as people write them ('4M', '512K'): for the data path's CLI and plan files; imports nothing."""

from __future__ import annotations

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'4M' -> 4194304 (binary suffixes K, M, G, T; a trailing 'iB' or 'B' is accepted); ints pass."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r} (use e.g. 4M, 512K, 1G)")
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in SIZE_SUFFIXES else ""
    try:
        number = float(value[: len(value) - len(suffix)])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4M, 512K, 1G)") from None
    if number <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(number * SIZE_SUFFIXES[suffix])
