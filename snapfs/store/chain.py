"""A disk's chain of volumes, flattened into one raw view.

Opening a chain merges the runs of every layer, top first, into one sorted
extent map; a read of any offset is then a bisect and a pread, never a walk
down the chain.  Snapshot chains never change, so the map is built once.

Semantics follow QEMU: an unallocated range falls through to the backing
volume; ranges past a backing volume's end read as zeros; a chain reads no
further than its top volume's size.
"""

import bisect
import os
from array import array
from dataclasses import dataclass

from ..errors import ImageError
from ..qcow2.mapping import COMPRESSED, DATA, ZERO

# The deepest chain the store keeps: one volume per snapshot, so nightly
# snapshots kept for almost three years.  Checked before a snapshot or a
# preview adds a layer (ops/operations.py), and again on every load.  Chains
# found in imported images have their own, lower limit (ops/discover.py).
MAX_CHAIN_DEPTH = 1024
# Clusters a read in the event loop may decompress itself (see Chain.read):
# a small random read then needs no thread hop, which costs about as much
# as decompressing one 64 KiB cluster.
INLINE_DECOMPRESS = 1

_ZEROS = bytes(1 << 20)


@dataclass(frozen=True)
class VolumeRef:
    path: str
    format: str  # "qcow2" or "raw"


def merge_runs(layers, size):
    """Merge per-layer runs into one extent map covering ``[0, size)``.

    ``layers`` is a list of ``(layer_size, runs)``, top first.  Returns a list
    of ``(start, length, kind, layer_index, host, aux, skip)`` sorted by
    start, where ``skip`` is the offset into a compressed cluster.
    """
    pieces = []
    gaps = [(0, size)]
    for index, (layer_size, runs) in enumerate(layers):
        clipped = []
        for a, b in gaps:
            if b > layer_size:
                if a < layer_size:
                    clipped.append((a, layer_size))
                pieces.append((max(a, layer_size), b - max(a, layer_size), ZERO, 0, 0, 0, 0))
            else:
                clipped.append((a, b))
        gaps = _fill_gaps(clipped, runs, index, pieces)
        if not gaps:
            break
    for a, b in gaps:
        pieces.append((a, b - a, ZERO, 0, 0, 0, 0))
    pieces.sort()
    return _coalesce(pieces)


def _fill_gaps(gaps, runs, index, pieces):
    """Fill ``gaps`` from ``runs``; return the parts still unresolved."""
    remaining = []
    first = 0
    nruns = len(runs)
    for a, b in gaps:
        while first < nruns and runs[first][0] + runs[first][1] <= a:
            first += 1
        cur = a
        j = first
        while j < nruns and runs[j][0] < b:
            start, length, kind, host, aux = runs[j]
            lo = max(start, cur)
            hi = min(start + length, b)
            if lo > cur:
                remaining.append((cur, lo))
            if hi > lo:
                if kind == DATA:
                    pieces.append((lo, hi - lo, DATA, index, host + lo - start, 0, 0))
                elif kind == COMPRESSED:
                    pieces.append((lo, hi - lo, COMPRESSED, index, host, aux, lo - start))
                else:
                    pieces.append((lo, hi - lo, ZERO, 0, 0, 0, 0))
                cur = hi
            j += 1
        if cur < b:
            remaining.append((cur, b))
    return remaining


def _coalesce(pieces):
    out = []
    for p in pieces:
        if not p[1]:
            continue
        if out:
            q = out[-1]
            if q[2] == p[2] and q[0] + q[1] == p[0] and (
                    p[2] == ZERO or (p[2] == DATA and q[3] == p[3] and q[4] + q[1] == p[4])):
                out[-1] = (q[0], q[1] + p[1]) + q[2:]
                continue
        out.append(p)
    return out


class Chain:
    """The flattened view of ``volumes`` (base first) from a VolumePool.

    Raises ImageError while opening if a volume is missing or corrupt, and
    CorruptImage from ``read`` if a compressed cluster is damaged.
    """

    def __init__(self, pool, refs):
        if not refs:
            raise ValueError("a chain needs at least one volume")
        if len(refs) > MAX_CHAIN_DEPTH:
            raise ImageError(refs[-1].path, f"chain deeper than {MAX_CHAIN_DEPTH} volumes")
        self.pool = pool
        self.volumes = [pool.get(r.path, r.format) for r in refs]
        top_first = list(reversed(self.volumes))
        self.size = top_first[0].size
        layers = [(v.size, pool.runs(v)) for v in top_first]
        pieces = merge_runs(layers, self.size)
        self.starts = array("Q", (p[0] for p in pieces))
        self.kinds = bytes(p[2] for p in pieces)
        # Index into top_first -> the Volume object, resolved once.
        self._vols = [top_first[p[3]] for p in pieces]
        self.hosts = array("Q", (p[4] for p in pieces))
        self.aux = array("Q", (p[5] for p in pieces))
        self.skips = array("Q", (p[6] for p in pieces))

    def extents(self):
        """(start, length, kind, volume path) for each extent, for tests and tools."""
        n = len(self.starts)
        for i in range(n):
            end = self.starts[i + 1] if i + 1 < n else self.size
            kind = self.kinds[i]
            yield (self.starts[i], end - self.starts[i], kind,
                   self._vols[i].path if kind != ZERO else None)

    def read(self, offset, length, wait=True):
        """Bytes ``[offset, offset+length)`` of the view, short at the end.

        With ``wait=False`` the caller is the event loop: the read
        decompresses at most INLINE_DECOMPRESS clusters that are not cached
        and gives up (returns None) when it would need more, so that big
        requests decompress in worker threads, on several cores at once.
        """
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        starts = self.starts
        count = len(starts)
        budget = INLINE_DECOMPRESS
        i = bisect.bisect_right(starts, offset) - 1
        parts = []
        pos = offset
        while pos < end:
            start = starts[i]
            stop = starts[i + 1] if i + 1 < count else self.size
            n = min(stop, end) - pos
            kind = self.kinds[i]
            if kind == DATA:
                parts.append(self._pread(self._vols[i], n, self.hosts[i] + pos - start))
            elif kind == COMPRESSED:
                vol = self._vols[i]
                skip = self.skips[i] + pos - start
                clusters = self.pool.clusters
                if wait:
                    cluster = clusters.get(vol, self.hosts[i], self.aux[i], skip + n)
                else:
                    cluster = clusters.peek(vol, self.hosts[i], skip + n)
                    if cluster is None:
                        if not budget:
                            return None
                        budget -= 1
                        cluster = clusters.get(vol, self.hosts[i], self.aux[i], skip + n)
                parts.append(cluster[skip:skip + n])
            else:
                parts.append(_zeros(n))
            pos += n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    def _pread(vol, n, host):
        data = os.pread(vol.fd, n, host)
        if len(data) < n:
            # A cluster that starts inside the file but is cut short by its
            # end reads as zeros, as in QEMU.
            data += bytes(n - len(data))
        return data


def _zeros(n):
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
