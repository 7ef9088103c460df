"""Human sizes: '20G', '512M', '1.5T', '4096' (bytes)."""

import re

from ..errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
MAX_DISK_SIZE = 1 << 50   # 1 PiB


def looks_like_size(text):
    return bool(_SIZE.match(text))


def parse_size(text):
    """Bytes, rounded up to a 512-byte sector.  Raises InvalidArgument."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidArgument(f"invalid size {text!r} (use e.g. 20G, 512M, 4096)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    size = -(-int(value) // 512) * 512
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be more than 0")
    if size > MAX_DISK_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: larger than 1 PiB")
    return size


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
