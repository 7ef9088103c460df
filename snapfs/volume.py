"""Volumes: one layer of a disk, qcow2 or raw, opened read-only and shared.

The manifest says which format a volume has; nothing here probes.
"""

import itertools
import os
import threading
from collections import OrderedDict

from .errors import CorruptImage, ImageError
from .qcow2 import Qcow2Image
from .qcow2.mapping import DATA

SECTOR = 512

# Decompressed clusters are kept because a sequential reader asks for a
# cluster in many small requests (128 KiB FUSE reads of a 2 MiB cluster).
COMPRESSED_CACHE_BYTES = 64 << 20


class RawVolume:
    """A raw base volume.  Its size is the file size rounded up to a sector,
    as QEMU reports it; bytes past the end of the file read as zeros."""

    format = "raw"

    def __init__(self, path):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        file_size = os.fstat(self.fd).st_size
        self.size = -(-file_size // SECTOR) * SECTOR
        self.backing_file = None
        self.backing_format = None

    def runs(self):
        return [(0, self.size, DATA, 0, 0)] if self.size else []

    def read_compressed(self, host, nbytes):  # pragma: no cover - raw has none
        raise CorruptImage(self.path, "raw volumes have no compressed clusters")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


class Qcow2Volume(Qcow2Image):
    format = "qcow2"

    @property
    def backing_file(self):
        return self.header.backing_file

    @property
    def backing_format(self):
        return self.header.backing_format


def open_volume(path, fmt):
    """Open ``path`` as ``fmt`` ("raw" or "qcow2").  Raises ImageError."""
    try:
        if fmt == "raw":
            return RawVolume(path)
        if fmt == "qcow2":
            return Qcow2Volume(path)
    except FileNotFoundError:
        raise ImageError(path, "volume file is missing") from None
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    raise ImageError(path, f"unknown volume format {fmt!r}")


_tokens = itertools.count(1)


class ClusterCache:
    """Bounded LRU of decompressed clusters, keyed by (open volume, host offset).

    Thread-safe: reads run in worker threads.
    """

    def __init__(self, capacity=COMPRESSED_CACHE_BYTES):
        self.capacity = capacity
        self.used = 0
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def peek(self, volume, host):
        """The cached cluster, or None; never reads."""
        # Keyed by the open volume, not its path: a merge may rewrite a file
        # under the same name.
        key = (volume.token, host)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def get(self, volume, host, nbytes):
        data = self.peek(volume, host)
        if data is not None:
            return data
        key = (volume.token, host)
        data = volume.read_compressed(host, nbytes)
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self.used += len(data)
                while self.used > self.capacity and self._items:
                    _, old = self._items.popitem(last=False)
                    self.used -= len(old)
        return data


class VolumePool:
    """Opens each volume file once, however many chains share it, and keeps
    its runs (a volume that belongs to a snapshot never changes)."""

    def __init__(self):
        self._volumes = {}
        self._runs = {}
        self._lock = threading.Lock()
        self.clusters = ClusterCache()

    def get(self, path, fmt):
        key = str(path)
        with self._lock:
            vol = self._volumes.get(key)
            if vol is None:
                vol = open_volume(key, fmt)
                vol.token = next(_tokens)
                self._volumes[key] = vol
            return vol

    def runs(self, volume):
        runs = self._runs.get(volume.path)
        if runs is None:
            runs = volume.runs()
            self._runs[volume.path] = runs
        return runs

    def forget(self, directory):
        """Drop the volumes under ``directory``: they changed on disk.  Chains
        that still hold them keep reading; each file closes with its last user."""
        prefix = os.path.join(directory, "")
        with self._lock:
            for path in [p for p in self._volumes if p.startswith(prefix)]:
                del self._volumes[path]
                self._runs.pop(path, None)

    def close(self):
        with self._lock:
            for vol in self._volumes.values():
                vol.close()
            self._volumes.clear()
            self._runs.clear()
