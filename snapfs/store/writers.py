"""Open a volume for writing, whatever its format."""

import ctypes
import ctypes.util
import os

from ..qcow2.filerange import FileRange, write_all
from ..qcow2.writer import Qcow2Writer
from .faults import crashpoint
from .volume import device_size

_ZERO_CHUNK = bytes(1 << 20)


class RawWriter:
    """A raw volume written in place: a raw base a merge writes into, or
    the volume of a shareable disk or a direct LUN (``block``: it must be a
    block device)."""

    def __init__(self, path, block=False):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.size = device_size(self.fd, path, block)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data):
        write_all(self.fd, data, offset)

    def copy_from(self, offset, fd, source_offset, length):
        """Write ``length`` bytes of the open file ``fd`` from ``source_offset``
        at ``offset``, copied by the kernel.  Raises OSError."""
        FileRange(fd, source_offset, length).copy_to(self.fd, offset)

    def write_zeroes(self, offset, length):
        # Punching a hole keeps the file sparse; fall back to writing zeros.
        try:
            _punch_hole(self.fd, offset, length)
        except OSError:
            while length:
                n = min(length, len(_ZERO_CHUNK))
                self.write(offset, _ZERO_CHUNK[:n])
                offset, length = offset + n, length - n

    def flush(self):
        os.fdatasync(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd, offset, length):
    """fallocate(PUNCH_HOLE): Python's os module does not offer it."""
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                       ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_writer(path, fmt, below=None):
    """A writer for a merge; the qcow2 writer's ordering points are crash
    points too, so fault injection lands inside its writes."""
    if fmt in ("raw", "block"):
        return RawWriter(path, block=fmt == "block")
    return Qcow2Writer(path, below=below, on_step=lambda step: crashpoint(f"write:{step}"))
