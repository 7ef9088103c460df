"""Find and repair leaked clusters: refcounts higher than the number of
references to the cluster, as left by a process killed between allocating
a cluster and linking it, or after linking a replacement and before
freeing the old one.

References are counted the way ``qemu-img check`` counts them: the header
cluster, the L1, refcount and snapshot tables, every refcount block, each
L2 table once per L1 table naming it, and each data cluster once per L2
table scan (compressed data: every cluster its sectors touch).  Only
leaks are repaired (refcounts lowered); a refcount *lower* than its
references is corruption and is only reported.

Limitations: images with persistent bitmaps are not repaired.
"""

import os
from collections import Counter

from ..errors import CorruptImage, UnsupportedImage
from . import structs as S
from .header import read_header
from .mapping import read_u64_table
from .snapshots import read_snapshot_table


def _clusters(offset, length, cs):
    if length <= 0:
        return range(0)
    return range(offset // cs, (offset + length - 1) // cs + 1)


def _references(fd, hdr):
    cs = hdr.cluster_size
    refs = Counter()
    refs[0] += 1
    refs.update(_clusters(hdr.l1_table_offset, hdr.l1_size * 8, cs))
    reftable_len = hdr.refcount_table_clusters * cs
    refs.update(_clusters(hdr.refcount_table_offset, reftable_len, cs))
    for block in read_u64_table(fd, hdr.refcount_table_offset, reftable_len // 8):
        if block & S.OFFSET_MASK:
            refs[(block & S.OFFSET_MASK) // cs] += 1
    l1_tables = [(hdr.l1_table_offset, hdr.l1_size)]
    snapshots = read_snapshot_table(fd, hdr)
    if hdr.nb_snapshots:
        table_len = _snapshot_table_length(fd, hdr)
        refs.update(_clusters(hdr.snapshots_offset, table_len, cs))
        for snap in snapshots:
            refs.update(_clusters(snap.l1_table_offset, snap.l1_size * 8, cs))
            l1_tables.append((snap.l1_table_offset, snap.l1_size))
    shift = 62 - (hdr.cluster_bits - 8)
    words = 2 if hdr.extended_l2 else 1
    for l1_offset, l1_size in l1_tables:
        for l1e in read_u64_table(fd, l1_offset, l1_size):
            l2 = l1e & S.OFFSET_MASK
            if not l2:
                continue
            refs[l2 // cs] += 1
            table = read_u64_table(fd, l2, hdr.l2_entries * words)
            for entry in table[::words]:
                if entry & S.L2E_COMPRESSED:
                    host = entry & ((1 << shift) - 1)
                    sectors = ((entry >> shift) & ((1 << (hdr.cluster_bits - 8)) - 1)) + 1
                    refs.update(_clusters(host & ~511, sectors * 512, cs))
                elif entry & S.OFFSET_MASK:
                    refs[(entry & S.OFFSET_MASK) // cs] += 1
    return refs


def _snapshot_table_length(fd, hdr):
    """Bytes the snapshot table occupies (entries are variable length)."""
    raw = os.pread(fd, min(64 << 20, hdr.file_size - hdr.snapshots_offset), hdr.snapshots_offset)
    pos = 0
    for _ in range(hdr.nb_snapshots):
        fixed = S.SnapshotEntry.parse(raw[pos:])
        length = (S.SNAPSHOT_FIXED_LENGTH + fixed.extra_data_size + fixed.id_str_size
                  + fixed.name_size)
        pos += length + (-length % 8)
    return pos


class _RefcountBlocks:
    """Bit-packed refcount entries: each block read whole, entries written
    in place."""

    def __init__(self, fd, hdr):
        self.fd, self.hdr = fd, hdr
        self.bits = hdr.refcount_bits
        self.per_block = hdr.cluster_size * 8 // self.bits
        self.table = read_u64_table(fd, hdr.refcount_table_offset,
                                    hdr.refcount_table_clusters * hdr.cluster_size // 8)

    def blocks(self):
        """(first cluster, block offset, entries) for each refcount block."""
        for b, entry in enumerate(self.table):
            offset = entry & S.OFFSET_MASK
            if offset:
                raw = os.pread(self.fd, self.hdr.cluster_size, offset)
                yield b * self.per_block, offset, self._decode(raw)

    def _decode(self, raw):
        if self.bits >= 8:
            width = self.bits // 8
            return [int.from_bytes(raw[i:i + width], "big") for i in range(0, len(raw), width)]
        # Sub-byte entries: entry 0 is the least significant bits, as in QEMU.
        mask = (1 << self.bits) - 1
        per_byte = 8 // self.bits
        return [(byte >> (k * self.bits)) & mask for byte in raw for k in range(per_byte)]

    def set(self, block_offset, index, value):
        bit = index * self.bits
        if self.bits >= 8:
            os.pwrite(self.fd, value.to_bytes(self.bits // 8, "big"), block_offset + bit // 8)
            return
        byte = os.pread(self.fd, 1, block_offset + bit // 8)[0]
        shift = bit % 8
        mask = ((1 << self.bits) - 1) << shift
        os.pwrite(self.fd, bytes([(byte & ~mask) | (value << shift)]), block_offset + bit // 8)


def repair_leaks(path, dry_run=False):
    """Lower leaked refcounts in the qcow2 image at ``path``.  Returns
    (leaks found, corruptions found).  Raises CorruptImage/UnsupportedImage."""
    fd = os.open(path, (os.O_RDONLY if dry_run else os.O_RDWR) | os.O_CLOEXEC)
    try:
        hdr = read_header(fd, path)
        if any(t == S.EXT_BITMAPS for t, _ in hdr.extensions):
            raise UnsupportedImage(path, "images with persistent bitmaps are not repaired")
        refs = _references(fd, hdr)
        blocks = _RefcountBlocks(fd, hdr)
        leaks = corruptions = 0
        for first, offset, entries in blocks.blocks():
            for index, have in enumerate(entries):
                want = refs.get(first + index, 0)
                if have > want:
                    leaks += 1
                    if not dry_run:
                        blocks.set(offset, index, want)
                elif have < want:
                    corruptions += 1
        if leaks and not dry_run:
            os.fdatasync(fd)
        return leaks, corruptions
    except (IndexError, ValueError) as e:
        raise CorruptImage(path, f"cannot scan refcounts: {e}") from None
    finally:
        os.close(fd)
