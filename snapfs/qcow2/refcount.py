"""Refcounts of one qcow2 image: lookup, allocation, release, table growth.

Entries are ``refcount_bits`` wide and big-endian.  Sub-byte entries (1, 2
and 4 bits) are packed from the *least* significant bit of each byte: entry
``i`` of a 1-bit block is bit ``i % 8`` of byte ``i // 8`` (QEMU's
get_refcount_ro0..2; docs/interop/qcow2.txt: "bit 0 means the least
significant bit in this context").

Crash safety is the caller's business (see ``writer.py``): this module only
changes refcounts in memory and writes them when told to, except for the
refcount table growth, which is a self-contained, ordered sequence of
writes and syncs.  Clusters are allocated at the end of the file, or reused
once this writer itself has dropped their refcount to zero.

The clusters ``allocate`` hands out are remembered until the caller keeps
them (``commit_allocations``, once a table points at them) or gives them
back (``undo_allocations``, when the write that wanted them failed): a
failed write must not leak them.
"""

import heapq
import os
import struct
from array import array
from collections import OrderedDict

from ..errors import CorruptImage, NoSpace
from .filerange import FileRange
from .header import MAX_REFTABLE_BYTES
from .mapping import read_u64_table

# Refcount blocks kept in memory.  4 MiB is 64 blocks of 64 KiB clusters,
# which with 16-bit refcounts describe 128 GiB of image: every block a
# workload touches stays cached, at a memory cost that does not matter.
# (Blocks with unwritten changes are never evicted.)
REFBLOCK_CACHE_BYTES = 4 << 20

# Refcount table entries: bits 9..63 are the block offset, 0..8 reserved.
_RT_OFFSET_MASK = ~0x1FF & 0xFFFFFFFFFFFFFFFF
# Byte offset of refcount_table_offset (u64) + refcount_table_clusters (u32)
# in the header: both are switched by one write.
_HEADER_REFTABLE = 48
# os.pwritev takes at most IOV_MAX buffers (1024 on Linux).
_IOV_CHUNK = 512
_SWAP = array("Q", [1]).tobytes()[0] == 1   # host is little-endian


def be_bytes(table):
    """Big-endian bytes of an array('Q')."""
    out = array("Q", table)
    if _SWAP:
        out.byteswap()
    return out.tobytes()


class ImageFile:
    """The open image file: writes that keep ``header.file_size`` current,
    syncs, and the ``on_step`` hook called at each durable ordering point."""

    def __init__(self, fd, header, on_step=None):
        self.fd = fd
        self.header = header
        self.on_step = on_step

    def pwrite(self, data, offset):
        """Write all of ``data`` at ``offset``.  Raises OSError."""
        self.pwritev([data], offset)

    def pwritev(self, buffers, offset):
        """Write the buffers back to back from ``offset``; a FileRange among
        them is copied by the kernel.  Raises OSError."""
        pos, run = offset, []
        for buf in buffers:
            if isinstance(buf, FileRange):
                pos = self._pwritev(run, pos)
                run = []
                buf.copy_to(self.fd, pos)
                pos += len(buf)
            else:
                run.append(buf)
        pos = self._pwritev(run, pos)
        if pos > self.header.file_size:
            self.header.file_size = pos

    def _pwritev(self, buffers, offset):
        """Write the buffers (bytes-like) from ``offset``; the end offset."""
        pos = offset
        for i in range(0, len(buffers), _IOV_CHUNK):
            chunk = buffers[i:i + _IOV_CHUNK]
            total = sum(len(b) for b in chunk)
            done = os.pwritev(self.fd, chunk, pos)
            if done < total:
                # Rare (regular files write whole buffers): finish by hand.
                rest = memoryview(b"".join(bytes(b) for b in chunk))[done:]
                while rest:
                    n = os.pwrite(self.fd, rest, pos + done)
                    done += n
                    rest = rest[n:]
            pos += total
        return pos

    def pwrite_runs(self, writes):
        """Write (offset, buffers) pairs, one call per contiguous range, so
        a large guest write of new clusters is one system call.  Raises OSError."""
        writes.sort(key=lambda w: w[0])
        start, bufs, pos = 0, [], None
        for offset, parts in writes:
            if offset != pos and bufs:
                self.pwritev(bufs, start)
                bufs = []
            if not bufs:
                start = pos = offset
            bufs.extend(parts)
            pos += sum(len(p) for p in parts)
        if bufs:
            self.pwritev(bufs, start)

    def sync(self):
        os.fdatasync(self.fd)

    def step(self, name):
        if self.on_step is not None:
            self.on_step(name)


class Refcounts:
    """The refcount table and blocks of an image open for writing.

    Raises CorruptImage (naming the file) when the refcount table is
    truncated; blocks are checked when first read.
    """

    def __init__(self, io):
        hdr = io.header
        self.io = io
        self.path = hdr.path
        self.cs = hdr.cluster_size
        self.bits = hdr.refcount_bits
        self.max = (1 << self.bits) - 1
        self.per_block = (self.cs * 8) >> hdr.refcount_order
        count = hdr.refcount_table_clusters * self.cs // 8
        # The whole table stays in memory: at most 8 MiB (QEMU's limit,
        # enforced by read_header and by _grow).
        self.table = read_u64_table(io.fd, hdr.refcount_table_offset, count)
        if len(self.table) < count:
            raise CorruptImage(self.path, "refcount table is truncated")
        self._blocks = OrderedDict()      # block index -> bytearray
        self._dirty = {}                  # block index -> (lo, hi) bytes to write
        self._unlinked = []               # new blocks not yet in the on-disk table
        self._free = []                   # heap of clusters this writer freed
        self._allocated = []              # handed out since the last commit_allocations()
        self._block_clusters = {e & _RT_OFFSET_MASK for e in self.table if e}
        # Next cluster at the end of the file (a partial last cluster, e.g.
        # compressed data, counts as used).
        self.end = -(-hdr.file_size // self.cs)

    # -- entries ---------------------------------------------------------

    def _block(self, b):
        blk = self._blocks.get(b)
        if blk is not None:
            self._blocks.move_to_end(b)
            return blk
        entry = self.table[b]
        off = entry & _RT_OFFSET_MASK
        if entry % self.cs:
            raise CorruptImage(self.path, f"refcount block offset {entry:#x} is not cluster aligned")
        if off + self.cs > self.io.header.file_size:
            raise CorruptImage(self.path, f"refcount block at {off:#x} lies past the end of the file")
        blk = bytearray(os.pread(self.io.fd, self.cs, off))
        if len(blk) < self.cs:  # pragma: no cover - size checked above
            raise CorruptImage(self.path, f"refcount block at {off:#x} is truncated")
        self._blocks[b] = blk
        return blk

    def get(self, cluster):
        """Refcount of ``cluster`` (an index).  Raises CorruptImage for a bad block."""
        b, i = divmod(cluster, self.per_block)
        if b >= len(self.table) or not self.table[b]:
            return 0
        blk = self._block(b)
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(blk[i * n:i * n + n], "big")
        per_byte = 8 // bits
        return (blk[i // per_byte] >> ((i % per_byte) * bits)) & self.max

    def _set(self, cluster, value):
        """Set a refcount in memory; its block must exist."""
        b, i = divmod(cluster, self.per_block)
        blk = self._block(b)
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            lo = i * n
            blk[lo:lo + n] = value.to_bytes(n, "big")
            hi = lo + n
        else:
            per_byte = 8 // bits
            lo = i // per_byte
            shift = (i % per_byte) * bits
            blk[lo] = (blk[lo] & ~(self.max << shift) & 0xFF) | (value << shift)
            hi = lo + 1
        old = self._dirty.get(b)
        self._dirty[b] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    # -- allocation ------------------------------------------------------

    def allocate(self, count):
        """Allocate ``count`` clusters (refcount 1, in memory); their indexes.

        Creates refcount blocks in memory as needed, and grows the refcount
        table (which writes and syncs; see ``_grow``).  Raises NoSpace when
        the refcount table would exceed QEMU's limit, CorruptImage for bad
        refcount blocks, OSError from the growth's writes.
        """
        out = []
        while len(out) < count:
            if self._free:
                c = heapq.heappop(self._free)
                if self.get(c) == 0:
                    self._set(c, 1)
                    out.append(c)
                    self._allocated.append(c)
                continue
            c = self.end
            b = c // self.per_block
            if b >= len(self.table):
                self._grow(b)
                continue
            self.end = c + 1
            if not self.table[b]:
                # A new block goes in the first cluster it describes, so it
                # covers itself and needs no other block.
                self._blocks[b] = bytearray(self.cs)
                self.table[b] = c * self.cs
                self._block_clusters.add(c * self.cs)
                self._dirty[b] = (0, self.cs)
                self._unlinked.append(b)
                self._set(c, 1)
                continue
            if self.get(c):
                continue  # in use past the end of the file: leave it alone
            self._set(c, 1)
            out.append(c)
            self._allocated.append(c)
        return out

    def commit_allocations(self):
        """The clusters allocated so far are in use (a table points at them,
        or will once the pending tables are written): forget them."""
        self._allocated = []

    def undo_allocations(self):
        """Release (in memory) every cluster allocated since the last
        ``commit_allocations``: the write that wanted them failed before
        any table pointed at them.  Their refcounts may already be on disk
        (written for that write, or by a table growth); the release makes
        the next ``write_dirty`` put them back to zero, which is safe since
        nothing points at them.  New refcount blocks stay: a block counts
        itself, and its table entry (written or still to be written)
        refers to it, so it is no leak.  Returns the released clusters."""
        counts = dict.fromkeys(self._allocated, 1)
        self._allocated = []
        return self.release(counts)

    def _grow(self, need_block):
        """Move the refcount table to a bigger one at the end of the file.

        Layout of the new area: the refcount blocks it needs (those of its
        own clusters that have none), then the table.  Order: blocks and
        refcounts, table, sync; header switch, sync; then the old table's
        clusters are released.  A crash at any point leaks at most the new
        area or the old table.  Raises NoSpace past QEMU's table size limit.
        """
        cs, per, io = self.cs, self.per_block, self.io
        hdr = io.header
        per_cluster = cs // 8
        start = self.end
        old_off, old_n = hdr.refcount_table_offset, hdr.refcount_table_clusters
        nt = max(old_n + (old_n + 1) // 2, -(-(need_block + 1) // per_cluster))
        while True:
            k = 0
            while True:  # blocks needed for the area's own clusters (a fixed point)
                area_end = start + k + nt
                missing = [bi for bi in range(start // per, (area_end - 1) // per + 1)
                           if bi >= len(self.table) or not self.table[bi]]
                if len(missing) == k:
                    break
                k = len(missing)
            # Room for the area's blocks and for the next block after it.
            if nt * per_cluster > max(need_block, area_end // per):
                break
            nt += 1
        if nt * cs > MAX_REFTABLE_BYTES:
            raise NoSpace(f"{self.path}: the refcount table would exceed "
                          f"{MAX_REFTABLE_BYTES} bytes; the image is full")
        for c in range(start, area_end):   # (blocks still missing count 0)
            if self.get(c):
                raise CorruptImage(self.path, f"cluster {c * cs:#x} past the end of the "
                                              "file has a refcount")
        old = self.table, self.end, self._unlinked
        table = array("Q", self.table)
        table.extend(array("Q", bytes(8 * (nt * per_cluster - len(table)))))
        for j, bi in enumerate(missing):
            table[bi] = (start + j) * cs
            self._block_clusters.add((start + j) * cs)
            self._blocks[bi] = bytearray(cs)
            self._dirty[bi] = (0, cs)
        self.table = table
        for c in range(start, area_end):
            self._set(c, 1)
        self.end = area_end
        self._unlinked = []  # every new block is in the new table
        new_off = (start + k) * cs
        try:
            self.write_dirty()
            io.pwrite(be_bytes(table), new_off)
            io.sync()
            io.step("reftable")
            io.pwrite(struct.pack(">QI", new_off, nt), _HEADER_REFTABLE)
        except BaseException:
            # The header still names the old table (e.g. ENOSPC writing the
            # new area).  Go back to it in memory: a refcount that a later
            # write put in a block only the new table names would not count
            # on disk, and the cluster it counts would look free (corrupt).
            self.table, self.end, self._unlinked = old
            for j, bi in enumerate(missing):
                del self._blocks[bi]
                self._dirty.pop(bi, None)
                self._block_clusters.discard((start + j) * cs)
            for c in range(start, area_end):
                if c // per not in missing:
                    # Was 0; the 1 may be on disk already: a leak until
                    # the next write_dirty puts the 0 back.
                    self._set(c, 0)
            raise
        # Written (in the page cache, which every later read sees): from now
        # on the new table is the image's.  If the sync fails, whether the
        # switch reached the disk is unknown, as after a crash: the old
        # table is never freed (a leak), since it may still be the one.
        hdr.refcount_table_offset, hdr.refcount_table_clusters = new_off, nt
        io.sync()
        io.step("reftable-header")
        self.release({old_off // cs + j: 1 for j in range(old_n)})
        self.write_dirty()
        io.step("reftable-free")

    # -- release ---------------------------------------------------------

    def check_release(self, counts):
        """Raise CorruptImage unless every cluster in ``counts`` (index ->
        references to drop) has at least that many references counted."""
        for c, n in counts.items():
            have = self.get(c)
            if have < n:
                raise CorruptImage(self.path, f"cluster {c * self.cs:#x} has refcount {have} "
                                              f"but {n} reference(s) to drop")

    def release(self, counts):
        """Drop references in memory; returns the clusters that became free.

        Call ``check_release`` first.  Freed clusters may be reused by later
        allocations, unless they look like metadata (a hostile image could
        point data at its own tables).
        """
        freed = []
        for c, n in sorted(counts.items()):
            value = self.get(c) - n
            self._set(c, value)
            if value == 0:
                freed.append(c)
                if self._reusable(c):
                    heapq.heappush(self._free, c)
        return freed

    def _reusable(self, c):
        return not self.is_metadata(c * self.cs)

    def is_metadata(self, offset):
        """Whether the cluster at ``offset`` holds the header, the L1 table,
        the refcount table or a refcount block."""
        hdr = self.io.header
        offset -= offset % self.cs
        return (offset == 0 or offset in self._block_clusters
                or hdr.l1_table_offset <= offset < hdr.l1_table_offset + hdr.l1_size * 8
                or hdr.refcount_table_offset <= offset < hdr.refcount_table_offset
                + hdr.refcount_table_clusters * self.cs)

    # -- writing ---------------------------------------------------------

    def write_dirty(self, linked_only=False):
        """Write every changed byte range of the refcount blocks (with
        ``linked_only``, skip the new blocks that the table on disk does not
        name yet: their content counts for nothing until it does, and
        writing them, past the end of the file, may fail again for want of
        space).  A block stays dirty until its write succeeds.  Raises OSError."""
        skip = set(self._unlinked) if linked_only else ()
        for b, (lo, hi) in sorted(self._dirty.items()):
            if b in skip:
                continue
            off = self.table[b] & _RT_OFFSET_MASK
            self.io.pwrite(bytes(self._blocks[b][lo:hi]), off + lo)
            del self._dirty[b]

    @property
    def pending(self):
        """Whether changes wait to be written (``write_dirty``, ``link_new_blocks``)."""
        return bool(self._dirty or self._unlinked)

    @property
    def unlinked(self):
        """Whether new blocks wait for their refcount table entries."""
        return bool(self._unlinked)

    def link_new_blocks(self):
        """Write the table entries of new blocks (written and synced before).
        Raises OSError."""
        base = self.io.header.refcount_table_offset
        for b in sorted(set(self._unlinked)):
            self.io.pwrite(struct.pack(">Q", self.table[b]), base + 8 * b)
        self._unlinked = []

    def trim(self):
        """Evict clean blocks beyond REFBLOCK_CACHE_BYTES (oldest first)."""
        excess = len(self._blocks) * self.cs - REFBLOCK_CACHE_BYTES
        for b in list(self._blocks) if excess > 0 else ():
            if excess <= 0 or len(self._blocks) <= 1:
                break
            if b not in self._dirty:
                del self._blocks[b]
                excess -= self.cs

