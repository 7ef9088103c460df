"""Validation of VM, disk and snapshot names (DESIGN.md section 2)."""

import re

from .errors import InvalidName

MAX_NAME_BYTES = 255
RESERVED_SNAPSHOT_NAMES = {"latest"}   # the symlink to the newest snapshot
_PARTITION_SUFFIX = re.compile(r"-part\d+$")


def check_name(name, what="name"):
    """A path component: non-empty, no '/', no NUL, not '.' or '..', <= 255 bytes."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"invalid {what}: empty")
    if "/" in name or "\0" in name:
        raise InvalidName(f"invalid {what} {name!r}: contains '/' or NUL")
    if name in (".", ".."):
        raise InvalidName(f"invalid {what} {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise InvalidName(f"invalid {what}: longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("."):
        # Hidden names are kept for the store's own temporary files.
        raise InvalidName(f"invalid {what} {name!r}: must not start with '.'")
    return name


def check_snapshot_name(name):
    check_name(name, "snapshot name")
    if name in RESERVED_SNAPSHOT_NAMES:
        raise InvalidName(f"invalid snapshot name {name!r}: reserved")
    return name


def check_disk_name(name):
    check_name(name, "disk name")
    if _PARTITION_SUFFIX.search(name) or name.endswith(".raw") or "\n" in name:
        raise InvalidName(f"invalid disk name {name!r}: clashes with partition or view names")
    return name
