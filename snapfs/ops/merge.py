"""Deleting a snapshot by merging its volume B with its child C.

Two directions, whichever moves fewer bytes (DESIGN.md section 4):

- *commit*: copy C's own clusters (data and zero) into B; C's child is then
  pointed at B and B takes over C's role.  Needs equal virtual sizes.
- *stream*: copy into C the parts of B's view that C does not override;
  C is then pointed at B's parent.

Both are idempotent: the source never changes, so a merge interrupted at
any point is finished by running it again from the start.

The copy reads the source in the order of its file, not of the guest, with
the kernel asked to read ahead and a thread reading ahead of the writes; it
writes the target in write-back mode (tables once per tens of MiB) and has
the kernel write the target's data back as it goes.  The disk then streams
both ways, and a merge costs a few syncs rather than one or two per range.
"""

import bisect
import ctypes
import errno
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

from ..errors import NoSpace, SnapfsError
from ..qcow2.mapping import COMPRESSED, DATA, ZERO
from ..store.chain import Chain, VolumeRef
from ..store.faults import crashpoint
from ..store.volume import VolumePool

# Data is copied in pieces of at most this size (a piece never spans two
# extents of the source file): big enough for sequential I/O, small enough
# to report progress and keep memory flat.
COPY_CHUNK = 4 << 20
# Bytes read ahead of the writer by a thread (memory: at most this plus
# one COPY_CHUNK).
READ_AHEAD = 16 << 20
# Bytes of the source the kernel is asked to read ahead of the thread.
HINT_AHEAD = 32 << 20
# Bytes written between two hints to the kernel to start writing them back.
WRITEBACK_EVERY = 8 << 20
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


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None


def _start_writeback(fd):
    """Start writing ``fd``'s dirty pages to disk without waiting for them
    (sync_file_range WRITE), so that the disk writes while the merge reads:
    the writer's next sync then finds its data mostly on disk already.  A
    hint only: ordering and durability still come from the writer's syncs."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
            _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint]
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _open_target(path, fmt, below):
    """The merge target's writer.

    A qcow2 target is written in write-back mode: each write puts its data
    in the file at once, and the table updates follow for tens of MiB of
    data at a time (and at the end), in the writer's usual order: data
    synced, then the tables that point at it.  A crash loses only table
    updates since the last write-back, which the idempotent merge redoes;
    no view ever sees a cluster before its data is on disk.  A write()
    that updated its tables at once would cost a sync or two per copied
    range, which dominated the merge of a fragmented layer."""
    if fmt == "raw":
        from ..store.writers import open_writer
        return open_writer(path, fmt)
    from ..qcow2.writer import Qcow2Writer
    return Qcow2Writer(path, below=below, on_step=lambda step: crashpoint(f"write:{step}"),
                       write_back=True)


def _pieces(copy, runs):
    """The pieces of ``copy`` as (start, length, kind, host), at most
    COPY_CHUNK bytes each: the ZERO ones first, then the data in the order
    it lies in the source's file.  ``runs`` are the source's own runs,
    which hold every data range of ``copy``; ``host`` is where a piece lies
    in the source's file (None: compressed, or not found).  A layer written
    in random order is then read sequentially rather than seek by seek;
    the target allocates its clusters in the order they come, whatever the
    guest order."""
    zeros, data = [], []
    starts = [r[0] for r in runs]
    for start, end, kind in copy:
        if kind == ZERO:
            zeros.append((-1, start, end, kind, None))
            continue
        pos = start
        i = bisect.bisect_right(starts, pos) - 1
        while pos < end:
            while i + 1 < len(runs) and runs[i + 1][0] <= pos:
                i += 1
            if i >= 0 and pos < runs[i][0] + runs[i][1]:
                r_start, r_len, r_kind, host = runs[i][:4]
                stop = min(end, r_start + r_len)
                key = host if r_kind == COMPRESSED else host + pos - r_start
                host = key if r_kind == DATA else None
            else:   # not in the source's runs (not expected): guest order, last
                stop = min(end, runs[i + 1][0]) if i + 1 < len(runs) else end
                key, host = 1 << 64, None
            data.append((key, pos, stop, kind, host))
            pos = stop
    data.sort()
    out = []
    for _, start, end, kind, host in zeros + data:
        for pos in range(start, end, COPY_CHUNK):
            out.append((pos, min(COPY_CHUNK, end - pos), kind,
                        None if host is None else host + pos - start))
    return out


def _read_ahead(source, fd, pieces):
    """Yield (start, length, kind, host, data) for ``pieces`` (from
    ``_pieces``), in order, while a thread reads up to READ_AHEAD bytes
    ahead from ``source``, so that reading the source overlaps with writing
    the target.  Pieces that lie in the source's file (``host`` not None)
    are not read: the caller copies them file to file, and the thread asks
    the kernel to read the next HINT_AHEAD bytes of that file (``fd``;
    POSIX_FADV_WILLNEED) ahead of the copy.  ``data`` is None for those and
    for ZERO pieces.  Close the generator to stop the thread."""
    hint = {"next": 0, "end": 0}     # the thread's: next piece to hint, bytes hinted

    def read(index):
        start, n, _, host = pieces[index]
        if host is None:
            return source.read(start, n)
        hint["end"] = max(hint["end"], host)
        while hint["next"] < len(pieces) and hint["end"] < host + HINT_AHEAD:
            _, hn, _, hhost = pieces[hint["next"]]
            hint["next"] += 1
            if hhost is not None and hhost + hn > hint["end"]:
                os.posix_fadvise(fd, hhost, hn, os.POSIX_FADV_WILLNEED)
                hint["end"] = hhost + hn
        return None

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")
    window = deque()
    submitted = buffered = 0     # pieces handed to the thread; their bytes not yet yielded
    try:
        while True:
            while submitted < len(pieces) and (not window or buffered < READ_AHEAD):
                start, n, kind, host = pieces[submitted]
                future = None
                if kind != ZERO:
                    future = pool.submit(read, submitted)
                    buffered += n     # copied pieces too: this bounds the hints
                window.append((start, n, kind, host, future))
                submitted += 1
            if not window:
                return
            start, n, kind, host, future = window.popleft()
            if future is not None:
                buffered -= n
            yield start, n, kind, host, None if future is None else future.result()
    finally:
        for *_, future in window:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=True)


def execute_merge(store, manifest, plan, progress=None):
    """Step 2: move the data.  Idempotent; raises NoSpace on ENOSPC."""
    name = manifest.name
    vols = manifest.volumes
    pool = VolumePool()
    try:
        if plan.direction == "commit":
            source = Chain(pool, [VolumeRef(store.volume_path(name, plan.c), vols[plan.c]["format"])])
            target = plan.b
            parent = vols[plan.b]["parent"]
            below = Chain(pool, store.chain_refs(manifest, parent)).read if parent else None
        else:
            source = Chain(pool, store.chain_refs(manifest, plan.b))
            target = plan.c
            below = source.read       # C's backing chain is B's (thread-safe reads)
        writer = _open_target(store.volume_path(name, target), vols[target]["format"], below)
        # sync_file_range can block while the disk is busy: not in this thread.
        kicker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writeback")
        try:
            done = kicked = 0
            kick = None
            top = source.volumes[-1]
            pieces = _pieces(plan.copy, pool.runs(top))
            with closing(_read_ahead(source, top.fd, pieces)) as items:
                for pos, n, kind, host, data in items:
                    if kind == ZERO:
                        writer.write_zeroes(pos, n)
                    else:
                        if data is None:
                            writer.copy_from(pos, top.fd, host, n)
                        else:
                            writer.write(pos, data)
                        done += n
                        if done - kicked >= WRITEBACK_EVERY and (kick is None or kick.done()):
                            kick = kicker.submit(_start_writeback, writer.fd)
                            kicked = done
                    crashpoint("delete:copy")
                    if progress:
                        progress(done)
            kicker.shutdown(wait=True)
            writer.flush()
        finally:
            kicker.shutdown(wait=True)
            writer.close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(f"{store.vm_dir(name)}: no space left while merging; free space and "
                          f"retry: the deletion resumes where it stopped") from None
        raise
    finally:
        pool.close()
