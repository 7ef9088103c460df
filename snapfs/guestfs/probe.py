"""Which filesystem a view holds, and the reader that serves it.

The first bytes decide (each format's magic number).  A format no reader
serves gives no tree and a reason for the log; one that a reader serves
but cannot open is an error (see ``open_guest_fs``).
"""

from __future__ import annotations

from . import ext, xfs


def open_guest_fs(read, size):
    """(GuestFs, None), or (None, why not) when the view holds no
    filesystem that snapfs reads.  A filesystem it reads but cannot show
    (damaged, or a journal or log it cannot replay) raises FsDamaged or
    Unsupported: that is worth telling the user, not just the log."""
    head = read(0, 4096)
    if ext.is_ext(read):
        return ext.ExtGuestFs(read, size), None
    if xfs.is_xfs(read):
        return xfs.XfsGuestFs(read, size), None
    return None, _unknown(head)


def _unknown(head):
    if head[3:11] == b"NTFS    ":
        return "NTFS: no reader for it"
    if head[510:512] == b"\x55\xaa" and head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16"):
        return "FAT: no reader for it"
    if not any(head):
        return "no filesystem (the first 4 KiB are zeros)"
    return "no filesystem snapfs can read"
