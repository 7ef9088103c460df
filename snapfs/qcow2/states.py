"""One state of a qcow2 image, read through an L1 table of its choosing:
the image's current tables or an internal snapshot's.

An internal snapshot is an L1 table of its own in the same file, sharing
L2 tables and data clusters with the current state until either side is
written (QEMU copies on write whatever both reference).  Its guest view is
those tables over the image's backing chain, at the snapshot's own disk
size: what ``qemu-img snapshot -a`` restores.  (``qemu-img convert -l``
reads the same tables at the image's current size; the two differ only
when the disk was resized after the snapshot.)

``differing_clusters`` compares two states of one file by their tables
alone: equal L1 entries name the same L2 table, and equal L2 entries the
same bytes, so only clusters whose entries differ can read differently.

A snapshot's L1 table is untrusted like the header's: it must lie inside
the file, be cluster aligned and at most QEMU's maximum L1 size; every L2
table and cluster it leads to is checked by ``GuestTables`` when used.
"""

import threading
from array import array
from collections import OrderedDict
from itertools import compress

from ..errors import CorruptImage
from . import structs as S
from .guest import GuestTables
from .header import MAX_L1_BYTES, MAX_VIRTUAL_SIZE
from .mapping import read_u64_table

# Decoded L2 tables kept per state; a walk over the tables reads each once.
L2_CACHE_BYTES = 8 << 20
# COPIED only says that a cluster's refcount is 1: the same cluster is
# COPIED in one state and not in the other once a snapshot shares it.
_WITHOUT_COPIED = ~S.L2E_COPIED & (1 << 64) - 1


class ImageState(GuestTables):
    """Guest reads of ``size`` bytes through the L1 table of ``l1_size``
    entries at ``l1_offset`` in the open qcow2 file ``fd`` (validated
    ``header``), over ``below(offset, length)`` (the backing chain's view;
    None: nothing, unallocated clusters read as zeros).

    L1 entries past the table read as unallocated, as in QEMU: a disk that
    grew after a snapshot keeps the snapshot's shorter table.  The file is
    not closed here; it belongs to the caller.

    Raises CorruptImage for an L1 table outside the file or too large, or a
    size no L1 table could map.
    """

    def __init__(self, fd, header, l1_offset, l1_size, size, below=None, what="the image"):
        self.path, self.fd, self.header = header.path, fd, header
        self.what = what
        self._below = below
        self._lock = threading.RLock()
        self._l2 = OrderedDict()
        cs = header.cluster_size
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(self.path, f"L1 table of {what} is too large ({l1_size} entries)")
        if l1_size and (l1_offset % cs or l1_offset < cs
                        or l1_offset + l1_size * 8 > header.file_size):
            raise CorruptImage(self.path, f"L1 table of {what} at {l1_offset:#x} lies outside "
                                          "the file or in its header")
        needed = -(-size // (cs * header.l2_entries))
        if not 0 <= size <= MAX_VIRTUAL_SIZE or needed * 8 > MAX_L1_BYTES:
            raise CorruptImage(self.path, f"disk size {size} of {what} is too large")
        l1 = read_u64_table(fd, l1_offset, l1_size) if l1_size else array("Q")
        if len(l1) < l1_size:
            raise CorruptImage(self.path, f"L1 table of {what} is truncated")
        if len(l1) < needed:
            l1.frombytes(bytes(8 * (needed - len(l1))))
        self._l1 = l1
        self.size = size

    @classmethod
    def current(cls, image, below=None):
        """The image's current state (``image``: an open Qcow2Image)."""
        hdr = image.header
        return cls(image.fd, hdr, hdr.l1_table_offset, hdr.l1_size, hdr.size, below,
                   "the current state")

    @classmethod
    def of_snapshot(cls, image, snapshot, below=None):
        """Internal snapshot ``snapshot`` (from ``read_snapshot_table``) of
        ``image``, at its own disk size (the image's current size if the
        snapshot does not record one, as QEMU assumes)."""
        size = snapshot.disk_size if snapshot.disk_size is not None else image.header.size
        return cls(image.fd, image.header, snapshot.l1_table_offset, snapshot.l1_size, size,
                   below, f"internal snapshot {snapshot.id}")

    def l2_offset(self, l1_index):
        """Offset of the L2 table of L1 entry ``l1_index`` (0: none)."""
        return self._l1[l1_index] & S.OFFSET_MASK if l1_index < len(self._l1) else 0

    def l2_table(self, l1_index):
        """The decoded L2 table of L1 entry ``l1_index``, or None.  Raises
        CorruptImage for a table outside the file or misaligned."""
        if l1_index >= len(self._l1):
            return None
        with self._lock:
            table = self._table(l1_index)[1]
            self._trim()
            return table

    def _trim(self):
        excess = len(self._l2) - max(1, L2_CACHE_BYTES // self.header.cluster_size)
        for _ in range(max(0, excess)):
            self._l2.popitem(last=False)


def differing_clusters(old, new, first, stop):
    """Runs ``(start, end)`` of guest cluster indexes in ``[first, stop)``
    whose L2 entries in state ``new`` differ from state ``old``'s (two
    states of the same file), in order.  ``old`` None stands for no tables
    at all: then every cluster ``new`` maps (data, zero or compressed) is
    listed.  Only tables that differ are read.  Raises CorruptImage."""
    hdr = new.header
    per_table = hdr.l2_entries
    words = 2 if hdr.extended_l2 else 1
    run = None
    for l1_index in range(first // per_table, -(-stop // per_table)):
        new_off = new.l2_offset(l1_index)
        old_off = old.l2_offset(l1_index) if old is not None else 0
        if new_off == old_off:
            continue            # one table (or none): the same entries
        base = l1_index * per_table
        lo, hi = max(first, base) - base, min(stop, base + per_table) - base
        new_table = new.l2_table(l1_index) if new_off else None
        old_table = old.l2_table(l1_index) if old_off else None
        for i in _differing_entries(new_table, old_table, lo, hi, words):
            cluster = base + i
            if run is not None and run[1] == cluster:
                run[1] += 1
            else:
                if run is not None:
                    yield tuple(run)
                run = [cluster, cluster + 1]
    if run is not None:
        yield tuple(run)


def _differing_entries(a, b, lo, hi, words):
    """Indexes in [lo, hi) where tables ``a`` and ``b`` (None: all zero)
    have different entries, COPIED flags aside."""
    if a is None or b is None:
        table = a if a is not None else b
        if words == 1:
            masked = [e & _WITHOUT_COPIED for e in table[lo:hi]]
        else:
            masked = [table[2 * i] & _WITHOUT_COPIED or table[2 * i + 1] for i in range(lo, hi)]
        return compress(range(lo, hi), masked)
    if words == 1:
        return (lo + j for j, (x, y) in enumerate(zip(a[lo:hi], b[lo:hi]))
                if (x ^ y) & _WITHOUT_COPIED)
    return (i for i in range(lo, hi)
            if (a[2 * i] ^ b[2 * i]) & _WITHOUT_COPIED or a[2 * i + 1] != b[2 * i + 1])
