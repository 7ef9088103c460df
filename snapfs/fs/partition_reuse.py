"""Partition tables shared along a disk's chain of volumes.

A snapshot usually has its parent's partition table.  If a table was read
through the chain below a volume, the volume has the same size, and it
defines none of the byte ranges that reading the table took, those ranges
read the same bytes through the volume's own chain: the table is the same,
and neither that chain nor its extent map is needed.  Listing a VM then
reads its base's table once and asks each volume above only for the L2
entries of those ranges (``defines_any``), instead of merging the runs of
every volume (~0.5 ms of CPU each, the bulk of a ``find`` over a big
store).

Limitations: the first volume that does define a range (a disk
repartitioned in some snapshot) sends the whole chain asked for to be read;
the volumes above it are then compared with that table.
"""

from dataclasses import dataclass

from ..errors import SnapfsError
from ..guestfs.partitions import find_partitions


@dataclass(frozen=True, slots=True)
class KnownTable:
    """A partition table as read through one chain."""
    size: int              # the chain's disk size
    ranges: tuple          # (offset, length) of every read that finding it took
    partitions: list


def read_table(view):
    """The KnownTable of ``view`` (``read(offset, length)``, ``size``), or
    None if reading failed (the view logs its own errors)."""
    size = view.size
    ranges = []

    def read(offset, length):
        ranges.append((offset, length))
        return view.read(offset, length)

    try:
        parts = find_partitions(read, size)
    except SnapfsError:
        return None
    return KnownTable(size, tuple(ranges), parts)


def chain_partitions(pool, known, refs, read_chain, remember_top=True, parallel_map=map):
    """The partitions of the disk that ``refs`` (base first) show.

    ``known`` maps a volume's path to the KnownTable of the chain it tops;
    it is the caller's to drop when volumes change (a merge rewrites them).
    ``read_chain(n)`` reads the table through ``refs[:n]`` and returns a
    KnownTable or None.  Without ``remember_top`` the top volume's table is
    neither kept nor taken from ``known``: the active leaf changes under
    writes.  ``parallel_map`` may be a thread pool's: the volumes above a known
    table are compared with it side by side, as each costs a few small
    reads from a cold cache.
    """
    top = len(refs) - 1

    def remember(k, table):
        if k < top or remember_top:
            known[refs[k].path] = table

    searched = top if remember_top else top - 1
    k = next((k for k in range(searched, -1, -1) if refs[k].path in known), None)
    if k is None:
        k, table = 0, read_chain(1)     # the base alone (the whole chain if it is one volume)
        if table is None:
            return []
        remember(0, table)
    else:
        table = known[refs[k].path]
    above = refs[k + 1:]
    same = list(parallel_map(lambda ref: _same_table(pool, ref, table), above))
    for k, same_table in enumerate(same, start=k + 1):
        if not same_table:
            table = read_chain(len(refs))
            if table is None:
                return []
            remember(top, table)
            break
        remember(k, table)
    return table.partitions


def _same_table(pool, ref, table):
    """Whether the chain topped by ``ref`` reads ``table``'s ranges as the
    chain below it does."""
    try:
        volume = pool.get(ref.path, ref.format)
        return volume.size == table.size and not volume.defines_any(table.ranges)
    except (SnapfsError, OSError):
        return False     # the chain meets it again, and reports it
