"""Sizes and rates from the command line and plan files: parsed once, bounded before anything is made.

A data-path module (no host stack): `blockmig copy` parses its sizes with it too.

Bounds, and why:
- a chunk is a positive multiple of 4096 (and of the volume's logical block size), at most 256 MiB:
  Linux caps one write at 2 GiB - 4 KiB (0x7ffff000), so a larger chunk could never be written, and the
  read-ahead maps at least two chunks (readahead.default_depth): 512 MiB per volume at the cap, the most a
  plan's few parallel volumes should cost; the copy rate stops growing at a few MiB (README, Benchmarks).
- `--max-rate` is at least 1 MiB/s: it is read as bytes per second, so `--max-rate 100` (100 B/s) would
  hold a fenced host for about 12 hours per 4 MiB chunk; a typo must be refused, not obeyed, and a rate
  below one byte (0.5) must not silently mean "no throttle".
- any size is a whole number of bytes up to 1 EiB (no inf, nan, exponents or negative numbers).
"""

from __future__ import annotations

import re

SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 1 << 60
CHUNK_ALIGNMENT = 4096
MAX_CHUNK_SIZE = 256 << 20
MIN_MAX_RATE = 1 << 20
_SIZE = re.compile(r"(\d{1,20})(?:\.(\d{1,20}))?\s*([KMGT]?)(?:I?B)?", re.IGNORECASE | re.ASCII)
_EXAMPLES = "use e.g. 4M, 512K, 1G"


def parse_size(text: str | int) -> int:
    """'4M' -> 4194304 (binary suffixes K, M, G, T; a trailing 'iB' or 'B' is accepted); ints pass.

    ValueError (one line) for anything that is not a positive whole number of bytes up to 1 EiB.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        found = _SIZE.fullmatch(text.strip())
        if found is None:
            raise ValueError(f"not a size: {text!r} ({_EXAMPLES})")
        whole, fraction, suffix = found.group(1), found.group(2) or "", found.group(3).upper()
        scaled = int(whole + fraction) * SUFFIXES[suffix]  # exact: "1.5K" is 15 * 1024 / 10
        value, remainder = divmod(scaled, 10 ** len(fraction))
        if remainder:
            raise ValueError(f"not a whole number of bytes: {text!r}")
    else:
        raise ValueError(f"not a size: {text!r} ({_EXAMPLES})")
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    if value > MAX_SIZE:
        raise ValueError(f"size too large: {text!r} (at most 1 EiB)")
    return value


def parse_chunk_size(text: str | int, block_size: int | None = None) -> int:
    """A chunk length: a positive multiple of 4096 (and of `block_size`), at most 256 MiB."""
    size = parse_size(text)
    if size % CHUNK_ALIGNMENT:
        raise ValueError(f"chunk size {size} is not a multiple of {CHUNK_ALIGNMENT}")
    if size > MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk size {size} is larger than {MAX_CHUNK_SIZE} (256M), the most one chunk may be"
        )
    if block_size and size % block_size:
        raise ValueError(f"chunk size {size} is not a multiple of the volume's block size {block_size}")
    return size


def parse_max_rate(text: str | int) -> int:
    """A throttle in bytes per second, at least 1 MiB/s."""
    rate = parse_size(text)
    if rate < MIN_MAX_RATE:
        raise ValueError(f"max rate {rate} bytes/s is below the minimum of {MIN_MAX_RATE} (1M per second)")
    return rate
