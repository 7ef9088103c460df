"""Validation of VM, disk and snapshot names (DESIGN.md section 2)."""

import re

from ..errors import InvalidName, NameTooLong

MAX_NAME_BYTES = 255
RESERVED_SNAPSHOT_NAMES = {"latest"}   # the symlink to the newest snapshot
_PARTITION_SUFFIX = re.compile(r"-part\d+$")
# Control characters (a newline would split `vm list` and the log; a tab
# the snapshot listing) are never part of a name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name, what="name"):
    """A path component of valid UTF-8: non-empty, no '/', no control
    character, not '.' or '..', at most 255 bytes.  Raises InvalidName
    (EINVAL), or NameTooLong (ENAMETOOLONG).

    Names come from the kernel and from argv as str with surrogate escapes
    for bytes that are not UTF-8; such a name could not be written to the
    manifest (JSON) or listed again, so it is refused here, before anything
    is written."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"invalid {what}: empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"invalid {what} {name!r}: not valid UTF-8") from None
    if "/" in name or _CONTROL.search(name):
        raise InvalidName(f"invalid {what} {name!r}: contains '/' or a control character")
    if name in (".", ".."):
        raise InvalidName(f"invalid {what} {name!r}")
    if len(encoded) > MAX_NAME_BYTES:
        raise NameTooLong(f"invalid {what}: longer than {MAX_NAME_BYTES} bytes")
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
    if _PARTITION_SUFFIX.search(name) or name.endswith(".raw"):
        raise InvalidName(f"invalid disk name {name!r}: clashes with partition or view names")
    return name


MAX_DESCRIPTION_BYTES = 1024


def check_description(text):
    """A snapshot's description: one line of UTF-8 text, at most 1 KiB.
    Raises InvalidName (EINVAL)."""
    if not isinstance(text, str):
        raise InvalidName("invalid description")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("invalid description: not valid UTF-8") from None
    if len(encoded) > MAX_DESCRIPTION_BYTES:
        raise InvalidName(f"invalid description: longer than {MAX_DESCRIPTION_BYTES} bytes")
    if _CONTROL.search(text):
        raise InvalidName("invalid description: contains a control character (one line only)")
    return text
