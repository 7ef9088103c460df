"""Translate a qcow2 image's L1/L2 tables into guest extents ("runs").

A run is ``(guest_start, length, kind, host, aux)``:

- ``DATA``: guest bytes are at ``host`` in this image's file;
- ``ZERO``: guest bytes read as zeros (the v3 zero flag, or a zero
  subcluster);
- ``COMPRESSED``: one whole cluster compressed at ``host``, ``aux`` bytes
  long; ``guest_start`` is the cluster's start.

Unallocated ranges produce no run: they fall through to the backing file.
Runs come out sorted by guest offset, adjacent DATA/ZERO runs coalesced.
Tables are read in bulk, one pread per L1 and per L2 table.
"""

import itertools
import os
import sys
from array import array

from ..errors import CorruptImage
from . import structs as S

DATA = 1
ZERO = 2
COMPRESSED = 3

_SWAP = sys.byteorder == "little"
_LOW32 = 0xFFFFFFFF


def read_u64_table(fd, offset, count):
    """Read ``count`` big-endian u64 values at ``offset`` as an array('Q')."""
    raw = os.pread(fd, count * 8, offset)
    table = array("Q")
    table.frombytes(raw[:len(raw) - len(raw) % 8])
    if _SWAP:
        table.byteswap()
    return table


class _RunBuilder:
    """Collects runs in guest order, coalescing contiguous ones."""

    def __init__(self):
        self.runs = []

    def add(self, start, length, kind, host=0, aux=0):
        runs = self.runs
        if runs and kind != COMPRESSED:
            s, n, k, h, a = runs[-1]
            if k == kind and s + n == start and (kind == ZERO or h + n == host):
                runs[-1] = (s, n + length, k, h, a)
                return
        runs.append((start, length, kind, host, aux))


def image_runs(fd, hdr, l1_offset=None, l1_size=None):
    """Runs of the active L1 table (or of a snapshot's, if given).

    Raises CorruptImage when a table or a cluster lies outside the file or is
    misaligned, or an entry is self-contradictory.
    """
    if l1_offset is None:
        l1_offset, l1_size = hdr.l1_table_offset, hdr.l1_size
    cs = hdr.cluster_size
    per_l2 = hdr.l2_entries * cs
    needed_l1 = min(l1_size, -(-hdr.size // per_l2))
    l1 = read_u64_table(fd, l1_offset, needed_l1)
    if len(l1) < needed_l1:
        raise CorruptImage(hdr.path, "L1 table is truncated")
    out = _RunBuilder()
    seen = set()
    for index, l1e in enumerate(l1):
        l2_offset = l1e & S.OFFSET_MASK
        if not l2_offset:
            continue
        # Each L2 table of one L1 table is distinct in a valid image; this
        # bounds the work and the map by the file's size.
        if l2_offset in seen:
            raise CorruptImage(hdr.path, f"L2 table at {l2_offset:#x} is referenced twice")
        seen.add(l2_offset)
        if l2_offset % cs:
            raise CorruptImage(hdr.path, f"L2 table offset {l2_offset:#x} is not cluster aligned")
        if l2_offset + cs > hdr.file_size:
            raise CorruptImage(hdr.path, f"L2 table at {l2_offset:#x} lies past the end of the file")
        base = index * per_l2
        count = min(hdr.l2_entries, -(-(hdr.size - base) // cs))
        words = count * (2 if hdr.extended_l2 else 1)
        table = read_u64_table(fd, l2_offset, words)
        if hdr.extended_l2:
            _extended_runs(hdr, table, base, out)
        else:
            _standard_runs(hdr, table, base, out)
    return _clip(out.runs, hdr.size)


def _compressed(hdr, entry):
    """(host offset, byte count) of a compressed cluster descriptor."""
    shift = 62 - (hdr.cluster_bits - 8)
    host = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (hdr.cluster_bits - 8)) - 1)) + 1
    nbytes = sectors * 512 - (host & 511)
    if host == 0 or host >= hdr.file_size:
        raise CorruptImage(hdr.path, f"compressed cluster at {host:#x} lies outside the file")
    return host, min(nbytes, hdr.file_size - host)


def _check_data_cluster(hdr, host):
    if host % hdr.cluster_size:
        raise CorruptImage(hdr.path, f"data cluster offset {host:#x} is not cluster aligned")
    if host >= hdr.file_size:
        raise CorruptImage(hdr.path, f"data cluster at {host:#x} lies past the end of the file")


def _standard_runs(hdr, table, base, out):
    cs = hdr.cluster_size
    # Most entries of a sparse layer are zero: skip them in C (find over a
    # 200-VM store spent a sixth of its time in this loop).
    for i in itertools.compress(range(len(table)), table):
        entry = table[i]
        guest = base + i * cs
        if entry & S.L2E_COMPRESSED:
            host, nbytes = _compressed(hdr, entry)
            out.add(guest, cs, COMPRESSED, host, nbytes)
        elif entry & S.L2E_ZERO:
            out.add(guest, cs, ZERO)
        else:
            host = entry & S.OFFSET_MASK
            if host:
                _check_data_cluster(hdr, host)
                out.add(guest, cs, DATA, host)


def _extended_runs(hdr, table, base, out):
    cs = hdr.cluster_size
    sc = cs // 32
    for i in range(0, len(table) - 1, 2):
        entry, bitmap = table[i], table[i + 1]
        if not entry and not bitmap:
            continue
        guest = base + (i // 2) * cs
        if entry & S.L2E_COMPRESSED:
            if bitmap:
                raise CorruptImage(hdr.path, "compressed cluster with a subcluster bitmap")
            host, nbytes = _compressed(hdr, entry)
            out.add(guest, cs, COMPRESSED, host, nbytes)
            continue
        alloc, zero = bitmap & _LOW32, bitmap >> 32
        if alloc & zero:
            raise CorruptImage(hdr.path, f"subcluster both allocated and zero at guest {guest:#x}")
        host = entry & S.OFFSET_MASK
        if alloc:
            if not host:
                raise CorruptImage(hdr.path, f"allocated subclusters without a cluster at guest {guest:#x}")
            _check_data_cluster(hdr, host)
        if alloc == _LOW32:
            out.add(guest, cs, DATA, host)
            continue
        if zero == _LOW32:
            out.add(guest, cs, ZERO)
            continue
        for j in range(32):
            bit = 1 << j
            if alloc & bit:
                out.add(guest + j * sc, sc, DATA, host + j * sc)
            elif zero & bit:
                out.add(guest + j * sc, sc, ZERO)


def _clip(runs, size):
    """Drop or shorten runs that reach past the virtual size (last cluster)."""
    while runs and runs[-1][0] + runs[-1][1] > size:
        s, n, k, h, a = runs.pop()
        if s < size:
            runs.append((s, size - s, k, h, a))
            break
    return runs
