"""Which guest ranges may differ between two chains, from their maps alone.

Two snapshots of one VM share their lower volumes, so most of a disk
resolves, in both chains, to the same cluster of the same volume file: those
bytes are equal without reading them.  ``changed_ranges`` walks the two
merged extent maps side by side (``Chain`` built them from the qcow2
L1/L2 tables when it opened) and keeps every range that does not resolve
identically.  It reads no guest data.

A range is unchanged when both chains resolve it to

* zeros (a zero cluster, or unallocated down to the bottom, or past a
  backing volume's end), or
* the same volume file at the same host offset (for a compressed cluster:
  the same cluster and the same offset into it).

Anything else is "possibly changed": two volumes may hold equal bytes (a
copy of a cluster), which a caller finds out by reading them.
"""

from __future__ import annotations

import bisect

from ..qcow2.mapping import COMPRESSED, DATA, ZERO


class RangeSet:
    """Sorted, disjoint ``[start, end)`` byte ranges of one view."""

    def __init__(self, ranges=()):
        merged = []
        for start, end in sorted((s, e) for s, e in ranges if e > s):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    @classmethod
    def everything(cls, size):
        return cls([(0, size)])

    def __iter__(self):
        return iter(zip(self.starts, self.ends))

    def __len__(self):
        return len(self.starts)

    def __bool__(self):
        return bool(self.starts)

    def total(self):
        """Bytes covered."""
        return sum(e - s for s, e in self)

    def intersects(self, start, length):
        """Does ``[start, start+length)`` meet a range of the set?"""
        if length <= 0:
            return False
        # The last range that starts before the end of the question.
        i = bisect.bisect_left(self.starts, start + length) - 1
        return i >= 0 and self.ends[i] > start

    def window(self, offset, length):
        """The part of the set inside ``[offset, offset+length)``, moved so
        that ``offset`` is 0: the changed ranges of a partition."""
        end = offset + length
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            lo, hi = max(self.starts[i], offset), min(self.ends[i], end)
            if hi > lo:
                out.append((lo - offset, hi - offset))
            i += 1
        return RangeSet(out)


def changed_ranges(a, b):
    """The ranges of guest offsets where chains ``a`` and ``b`` (two
    ``Chain`` objects, over one ``VolumePool`` or not) may hold different
    bytes, as a RangeSet.  Beyond the shorter chain's end everything
    counts as changed.  Reads no data: only the maps the chains hold."""
    size = min(a.size, b.size)
    out = []
    if max(a.size, b.size) > size:
        out.append((size, max(a.size, b.size)))
    ia = ib = 0
    pos = 0
    while pos < size:
        end_a = _piece_end(a, ia)
        end_b = _piece_end(b, ib)
        end = min(end_a, end_b, size)
        if not _same(a, ia, b, ib, pos):
            if out and out[-1][1] == pos:
                out[-1] = (out[-1][0], end)
            else:
                out.append((pos, end))
        pos = end
        if end == end_a:
            ia += 1
        if end == end_b:
            ib += 1
    return RangeSet(out)


def _piece_end(chain, i):
    return chain.starts[i + 1] if i + 1 < len(chain.starts) else chain.size


def _same(a, ia, b, ib, pos):
    """Do piece ``ia`` of ``a`` and piece ``ib`` of ``b`` hold the same
    bytes at guest offset ``pos``, judging by where they come from?"""
    kind = a.kinds[ia]
    if kind != b.kinds[ib]:
        return False
    if kind == ZERO:
        return True
    if a._vols[ia].path != b._vols[ib].path:
        return False
    into_a, into_b = pos - a.starts[ia], pos - b.starts[ib]
    if kind == DATA:
        return a.hosts[ia] + into_a == b.hosts[ib] + into_b
    if kind == COMPRESSED:
        return (a.hosts[ia] == b.hosts[ib]
                and a.skips[ia] + into_a == b.skips[ib] + into_b)
    return False
