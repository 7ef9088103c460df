"""The byte views behind the files of the mount: snapshot disks, their
partitions, and the writable active disk.

Every method may block on disk I/O; the FUSE adapter calls them from
worker threads.  A broken volume makes its own views raise ImageError
(EIO); the error is logged once per view.
"""

import logging
import threading

from ..errors import ImageError, NoSpace, NotFound, ReadOnly, SnapfsError
from ..store.chain import Chain

log = logging.getLogger(__name__)


class DiskView:
    """A disk as of one volume: opens (and merges) its chain on first use.

    ``retarget`` points the view at another chain that reads the same
    bytes (a merge removed a layer beneath); ``release`` lets go of the
    chain for good (the view left the namespace).  A read already inside
    the old chain finishes with it; the chain's files close with their
    last user."""

    def __init__(self, pool, refs):
        self.pool = pool
        self.refs = refs
        self._chain = None
        self._error = None
        self._size = None
        self._released = False
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
            if self._released:
                raise NotFound("the view was removed")
            if self._chain is None and self._error is None:
                try:
                    self._chain = Chain(self.pool, self.refs)
                except SnapfsError as e:
                    self._error = e
                    log.error("volume broken, its views return EIO: %s", e)
            if self._error is not None:
                raise self._error
            return self._chain

    def retarget(self, refs):
        """Read through ``refs`` from now on (the same bytes, other files)."""
        with self._lock:
            self.refs, self._chain, self._error = refs, None, None

    def release(self):
        with self._lock:
            self._released, self._chain = True, None

    def read(self, offset, length, wait=True):
        """The bytes at ``offset``.  With ``wait=False``, None instead of
        opening the chain or decompressing a cluster (see Chain.read)."""
        chain = self._chain
        if not wait and chain is None:
            return None
        try:
            return (chain or self.chain()).read(offset, length, wait)
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
    """What ``active/<disk>.raw`` shows: always the disk's *current* active
    leaf, whatever operations replaced it since the file was opened or
    looked up.  ``lock`` serialises writes with the operations that change
    this disk: an operation holds it while it merges into or switches the
    disk's leaf, and swaps ``disk`` before letting go, so a write that
    waited lands in the new leaf.  Each disk has its own: a merge of one
    disk does not hold up writes to another."""

    def __init__(self, disk):
        self.disk = disk
        self.lock = threading.RLock()
        self._opens = 0            # open files of the disk and its partitions
        self._opens_lock = threading.Lock()

    def opened(self):
        with self._opens_lock:
            self._opens += 1

    def released(self):
        """An open file of the disk was released.  The last one closes the
        disk's writer: QEMU may write the leaf before the next open (the
        VM started and stopped meanwhile), and a writer's cached tables
        would then be stale.  The next open reads them afresh."""
        with self._opens_lock:
            self._opens -= 1
            if self._opens:
                return
        # Not while an operation holds the disk (a merge may take minutes):
        # it switches or keeps the leaf itself, and this writer with it.
        if not self.lock.acquire(blocking=False):
            return
        try:
            self.disk.close_writer()
        finally:
            self.lock.release()

    @property
    def size(self):
        return self.disk.size

    def check(self):
        self.disk.check()

    def read(self, offset, length):
        return self.disk.read(offset, length)

    def write(self, offset, data, wait=True):
        """Write; with ``wait=False`` give up (False) rather than wait for
        the lock, which an operation may hold for minutes."""
        if not self.lock.acquire(blocking=wait):
            return False
        try:
            self.disk.write(offset, data)
        finally:
            self.lock.release()
        return True

    def flush(self):
        with self.lock:
            self.disk.flush()


class ActiveDisk:
    """The active leaf of a disk, read and written through a Qcow2Writer
    whose backing view is the (immutable) chain beneath the leaf.  Writes
    go through an ActiveSlot, which holds the disk's lock.  Until the
    writer opens, ``readonly_view`` reads the same bytes from the files
    (snapfs/fs/listings.py reads the partition table through it)."""

    def __init__(self, pool, refs):
        self.refs = refs
        self.below = DiskView(pool, refs[:-1]) if len(refs) > 1 else None
        self.readonly_view = DiskView(pool, refs)
        self._writer = None
        self._refusal = None
        self._readers = 0          # reads using the writer right now
        self._retired = []         # writers to close once they are done
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
        from ..qcow2.writer import Qcow2Writer
        from ..store.writers import open_writer
        with self._lock:
            if self._writer is None and self._refusal is None:
                leaf = self.refs[-1]
                try:
                    if leaf.format != "qcow2":
                        # A shareable disk or a LUN, written in place.
                        self._writer = open_writer(leaf.path, leaf.format)
                    else:
                        # Write-back: table updates wait for fsync/close, as
                        # in a disk's cache (see qcow2/writer.py).
                        self._writer = Qcow2Writer(leaf.path,
                                                   below=self.below.read if self.below else None,
                                                   write_back=True)
                except OSError as e:
                    self._refusal = ImageError(leaf.path, f"cannot open for writing: {e.strerror}")
                    log.error("active disk is read-only: %s", self._refusal)
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
        with self._lock:
            if self._writer is not writer:     # retired meanwhile
                return self.readonly_view.read(offset, length)
            self._readers += 1
        try:
            if offset >= writer.size:
                return b""
            return writer.read(offset, min(length, writer.size - offset))
        finally:
            with self._lock:
                self._readers -= 1
                last = self._readers == 0 and bool(self._retired)
            if last:
                self._close_retired()

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

    def close_writer(self):
        """Flush and close the writer; the next read or write opens a new
        one, which reads the leaf's tables as they are then."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._let_go_of_writer()
                idle = self._readers == 0
            if idle:
                self._close_retired()

    def retire(self, reason="the active disk was replaced by an operation"):
        """Flush, close and let go: an operation replaced this leaf or its
        chain.  A read still inside the writer finishes first; the last
        one closes it.  Later reads go to the read-only view."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._let_go_of_writer()
                self._refusal = ReadOnly(reason)
                idle = self._readers == 0
            if idle:
                self._close_retired()

    def _let_go_of_writer(self):
        # Under _lock.  A list: a writer let go by close_writer may still
        # wait for a read when an operation retires the next one.
        if self._writer is not None:
            self._retired.append(self._writer)
            self._writer = None

    def _close_retired(self):
        with self._lock:
            writers, self._retired = self._retired, []
        for writer in writers:
            try:
                writer.close()
            except (SnapfsError, OSError) as e:
                log.error("closing %s failed: %s", writer.path, e)
        if self._refusal is not None and self.below is not None:
            # Retired for good: no writer will read the chain beneath
            # again, and its files (a merge may delete them) close now,
            # not when the garbage collector finds this disk.
            self.below.release()
