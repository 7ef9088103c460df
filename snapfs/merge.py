"""Deleting a snapshot by merging its volume B with its child C.

Two directions, whichever moves fewer bytes (DESIGN.md section 4):

- *commit*: copy C's own clusters (data and zero) into B; C's child is then
  pointed at B and B takes over C's role.  Needs equal virtual sizes.
- *stream*: copy into C the parts of B's view that C does not override;
  C is then pointed at B's parent.

Both are idempotent: the source never changes, so a merge interrupted at
any point is finished by running it again from the start.
"""

import errno
import os
from dataclasses import dataclass

from .chain import Chain, VolumeRef
from .errors import NoSpace, SnapfsError
from .faults import crashpoint
from .qcow2.mapping import COMPRESSED, DATA, ZERO
from .volume import VolumePool

# Data is copied in pieces of this size: big enough for sequential I/O,
# small enough to report progress and keep memory flat.
COPY_CHUNK = 4 << 20
# Slack on top of the worst-case estimate: metadata we do not count exactly.
SPACE_SLACK = 8 << 20


@dataclass
class Ranges:
    """Sorted, disjoint [start, end) ranges, with the kind of each."""
    items: list

    @property
    def data_bytes(self):
        return sum(e - s for s, e, kind in self.items if kind != ZERO)


def own_ranges(pool, ref):
    """The ranges a volume defines itself (not inherited from its backing).

    A raw volume defines everything, but its holes need not be copied when
    nothing lies beneath it, so they are reported as ZERO."""
    vol = pool.get(ref.path, ref.format)
    if ref.format == "raw":
        return Ranges(_raw_segments(vol))
    out = []
    for start, length, kind, _, _ in pool.runs(vol):
        kind = ZERO if kind == ZERO else DATA
        if out and out[-1][1] == start and out[-1][2] == kind:
            out[-1] = (out[-1][0], start + length, kind)
        else:
            out.append((start, start + length, kind))
    return Ranges(out)


def _raw_segments(vol):
    out, pos = [], 0
    while pos < vol.size:
        try:
            data = os.lseek(vol.fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return [(0, vol.size, DATA)]
            data = vol.size
        if data > pos:
            out.append((pos, min(data, vol.size), ZERO))
        if data >= vol.size:
            break
        hole = min(os.lseek(vol.fd, data, os.SEEK_HOLE), vol.size)
        out.append((data, hole, DATA))
        pos = hole
    return out


def subtract(ranges, holes):
    """Parts of ``ranges`` not covered by any range in ``holes``."""
    out = []
    j = 0
    for start, end, kind in ranges:
        cur = start
        while j < len(holes) and holes[j][1] <= cur:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < end:
            if holes[k][0] > cur:
                out.append((cur, holes[k][0], kind))
            cur = max(cur, holes[k][1])
            k += 1
        if cur < end:
            out.append((cur, end, kind))
    return out


@dataclass
class MergePlan:
    disk: str
    b: str            # the deleted snapshot's volume
    c: str            # its child
    d: str | None     # C's child, if any
    direction: str    # "commit" or "stream"
    copy: list        # [(start, end, kind)] to write into the target
    bytes: int        # data bytes moved

    def to_json(self):
        return {"b": self.b, "c": self.c, "d": self.d, "direction": self.direction,
                "bytes": self.bytes}


def plan_merge(store, manifest, disk, b, pool, direction=None):
    """Plan merging volume ``b`` of ``disk`` with its child: in the given
    ``direction``, or in the one that moves fewer bytes."""
    children = manifest.children(b)
    if len(children) != 1:
        raise SnapfsError(f"volume {b} has {len(children)} children; cannot merge")
    c = children[0]
    grandchildren = manifest.children(c)
    d = grandchildren[0] if grandchildren else None
    ref = lambda vid: VolumeRef(store.volume_path(manifest.name, vid), manifest.volumes[vid]["format"])
    b_vol = pool.get(ref(b).path, ref(b).format)
    c_vol = pool.get(ref(c).path, ref(c).format)
    c_own = own_ranges(pool, ref(c))
    commit = MergePlan(disk, b, c, d, "commit", c_own.items, c_own.data_bytes)
    b_own = own_ranges(pool, ref(b)).items
    if manifest.volumes[b]["parent"] is None:
        # Nothing lies beneath B: its zero ranges read the same without it.
        b_own = [r for r in b_own if r[2] != ZERO]
    if c_vol.size > b_vol.size:
        # Past B's end, C read zeros; beneath B there may be data.
        b_own = b_own + [(b_vol.size, c_vol.size, ZERO)]
    stream_copy = [(s, min(e, c_vol.size), k) for s, e, k in subtract(b_own, c_own.items)
                   if s < c_vol.size]
    stream = MergePlan(disk, b, c, d, "stream", stream_copy,
                       sum(e - s for s, e, k in stream_copy if k != ZERO))
    if direction is not None:
        return commit if direction == "commit" else stream
    if b_vol.size == c_vol.size and commit.bytes <= stream.bytes:
        return commit
    return stream


def space_needed(plan, cluster_size=1 << 16):
    """Worst case: every copied range lands in new clusters, plus tables."""
    total = 0
    for start, end, kind in plan.copy:
        if kind != ZERO:
            total += (end - start) + 2 * cluster_size
    return total + total // 512 + SPACE_SLACK


def check_space(directory, plans):
    need = sum(space_needed(p) for p in plans)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NoSpace(f"deleting needs up to {need >> 20} MiB free in {directory}, "
                      f"only {free >> 20} MiB available; nothing was changed")


def execute_merge(store, manifest, plan, progress=None):
    """Step 2: move the data.  Idempotent; raises NoSpace on ENOSPC."""
    from .writers import open_writer
    name = manifest.name
    vols = manifest.volumes
    pool = VolumePool()
    try:
        if plan.direction == "commit":
            source = Chain(pool, [VolumeRef(store.volume_path(name, plan.c), vols[plan.c]["format"])])
            target, target_fmt = plan.b, vols[plan.b]["format"]
            below_ids = manifest.chain(vols[plan.b]["parent"]) if vols[plan.b]["parent"] else []
        else:
            source = Chain(pool, store.chain_refs(manifest, plan.b))
            target, target_fmt = plan.c, vols[plan.c]["format"]
            below_ids = manifest.chain(plan.b)
        below = None
        if below_ids:
            below = Chain(pool, [VolumeRef(store.volume_path(name, v), vols[v]["format"])
                                 for v in below_ids]).read
        writer = open_writer(store.volume_path(name, target), target_fmt, below)
        try:
            done = 0
            for start, end, kind in plan.copy:
                pos = start
                while pos < end:
                    n = min(COPY_CHUNK, end - pos)
                    if kind == ZERO:
                        writer.write_zeroes(pos, n)
                    else:
                        writer.write(pos, source.read(pos, n))
                        done += n
                    pos += n
                    crashpoint("delete:copy")
                    if progress:
                        progress(done)
            writer.flush()
        finally:
            writer.close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(f"{store.vm_dir(name)}: no space left while merging; free space and "
                          f"retry: the deletion resumes where it stopped") from None
        raise
    finally:
        pool.close()
