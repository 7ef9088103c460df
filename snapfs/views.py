"""The byte views behind the files of the mount: snapshot disks, their
partitions, and the writable active disk.

Every method may block on disk I/O; the FUSE adapter calls them from
worker threads.  A broken volume makes its own views raise ImageError
(EIO); the error is logged once per view.
"""

import logging
import threading

from .chain import Chain
from .errors import ImageError, NoSpace, ReadOnly, SnapfsError

log = logging.getLogger(__name__)


class DiskView:
    """A disk as of one volume: opens (and merges) its chain on first use."""

    def __init__(self, pool, refs):
        self.pool = pool
        self.refs = refs
        self._chain = None
        self._error = None
        self._size = None
        self._lock = threading.Lock()

    @property
    def size(self):
        if self._size is None:
            try:
                self._size = self.pool.get(self.refs[-1].path, self.refs[-1].format).size
            except SnapfsError:
                return 0
        return self._size

    def chain(self):
        with self._lock:
            if self._chain is None and self._error is None:
                try:
                    self._chain = Chain(self.pool, self.refs)
                except SnapfsError as e:
                    self._error = e
                    log.error("volume broken, its views return EIO: %s", e)
            if self._error is not None:
                raise self._error
            return self._chain

    def read(self, offset, length, wait=True):
        """The bytes at ``offset``.  With ``wait=False``, None instead of
        opening the chain or decompressing a cluster (see Chain.read)."""
        if not wait and self._chain is None:
            return None
        try:
            return self.chain().read(offset, length, wait)
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(self.refs[-1].path, f"read failed: {e.strerror}") from None


class PartitionView:
    """A byte range of a disk view; writable if the disk is."""

    def __init__(self, disk, start, length):
        self.disk, self.start, self.size = disk, start, length

    def read(self, offset, length, wait=True):
        if offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        if wait:
            return self.disk.read(self.start + offset, length)
        if not isinstance(self.disk, DiskView):
            return None     # the active disk reads under its writer's lock
        return self.disk.read(self.start + offset, length, wait=False)

    def write(self, offset, data, wait=True):
        if offset + len(data) > self.size:
            raise NoSpace("write past the end of the partition")
        return self.disk.write(self.start + offset, data, wait)

    def flush(self):
        self.disk.flush()


class ActiveSlot:
    """What ``active/<disk>.raw`` shows: always the VM's *current* active
    leaf, whatever operations replaced it since the file was opened or
    looked up.  ``io_lock`` serialises writes with the VM's operations: an
    operation swaps ``disk`` while holding it, so a write that waited for
    the operation lands in the new leaf."""

    def __init__(self, disk, io_lock):
        self.disk = disk
        self.io_lock = io_lock

    @property
    def size(self):
        return self.disk.size

    def check(self):
        self.disk.check()

    def read(self, offset, length):
        return self.disk.read(offset, length)

    def write(self, offset, data, wait=True):
        """Write; with ``wait=False`` give up (False) rather than wait for
        the io_lock, which an operation may hold for minutes."""
        if not self.io_lock.acquire(blocking=wait):
            return False
        try:
            self.disk.write(offset, data)
        finally:
            self.io_lock.release()
        return True

    def flush(self):
        with self.io_lock:
            self.disk.flush()


class ActiveDisk:
    """The active leaf of a disk, read and written through a Qcow2Writer
    whose backing view is the (immutable) chain beneath the leaf.  Writes
    go through an ActiveSlot, which holds the VM's io_lock.  Until the
    writer opens, ``readonly_view`` reads the same bytes from the files
    (snapfs/listings.py reads the partition table through it)."""

    def __init__(self, pool, refs):
        self.refs = refs
        self.below = DiskView(pool, refs[:-1]) if len(refs) > 1 else None
        self.readonly_view = DiskView(pool, refs)
        self._writer = None
        self._refusal = None
        self._lock = threading.Lock()

    @property
    def size(self):
        return self.readonly_view.size

    @property
    def writer_open(self):
        """Whether reads go through a writer, which may hold writes that
        the leaf's file does not show yet (write-back tables)."""
        return self._writer is not None

    def writer(self):
        from .qcow2.writer import Qcow2Writer
        with self._lock:
            if self._writer is None and self._refusal is None:
                leaf = self.refs[-1]
                try:
                    # Write-back: table updates wait for fsync/close, as in a
                    # disk's cache (see qcow2/writer.py).
                    self._writer = Qcow2Writer(leaf.path, below=self.below.read if self.below else None,
                                               write_back=True)
                except SnapfsError as e:
                    # Still readable through the read-only chain.
                    self._refusal = e
                    log.error("active disk is read-only: %s", e)
            return self._writer

    def check(self):
        """Raise ImageError (EIO) now if the disk cannot be read at all."""
        if self.writer() is None:
            self.readonly_view.chain()

    def read(self, offset, length):
        writer = self.writer()
        if writer is None:
            return self.readonly_view.read(offset, length)
        if offset >= writer.size:
            return b""
        return writer.read(offset, min(length, writer.size - offset))

    def write(self, offset, data):
        writer = self.writer()
        if writer is None:
            raise ReadOnly(f"{self.refs[-1].path}: {self._refusal.reason}")
        if offset + len(data) > writer.size:
            raise NoSpace("write past the end of the disk")
        writer.write(offset, data)

    def flush(self):
        with self._lock:
            writer = self._writer
        if writer is not None:
            writer.flush()

    def retire(self):
        """Flush and let go: an operation replaced this leaf or its chain.
        A reader still inside ``read`` keeps its own reference to the
        writer; the file closes when the last one is done."""
        self.flush()
        with self._lock:
            self._writer = None
            self._refusal = ReadOnly("the active disk was replaced by an operation")
