"""Volumes: one layer of a disk, qcow2 or raw, opened read-only and shared.

The manifest says which format a volume has; nothing here probes.
"""

import itertools
import os
import stat
import threading
from collections import OrderedDict

from ..errors import CorruptImage, ImageError
from ..qcow2 import Qcow2Image
from ..qcow2 import structs as S
from ..qcow2.mapping import DATA, read_u64_table

SECTOR = 512

# Decompressed clusters are kept because a sequential reader asks for a
# cluster in many small requests (128 KiB FUSE reads of a 2 MiB cluster).
COMPRESSED_CACHE_BYTES = 64 << 20


class RawVolume:
    """A raw base volume.  Its size is the file size rounded up to a sector,
    as QEMU reports it; bytes past the end of the file read as zeros.  With
    ``block``, it must be a block device (a direct LUN), or the open fails."""

    format = "raw"

    def __init__(self, path, block=False):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            file_size = device_size(self.fd, self.path, block)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = -(-file_size // SECTOR) * SECTOR
        self.backing_file = None
        self.backing_format = None

    def runs(self):
        return [(0, self.size, DATA, 0, 0)] if self.size else []

    def defines_any(self, ranges):
        """A raw volume defines every byte up to its size."""
        return any(offset < self.size and length for offset, length in ranges)

    def read_compressed(self, host, nbytes):  # pragma: no cover - raw has none
        raise CorruptImage(self.path, "raw volumes have no compressed clusters")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


class Qcow2Volume(Qcow2Image):
    format = "qcow2"

    def defines_any(self, ranges):
        """Whether a read of any of ``ranges`` ((offset, length) pairs) would
        not fall through to the backing volume: some cluster there is
        allocated, zeroed or compressed.

        Reads only the L1 and L2 entries of those clusters, not whole
        tables (``runs`` costs ~0.5 ms of CPU a volume).  It errs towards
        True: an entry it cannot trust (a table past the end of the file, a
        flag without an offset) counts as defining, and the caller then
        reads through the chain, which reports the damage.  Raises OSError.
        """
        hdr = self.header
        cs, per_l2 = hdr.cluster_size, hdr.l2_entries
        words = hdr.l2_entry_size // 8
        for offset, length in ranges:
            end = min(offset + length, hdr.size)
            if end <= offset:
                continue
            first, last = offset // cs, (end - 1) // cs
            while first <= last:
                l1_index, l2_index = divmod(first, per_l2)
                count = min(last - first + 1, per_l2 - l2_index)
                if self._l2_entries_nonzero(l1_index, l2_index, count, words):
                    return True
                first += count
        return False

    def _l2_entries_nonzero(self, l1_index, l2_index, count, words):
        hdr = self.header
        if l1_index >= hdr.l1_size:
            return True
        l1e = read_u64_table(self.fd, hdr.l1_table_offset + l1_index * 8, 1)
        if len(l1e) != 1:
            return True
        l2_offset = l1e[0] & S.OFFSET_MASK
        if not l2_offset:
            return False
        if l2_offset % hdr.cluster_size or l2_offset + hdr.cluster_size > hdr.file_size:
            return True
        table = read_u64_table(self.fd, l2_offset + l2_index * 8 * words, count * words)
        return len(table) != count * words or any(table)

    @property
    def backing_file(self):
        return self.header.backing_file

    @property
    def backing_format(self):
        return self.header.backing_format


def device_size(fd, path, block):
    """The size of open file ``fd``: of a block device too, whose st_size is
    0.  With ``block``, raises ImageError unless it is a block device."""
    st = os.fstat(fd)
    if block and not stat.S_ISBLK(st.st_mode):
        raise ImageError(path, "a direct LUN must be a block device, and this is not one")
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def open_volume(path, fmt):
    """Open ``path`` as ``fmt`` ("raw", "qcow2", or "block": raw on a block
    device).  Raises ImageError."""
    try:
        if fmt in ("raw", "block"):
            return RawVolume(path, block=fmt == "block")
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

    def peek(self, volume, host, need):
        """The cached cluster if it holds at least its first ``need`` bytes,
        else None; never reads."""
        # Keyed by the open volume, not its path: a merge may rewrite a file
        # under the same name.
        key = (volume.token, host)
        with self._lock:
            data = self._items.get(key)
            if data is None or len(data) < need:
                return None
            self._items.move_to_end(key)
            return data

    def get(self, volume, host, nbytes, need):
        """At least the first ``need`` bytes of the cluster at ``host``.

        A cluster met for the first time is inflated only as far as
        ``need``: a random 4 KiB read then inflates half a cluster on
        average.  The second time it is inflated whole, so that reading a
        cluster piece by piece inflates it at most twice.
        """
        key = (volume.token, host)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                if len(data) >= need:
                    return data
        data = volume.read_compressed(host, nbytes, None if data is not None else need)
        with self._lock:
            old = self._items.get(key)
            if old is None or len(old) < len(data):
                self._items[key] = data
                self.used += len(data) - (len(old) if old is not None else 0)
                while self.used > self.capacity and self._items:
                    _, evicted = self._items.popitem(last=False)
                    self.used -= len(evicted)
        return data


class VolumePool:
    """Opens each volume file once, however many chains share it, and keeps
    its runs (a volume that belongs to a snapshot never changes).

    Thread-safe.  Files are opened outside the lock, so that threads opening
    different volumes (see Listings._open_ahead) wait on the disk side by side;
    ``forget`` bumps a generation so that a volume whose open overlapped it
    is handed to its caller but never cached: it may have been read before
    the file changed.
    """

    def __init__(self):
        self._volumes = {}
        self._runs = {}
        self._generation = 0          # forget() calls so far
        self._lock = threading.RLock()
        self.clusters = ClusterCache()

    def get(self, path, fmt):
        """The open volume at ``path``.  Raises ImageError."""
        key = str(path)
        with self._lock:
            vol = self._volumes.get(key)
            if vol is not None:
                return vol
            generation = self._generation
        vol = open_volume(key, fmt)
        vol.token = next(_tokens)
        with self._lock:
            cached = self._volumes.get(key)
            if cached is None and generation == self._generation:
                self._volumes[key] = vol
                return vol
        if cached is not None:
            # Another thread opened it meanwhile: share theirs.
            vol.close()
            return cached
        return vol

    def runs(self, volume):
        """``volume.runs()``, read once while the pool holds ``volume``."""
        # Keyed by path but checked by token: after a forget() the path may
        # name a file reopened since, with other runs.
        token, runs = self._runs.get(volume.path, (None, None))
        if token == volume.token:
            return runs
        runs = volume.runs()
        with self._lock:
            if self._volumes.get(volume.path) is volume:
                self._runs[volume.path] = (volume.token, runs)
        return runs

    def forget(self, directory):
        """Drop the volumes under ``directory``: they changed on disk.  Chains
        that still hold them keep reading; each file closes with its last user."""
        prefix = os.path.join(directory, "")
        with self._lock:
            self.forget_paths([p for p in self._volumes if p.startswith(prefix)])

    def forget_paths(self, paths):
        """Drop the volumes at ``paths`` (changed or deleted on disk)."""
        with self._lock:
            self._generation += 1
            for path in paths:
                self._volumes.pop(str(path), None)
                self._runs.pop(str(path), None)

    def prime(self, path, fmt):
        """Open ``path`` and read its map now, before something writes the
        file: chains opened later reuse this map.  A merge keeps every map
        of the volumes it writes valid for the chains that survive it
        (snapfs/ops/merge.py), but a map read while it writes could name
        clusters past the end the volume had when opened."""
        try:
            self.runs(self.get(path, fmt))
        except ImageError:
            pass     # the chains that need it report it

    def close(self):
        with self._lock:
            for vol in self._volumes.values():
                vol.close()
            self._volumes.clear()
            self._runs.clear()
