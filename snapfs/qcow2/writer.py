"""Guest writes to qcow2 images (reads: guest.py; new images and backing links: create.py).

``Qcow2Writer`` reads and writes the guest view of one image.  Its writes
reach the disk in an order that keeps the image consistent if the process
dies (or the power fails) at any instant; the worst outcome is leaked
clusters:

1. refcounts of the new clusters (new refcount blocks first linked into the
   table after a sync), then the data and any new L2 tables; fdatasync;
2. the L2 entries and L1 entries that point at them (fdatasync only if
   step 3 follows);
3. refcount decrements of the clusters no longer pointed at.

By default each ``write()`` goes through all three steps.  With
``write_back=True`` (the active view) a write puts its data on disk at once
but keeps the table and refcount changes in memory, like a disk's volatile
cache: ``flush()`` (fsync, close) or a full cache runs the three steps for
everything pending.  A crash then loses the writes since the last flush,
never the image's consistency; the two fdatasyncs per write() that made
small writes 20x slower than QEMU's are paid once per flush.

A write that fails (ENOSPC, typically while writing its data) must not
leak either.  Until its data is written no table points at its new
clusters, and it gives them back: their refcounts drop back, in memory and,
if they had reached the disk, on disk too (at once; in write-back mode with
the next flush).  Tables in memory change only once their data is written,
so they never point at data a failed write did not write.  A write that
fails after its data (while writing its pointers) leaves the rest pending,
as in write-back mode, for the next write, flush or close.  Only a crash
(or a failed sync, which is as good as one) can leak clusters.

Overwritten clusters that are shared (internal snapshots), compressed, or
(extended L2) not fully allocated are copied to a new cluster; shared L2
tables are copied on write.  Everything else is overwritten in place.
"""

import errno
import os
import threading
from array import array
from collections import Counter, OrderedDict

from ..errors import CorruptImage, NoSpace, ReadOnly
from . import structs as S
from .filerange import FileRange
from .guest import _ALLOC_ALL, _BELOW, _COMP, _DATA, _EXT, _ZERO, GuestTables
from .header import read_header
from .mapping import image_runs, read_u64_table
from .refcount import ImageFile, Refcounts, be_bytes as _be

# L2 tables kept in memory, decoded.  8 MiB is 128 tables of 64 KiB
# clusters, which map 64 GiB of guest disk: a working set's tables stay
# cached.  The most recently used table is kept whatever its size.
L2_CACHE_BYTES = 8 << 20
# write_zeroes() works in batches of at most this many bytes, so zeroing a
# large range of a v2 image (which needs real zero clusters) never builds
# one huge batch in memory.
ZERO_BATCH_BYTES = 32 << 20
# Write-back mode: pending table changes are written out once this much
# data has been allocated, or this much of the L2 cache is dirty.
WRITE_BACK_BYTES = 64 << 20
WRITE_BACK_TABLE_BYTES = 4 << 20

_ZERO_ALL = 0xFFFFFFFF << 32      # extended L2: all subclusters read as zeros
_HEADER_INCOMPAT = 72             # byte offsets of v3 header fields
_HEADER_AUTOCLEAR = 88



class _TablePlan:
    """Changes one write() makes to one L2 table."""

    def __init__(self, offset, table, copied):
        self.offset = offset        # current table (0: none)
        self.table = table          # its entries, or None
        self.copied = copied        # written in place (refcount 1)
        self.changes = []           # (l2 index, (entry, bitmap) | None, content, offset in cluster)
        self.new_offset = 0         # where the new/copied table goes
        self.updates = []           # write-back: (l2 index, (entry, bitmap)) to apply


class Qcow2Writer(GuestTables):
    """Read and write the guest view of one qcow2 image (its own layer over ``below``).

    ``below(offset, length)`` returns the flattened view of the backing
    chain (None: no backing, unallocated clusters read as zeros);
    ``on_step(name)`` is called at each durable ordering point of a write,
    for fault injection; ``write_back``: see the module docstring.  Reading
    works on any image ``read_header`` accepts; writing is refused for
    images marked corrupt or dirty.

    Raises CorruptImage for unknown incompatible feature bits or an L1
    table too small or truncated, UnsupportedImage (from ``read_header``),
    OSError.
    """

    def __init__(self, path, below=None, on_step=None, write_back=False):
        self.path = str(path)
        self._below = below
        self._write_back = write_back
        self._on_step = on_step
        self._refuse = None
        # One operation at a time: a read must not see the in-memory tables
        # of a write whose data is not on disk yet.
        self._lock = threading.RLock()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._refuse = ReadOnly(f"{self.path}: the image file is read-only")
        self.fd, self._unsynced = fd, False
        try:
            self._load()
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise

    def _load(self):
        """(Re)read the header and the L1 table; forget every cache."""
        head = os.pread(self.fd, _HEADER_INCOMPAT + 8, 0)
        if len(head) == _HEADER_INCOMPAT + 8 and head[:4] == S.MAGIC \
                and int.from_bytes(head[4:8], "big") == 3:
            unknown = int.from_bytes(head[_HEADER_INCOMPAT:], "big") & ~S.INCOMPAT_KNOWN
            if unknown:
                raise CorruptImage(self.path, f"unknown incompatible feature bits {unknown:#x}: "
                                              "snapfs cannot interpret this image and will not write it")
        hdr = read_header(self.fd, self.path)
        # read_header has checked that the L1 table covers the virtual size
        # (CorruptImage otherwise), so writes never grow it, and that it is
        # at most 32 MiB: it stays in memory whole.
        self._l1 = read_u64_table(self.fd, hdr.l1_table_offset, hdr.l1_size)
        if len(self._l1) < hdr.l1_size:
            raise CorruptImage(self.path, "L1 table is truncated")
        self.header, self.size = hdr, hdr.size
        self._io = ImageFile(self.fd, hdr, self._on_step)
        self._refs = None       # loaded by the first write
        self._l2 = OrderedDict()  # L2 table offset -> array('Q'), LRU order
        # Write-back mode: what is changed in memory but not yet on disk.
        self._dirty_tables = set()    # L2 table offsets
        self._dirty_l1 = set()        # L1 indexes
        self._pending_drops = Counter()   # cluster index -> references to drop
        self._pending_bytes = 0       # data allocated since the last write-back
        self._zeros = bytes(hdr.cluster_size)
        self._file_end = 0     # the file must reach this far before the next sync

    # -- public API --------------------------------------------------------
    def write(self, offset, data):
        """Write ``data`` (bytes-like) at guest ``offset``.

        Raises ValueError outside the disk; CorruptImage if the image is
        marked corrupt or dirty or its tables are inconsistent; ReadOnly;
        NoSpace when the file system or the refcount table is full; OSError.
        After an error the clusters the write allocated are released; part
        of a failed write may have landed, or land with the next flush.
        """
        data = memoryview(data).cast("B")
        with self._lock:
            self._check_range(offset, len(data))
            self._check_writable()
            if len(data):
                self._batch(offset, len(data), data)

    def copy_from(self, offset, fd, source_offset, length):
        """Write ``length`` bytes of the open file ``fd`` from
        ``source_offset`` at guest ``offset``; whole clusters are copied
        file to file by the kernel (copy_file_range).  Unlike ``write``,
        clusters of zeros are written as data.  Raises like ``write``."""
        with self._lock:
            self._check_range(offset, length)
            self._check_writable()
            if length:
                self._batch(offset, length, FileRange(fd, source_offset, length))

    def write_zeroes(self, offset, length):
        """Make guest [offset, offset + length) read as zeros.

        Whole clusters get the zero flag on v3 images (their old clusters
        are released); partial clusters and v2 images get zero bytes.
        Raises like ``write``.
        """
        with self._lock:
            self._check_range(offset, length)
            self._check_writable()
            end = offset + length
            mask = self.header.cluster_size - 1
            while offset < end:
                stop = min(end, (offset + ZERO_BATCH_BYTES) & ~mask)
                self._batch(offset, stop - offset, None)
                offset = stop

    def allocated_runs(self):
        """This image's runs now, as ``mapping.image_runs``.  Raises CorruptImage, OSError."""
        with self._lock:
            self._write_back_pending()
            return image_runs(self.fd, self.header)

    def flush(self):
        """Make every completed write durable (fdatasync).  Raises NoSpace, OSError."""
        with self._lock:
            self._write_back_pending()
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"{self.path}: no space left to flush") from e
                raise
            self._unsynced = False

    def close(self):
        """Flush (if anything was written) and close.  Raises NoSpace, OSError."""
        with self._lock:
            if self.fd < 0:
                return
            try:
                if self._unsynced:
                    self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- checks and caches -------------------------------------------------

    def _check_writable(self):
        hdr = self.header
        if hdr.corrupt:
            raise CorruptImage(self.path, "image is marked corrupt; it will not be written "
                                          "(repair it with qemu-img check -r all)")
        if hdr.dirty:
            raise CorruptImage(self.path, "image is marked dirty (refcounts may be stale); it will "
                                          "not be written (repair it with qemu-img check -r all)")
        if self._refuse is not None:
            raise self._refuse

    def _trim(self):
        """Evict clean L2 tables beyond L2_CACHE_BYTES, least recently used
        first (dirty ones are pinned until written back)."""
        excess = len(self._l2) - max(1, L2_CACHE_BYTES // self.header.cluster_size)
        for off in list(self._l2) if excess > 0 else ():
            if excess <= 0:
                break
            if off not in self._dirty_tables:
                del self._l2[off]
                excess -= 1
        if self._refs is not None:
            self._refs.trim()

    # -- writing -----------------------------------------------------------

    def _refcounts(self):
        if self._refs is None:
            refs = Refcounts(self._io)
            if self.header.autoclear_features:
                # Autoclear bits (e.g. persistent bitmaps) describe data this
                # writer does not maintain: the spec says to clear them
                # before changing the image.
                self._io.pwrite(bytes(8), _HEADER_AUTOCLEAR)
                self._io.sync()
                self.header.autoclear_features = 0
                self._io.step("autoclear")
            self._refs = refs   # (only now: a failure above is retried)
        return self._refs

    def _batch(self, offset, length, data):
        """One write() batch; on an error release what it allocated and
        re-raise (ENOSPC / EDQUOT as NoSpace).

        The memory stays consistent with the disk after a failure, so it is
        kept (write-back mode must not lose the earlier writes still
        pending): the tables change only once their data is written, and a
        failed write gives back its clusters (``_release_failed``) or, past
        its data, leaves its pointers pending (``_write``).
        """
        self._unsynced = True
        try:
            if not self._write_back:
                # A write that returns is on disk, and so is everything
                # before it: first finish what a failed write left pending.
                self._write_back_pending()
            self._write(offset, length, data)
        except BaseException as e:
            self._release_failed()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"{self.path}: no space left for a write") from e
            raise
        self._trim()

    def _release_failed(self):
        """After a failed write: release the clusters it allocated, which no
        table points at (``_write`` commits them just before the first
        pointer is written), so that they do not leak."""
        refs = self._refs
        if refs is None:
            return
        try:
            # Part of the data may have landed past the end of the file we
            # know of.  A released cluster there must not count as reading
            # zeros when it is reused (a partial write of a fresh cluster
            # past the end writes only its own bytes).
            self.header.file_size = max(self.header.file_size, os.fstat(self.fd).st_size)
            refs.undo_allocations()
        except Exception:
            # The memory may no longer match the disk: stop writing.
            self._refuse = CorruptImage(self.path, "cannot release the clusters of a "
                                                   "failed write; reopen the image")
            return
        if not self._write_back:
            # The increments may be on disk (step 1): put the released
            # counts back now, not at the next write or flush.  Only the
            # blocks the table on disk names matter.  If this fails too, the
            # counts stay pending (``_write_back_pending``).
            try:
                refs.write_dirty(linked_only=True)
            except OSError:
                pass

    def _write(self, offset, length, data):
        """Plan every cluster of the range, allocate, then write in order.
        ``data`` None means zeroes.  Raises CorruptImage, NoSpace, OSError."""
        hdr = self.header
        cs, cb, l2n, ext = hdr.cluster_size, hdr.cluster_bits, hdr.l2_entries, hdr.extended_l2
        v3 = hdr.version >= 3
        refs = self._refcounts()
        zero_entry = (0, _ZERO_ALL) if ext else (S.L2E_ZERO, 0)
        # Unallocated clusters already read as zeros: zeros need no entry.
        bare = hdr.backing_file is None and self._below is None
        zeros = memoryview(self._zeros)
        end = offset + length
        plans = {}            # l1 index -> _TablePlan
        inplace = []          # (host offset, [buffer])
        drops = Counter()     # cluster index -> references to drop afterwards
        last_l1i = None
        for g in range(offset >> cb, ((end - 1) >> cb) + 1):
            c0 = g << cb
            lo, hi = max(offset, c0) - c0, min(end, c0 + cs) - c0
            limit = min(cs, self.size - c0)
            whole = lo == 0 and hi >= limit
            l1i, l2i = divmod(g, l2n)
            if l1i != last_l1i:     # nothing changes the tables while planning
                l2off, table, copied = self._table(l1i)
                last_l1i = l1i
            entry, bitmap = self._entry(table, l2i)
            if entry or ext:
                kind, host, aux = self._classify(entry, bitmap, c0)
            else:
                kind, host, aux = _BELOW, 0, 0     # unallocated: the common case
            if host and kind != _COMP and (refs.is_metadata(host) or host in self._l2):
                # A hostile image must not get its tables overwritten or freed.
                raise CorruptImage(self.path, f"guest cluster {c0:#x} maps to metadata at {host:#x}")
            content = None
            skip = 0      # content starts this far into the cluster; zeros around it
            if data is None and whole and v3:
                zero = True
            else:
                piece = zeros[:hi - lo] if data is None else data[c0 + lo - offset:c0 + hi - offset]
                if copied and entry & S.L2E_COPIED and (
                        kind == _DATA or kind == _EXT and aux & _ALLOC_ALL == _ALLOC_ALL):
                    inplace.append((host + lo, [piece]))
                    continue
                if whole or kind == _ZERO or (kind == _BELOW and self._below is None):
                    # Nothing to copy: the rest of the cluster reads as zeros.
                    content, skip = piece, lo
                else:
                    content = bytearray(cs)
                    self._fill(memoryview(content), c0, self._pieces(c0, limit))
                    content[lo:hi] = piece.read() if isinstance(piece, FileRange) else piece
                # A FileRange is not read here: it counts as data.
                zero = not isinstance(content, FileRange) and self._is_zero(content)
            if zero:
                if bare and not entry and not bitmap:
                    continue
                if v3:
                    if (entry, bitmap) == zero_entry:
                        continue
                    content = None
            plan = plans.get(l1i)
            if plan is None:
                plan = plans[l1i] = _TablePlan(l2off, table, copied)
            plan.changes.append((l2i, zero_entry if content is None else None, content, skip))
            if kind == _COMP:
                for c in range(host >> cb, ((host + aux - 1) >> cb) + 1):
                    drops[c] += 1
            elif host:
                drops[host >> cb] += 1
        if not plans and not inplace:
            return

        # Allocate (refcounts change in memory only, except for a refcount
        # table growth, which is complete and consistent on its own).
        for plan in plans.values():
            if plan.table is not None and not plan.copied:
                drops[plan.offset >> cb] += 1   # shared table: copied on write
        if drops:
            pending = self._pending_drops
            refs.check_release(drops + Counter({c: pending[c] for c in drops if c in pending}))
        fresh = sum(1 for p in plans.values() for _, new, _, _ in p.changes if new is None)
        # Clusters at or past the end of the file read as zeros already:
        # they get only their data, and the file is extended before the
        # next sync (``_extend_file``).  Below the end a cluster may hold
        # old bytes, so it is written whole.
        file_end = self.header.file_size
        hosts = iter(refs.allocate(fresh))
        moved = [p for p in plans.values() if not p.copied]
        if moved:
            for plan, c in zip(moved, refs.allocate(len(moved))):
                plan.new_offset = c << cb
        writes = inplace
        for plan in plans.values():
            updates = []
            for l2i, new, content, skip in plan.changes:
                if new is None:
                    h = next(hosts) << cb
                    new = (h | S.L2E_COPIED, _ALLOC_ALL if ext else 0)
                    tail = skip + len(content)
                    if tail == cs and not skip:
                        writes.append((h, [content]))
                    elif h >= file_end:
                        writes.append((h + skip, [content]))
                        self._file_end = max(self._file_end, h + cs)
                    else:
                        writes.append((h, [zeros[:skip], content, zeros[tail:]]))
                updates.append((l2i, new))
            if plan.copied:
                # The cached table changes once the data is written (_stage,
                # step 2): it must never point at data that a failed write
                # never wrote.
                plan.updates = updates
            else:
                plan.table = array("Q", plan.table if plan.table is not None else self._zeros)
                self._set_entries(plan.table, updates)

        if self._write_back:
            self._stage(plans, writes, drops)
            return
        # 1. refcounts, data, new tables; sync.
        io = self._io
        refs.write_dirty()
        io.step("refcounts")
        if refs.unlinked:
            io.sync()   # new refcount blocks are on disk before the table names them
            refs.link_new_blocks()
            io.step("reftable-entry")
        io.pwrite_runs(writes)
        for plan in moved:
            io.pwrite(_be(plan.table), plan.new_offset)
        self._extend_file()
        if plans:
            io.sync()
        io.step("data")
        # 2. pointers.  From here on the new clusters are the image's: the
        # tables in memory point at them, and a failure no longer releases
        # them.
        refs.commit_allocations()
        for l1i, plan in plans.items():
            if plan.copied:
                self._set_entries(plan.table, plan.updates)
            else:
                self._l1[l1i] = plan.new_offset | S.L2E_COPIED
                self._l2[plan.new_offset] = plan.table
        try:
            width = 2 if ext else 1
            l1_changed = []
            for l1i, plan in plans.items():
                if plan.copied:
                    idx = [c[0] for c in plan.changes]
                    lo, hi = min(idx) * width, (max(idx) + 1) * width
                    io.pwrite(_be(plan.table[lo:hi]), plan.offset + 8 * lo)
                else:
                    l1_changed.append(l1i)
            if l1_changed:
                lo, hi = min(l1_changed), max(l1_changed) + 1
                io.pwrite(_be(self._l1[lo:hi]), hdr.l1_table_offset + 8 * lo)
            if drops:
                io.sync()   # nothing points at the old clusters before they are freed
            io.step("l2")
            # 3. release.
            if drops:
                freed, drops = refs.release(drops), None
                for c in freed:
                    self._l2.pop(c << cb, None)
                refs.write_dirty()
                io.step("free")
        except BaseException:
            # The data and its refcounts are on disk; some pointers may not
            # be.  Rather than leak the new clusters (or the old ones), leave
            # the rest pending as in write-back mode: the next write, flush
            # or close writes it back (_write_back_pending).
            for l1i, plan in plans.items():
                if plan.copied:
                    self._l2[plan.offset] = plan.table
                    self._dirty_tables.add(plan.offset)
                else:
                    self._dirty_tables.add(plan.new_offset)
                    self._dirty_l1.add(l1i)
            if drops:
                self._pending_drops.update(drops)
            raise

    def _set_entries(self, table, updates):
        if self.header.extended_l2:
            for l2i, (entry, bitmap) in updates:
                table[2 * l2i], table[2 * l2i + 1] = entry, bitmap
        else:
            for l2i, (entry, _) in updates:
                table[l2i] = entry

    def _stage(self, plans, writes, drops):
        """Write-back mode: the data now, the tables into memory."""
        self._io.pwrite_runs(writes)
        for l1i, plan in plans.items():
            if plan.copied:
                self._set_entries(plan.table, plan.updates)
                self._l2[plan.offset] = plan.table
                self._dirty_tables.add(plan.offset)
            else:
                self._l1[l1i] = plan.new_offset | S.L2E_COPIED
                self._l2[plan.new_offset] = plan.table
                self._dirty_tables.add(plan.new_offset)
                self._dirty_l1.add(l1i)
        # The tables in memory point at the new clusters now: a failure of
        # the write-back below must not release them.
        self._refs.commit_allocations()
        self._pending_drops.update(drops)
        self._pending_bytes += sum(len(buf) for _, bufs in writes for buf in bufs)
        if (self._pending_bytes >= WRITE_BACK_BYTES or
                len(self._dirty_tables) * self.header.cluster_size >= WRITE_BACK_TABLE_BYTES):
            self._write_back_pending()

    def _write_back_pending(self):
        """Steps 1-3 for every staged write (write-back mode) or for what a
        failed write left pending (both modes).  A failure keeps what is
        still pending for the next try.  Raises NoSpace, OSError."""
        if not (self._dirty_tables or self._dirty_l1 or self._pending_drops
                or self._refs is not None and self._refs.pending):
            # (Refcounts alone: those a failed write gave back, or those a
            # failed release left unwritten.)
            return
        try:
            io, refs = self._io, self._refcounts()
            cb = self.header.cluster_bits
            refs.write_dirty()
            io.step("refcounts")
            if refs.unlinked:
                io.sync()
                refs.link_new_blocks()
                io.step("reftable-entry")
            self._extend_file()
            io.sync()
            io.step("data")
            for off in sorted(self._dirty_tables):
                io.pwrite(_be(self._l2[off]), off)
            if self._dirty_l1:
                lo, hi = min(self._dirty_l1), max(self._dirty_l1) + 1
                io.pwrite(_be(self._l1[lo:hi]), self.header.l1_table_offset + 8 * lo)
            self._dirty_tables.clear()
            self._dirty_l1.clear()
            self._pending_bytes = 0
            if self._pending_drops:
                io.sync()   # nothing points at the old clusters before they are freed
            io.step("l2")
            if self._pending_drops:
                drops, self._pending_drops = self._pending_drops, Counter()
                for c in refs.release(drops):
                    self._l2.pop(c << cb, None)
                refs.write_dirty()
                io.step("free")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"{self.path}: no space left to write back its tables") from e
            raise
        self._trim()

    def _extend_file(self):
        """Make the file cover every cluster that got only part of its
        bytes (the rest is a hole, which reads as zeros), before the tables
        that point at them can reach the disk: a reader may check entries
        against the file's size."""
        if self._file_end > self.header.file_size:
            os.ftruncate(self.fd, self._file_end)
            self.header.file_size = self._file_end

    def _is_zero(self, buf):
        n = len(buf)
        if buf[0] or buf[n - 1]:
            return False
        if isinstance(buf, memoryview):
            buf = buf.tobytes()   # memoryview == bytes compares item by item: slow
        return buf == self._zeros[:n]
