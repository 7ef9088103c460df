"""An open qcow2 image: validated header, runs and compressed clusters."""

import os

from ..errors import CorruptImage
from .compress import decompress_cluster
from .header import read_header
from .mapping import image_runs
from .snapshots import read_snapshot_table


class Qcow2Image:
    """A qcow2 file opened read-only.  The header is validated on open.

    Raises CorruptImage / UnsupportedImage (from ``read_header``).
    """

    def __init__(self, path, fd=None):
        self.path = str(path)
        self.fd = fd if fd is not None else os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.header = read_header(self.fd, self.path)
        except BaseException:
            self.close()
            raise

    def close(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def size(self):
        return self.header.size

    def runs(self):
        return image_runs(self.fd, self.header)

    def internal_snapshots(self):
        return read_snapshot_table(self.fd, self.header)

    def read_compressed(self, host, nbytes, length=None):
        """Decompress the cluster stored at ``host`` (``nbytes`` long): its
        first ``length`` bytes, or all of it."""
        data = os.pread(self.fd, nbytes, host)
        if not data:
            raise CorruptImage(self.path, f"compressed cluster at {host:#x} lies past the end of the file")
        return decompress_cluster(self.path, data, self.header.cluster_size,
                                  self.header.compression_type, length)
