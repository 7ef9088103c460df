"""Importing internal qcow2 snapshots: each becomes a layer that holds only
what changed.

A layer L with internal snapshots X1..Xk (oldest first) becomes k + 1 new
qcow2 overlays in the store, each on the one before: X1's state over L's
backing chain, then what changed from X1 to X2, ..., then from Xk to L's
current state.  A state is L's tables at that moment over the *current*
state of L's backing chain, at that moment's disk size: what QEMU reverts
to.  The new volumes carry no snapshot table, so no cluster of L is stored
twice as QEMU's shared clusters would be if L were copied.

What a volume holds is found in two steps.  The tables of the two states
are compared first (``qcow2.states.differing_clusters``): clusters whose
L2 entries are equal read the same bytes.  Only where entries differ are
the bytes compared, because QEMU also copies a cluster when it is
rewritten with the same bytes, and a zero cluster may replace a cluster of
zeros.  The clusters whose bytes differ are written with the project's
writer in write-back mode: zeros as zero clusters, compressed clusters
inflated.

Nothing here is crash safe on its own: the importer builds in a hidden
staging directory that it removes on failure.
"""

import os
from dataclasses import dataclass

from tqdm import tqdm

from ..errors import InvalidArgument
from ..qcow2 import Qcow2Image
from ..qcow2.create import DEFAULT_CLUSTER_BITS, create_image
from ..qcow2.header import MAX_CLUSTER_BITS
from ..qcow2.mapping import ZERO
from ..qcow2.states import ImageState, differing_clusters
from ..qcow2.writer import Qcow2Writer
from ..store.transfer import PROGRESS_THRESHOLD

# Guest bytes compared and written per step: big enough for sequential
# I/O, small enough to keep memory flat.
CHUNK = 4 << 20


@dataclass(frozen=True)
class State:
    """One entry of a layer's history: an internal snapshot, or (None) the
    layer's current state."""
    layer: object                  # discover.Layer
    snapshot: object = None        # qcow2.snapshots.InternalSnapshot


def in_history_order(snapshots):
    """Oldest first: by date, then table order (sorted() is stable)."""
    return sorted(snapshots, key=lambda s: (s.date, s.date_nsec))


def history(layers):
    """The states of a chain of layers, oldest first: each layer's internal
    snapshots, then the layer itself."""
    return [State(layer, s) for layer in layers
            for s in in_history_order(layer.internal_snapshots) + [None]]


def rebuild_layer(layer, below, new_volume, progress=None):
    """Build one volume per internal snapshot of ``layer`` (oldest first)
    and one for its current state, each holding what changed since the
    state before; the first one what changed from ``below``.

    ``below`` is the flattened view of the store volumes that hold
    ``layer``'s backing chain (a store Chain), None without one.
    ``new_volume()`` names and records the next volume and returns
    ``(path, backing name, backing format)``: the backing is the volume made
    before (or the top of ``below``).  ``progress`` as for copy_file.

    Raises ImageError (CorruptImage for tables or clusters outside the
    file), NoSpace, OSError.
    """
    below_read = below.read if below is not None else None
    with Qcow2Image(layer.path) as image:
        states = [ImageState.of_snapshot(image, s, below_read)
                  for s in in_history_order(layer.internal_snapshots)]
        states.append(ImageState.current(image, below_read))
        before, before_size = None, below.size if below is not None else 0
        for state in states:
            path, backing, backing_format = new_volume()
            _create(path, state.size, backing, backing_format, image.header.cluster_bits)
            _write_changes(path, before, before_size, state, below, layer, progress)
            before, before_size = state, state.size


def _create(path, size, backing, backing_format, cluster_bits):
    """A new empty overlay with the source's clusters (a layer that changed
    one cluster then holds one cluster), or larger ones when a single
    refcount block of that size cannot describe the new image."""
    for bits in sorted({cluster_bits, max(cluster_bits, DEFAULT_CLUSTER_BITS), MAX_CLUSTER_BITS}):
        try:
            create_image(path, size, backing=backing,
                         backing_format=backing_format if backing else None, cluster_bits=bits)
            return
        except InvalidArgument:
            if bits == MAX_CLUSTER_BITS:
                raise


def candidate_ranges(before, before_size, state, below):
    """Sorted, disjoint guest ranges ``[start, end)`` where ``state`` may read
    differently from the volume below its new one, whose view is
    ``before`` (None: ``below`` itself) cut at ``before_size``.

    Inside both sizes that is where the tables differ.  Past the end of the
    view before (it reads zeros there), it is what ``state`` maps and what
    ``below`` holds; and the cluster across that end is always compared.
    """
    cs = state.header.cluster_size
    size = state.size
    common = min(before_size, size) // cs          # clusters inside both views
    ranges = [(a * cs, b * cs) for a, b in differing_clusters(before, state, 0, common)]
    tail = common * cs
    if tail < size:
        ranges.append((tail, tail + cs))
        ranges += [(a * cs, b * cs) for a, b in
                   differing_clusters(None, state, common, -(-size // cs))]
        if below is not None:
            ranges += [(max(start, tail), min(start + length, below.size))
                       for start, length, kind, _ in below.extents()
                       if kind != ZERO and start + length > tail and start < size]
    return _merged([(a, min(b, size)) for a, b in ranges if min(b, size) > a], cs, size)


def _merged(ranges, cs, size):
    """Whole clusters (the last one cut at ``size``): each is compared and
    written whole, as the writer would fill the rest from the view before."""
    out = []
    for a, b in sorted((a - a % cs, min(size, -(-b // cs) * cs)) for a, b in ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def _write_changes(path, before, before_size, state, below, layer, progress):
    """Write into the new volume at ``path`` the clusters of ``state`` whose
    bytes differ from the view before."""
    cs = state.header.cluster_size
    ranges = candidate_ranges(before, before_size, state, below)
    total = sum(b - a for a, b in ranges)
    # With no backing and no state before, the view before is all zeros:
    # every candidate is written, and the writer leaves out clusters of zeros.
    old_view = None if before is None and below is None else _view(before, before_size, below)
    writer = Qcow2Writer(path, below=old_view, write_back=True)
    try:
        show = progress if progress is not None else total >= PROGRESS_THRESHOLD
        label = os.path.basename(layer.path)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not show or None, leave=False) as bar:
            for start, end in ranges:
                for pos in range(start, end, CHUNK):
                    n = min(CHUNK, end - pos)
                    new = state.read(pos, n)
                    old = old_view(pos, n) if old_view is not None else None
                    for a, b in _differing_runs(new, old, pos, cs):
                        writer.write(a, memoryview(new)[a - pos:b - pos])
                    bar.update(n)
    finally:
        writer.close()


def _view(before, before_size, below):
    """Reader of the view under a new volume: ``before`` (else ``below``),
    zeros past ``before_size``."""
    source = before.read if before is not None else below.read

    def read(offset, length):
        n = max(0, min(length, before_size - offset))
        data = source(offset, n) if n else b""
        return data + bytes(length - len(data))
    return read


def _differing_runs(new, old, offset, cs):
    """Guest ranges of whole clusters (the last one may be short) where
    ``new`` and ``old`` (bytes at guest ``offset``; None: always differs)
    differ, adjacent ones merged."""
    runs = []
    first = offset - offset % cs
    for c0 in range(first, offset + len(new), cs):
        a, b = max(c0, offset) - offset, min(c0 + cs, offset + len(new)) - offset
        if old is not None and new[a:b] == old[a:b]:
            continue
        if runs and runs[-1][1] == offset + a:
            runs[-1][1] = offset + b
        else:
            runs.append([offset + a, offset + b])
    return runs
