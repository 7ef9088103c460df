"""Is a volume open in QEMU?  QEMU (and qemu-img, qemu-io) hold open file
description locks on bytes 100-299 of every image they use: bytes 100+N for
the permissions they hold and 200+N for those they do not share.  Asking
for a write lock on that range with F_OFD_GETLK finds any of them without
taking a lock ourselves."""

import fcntl
import os
import struct

QEMU_LOCK_START = 100
QEMU_LOCK_LENGTH = 200
_FLOCK = "hhqqi4x"   # struct flock on Linux x86-64 and aarch64


def held_by_qemu(path):
    """True if another process holds QEMU's image locks on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, QEMU_LOCK_START,
                            QEMU_LOCK_LENGTH, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)
