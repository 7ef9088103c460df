"""``snapfs diff STORE VM A B``: the files that changed between two states.

A and B are snapshot names or ``active``.  For each layered disk both hold:

1. the guest ranges that may differ, from the two chains' qcow2 maps
   alone (``store.changed``, no data read);
2. the partitions of both versions (MBR/GPT, paired by number; a disk
   without a table is one filesystem, named after the disk); a partition
   that no changed range touches has no changes and is not opened;
3. the two filesystems, compared by ``guestfs.treediff`` looking only at
   the inodes and directories whose blocks meet a changed range (A's
   directories are all listed: that is how names are found).

Paths are printed from the root of each filesystem, prefixed by the name
of its view without ``.raw``: ``M sda-part1/etc/hosts``, ``+ vdb/data``
for a disk without partition table.  ``R old -> new`` as in ``zfs diff``,
and as it does, names are escaped: a byte that is a space, a backslash or
not printable is ``\\0ooo`` (its octal value), except that printable
non-ASCII characters of the name (in the locale's encoding) are shown as
they are.

Diffing ``active`` reads the active leaves' maps once, when the command
starts: if a mount writes the active view meanwhile, the answer mixes the
two moments (take a snapshot and diff that for a stable answer).  A VM
running in QEMU is refused: its guest writes the leaf the whole time.

Limitations: a partition whose start or size differs between A and B is
compared in full (no shortcut); a partition found in only one of them is
skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field

from ..errors import Busy, NotFound, SnapfsError
from ..guestfs.partitions import find_partitions
from ..guestfs.probe import open_guest_fs
from ..guestfs.treediff import diff_trees
from ..store.chain import Chain
from ..store.changed import RangeSet, changed_ranges
from ..store.inuse import held_by_qemu
from ..store.volume import VolumePool

ACTIVE = "active"


@dataclass
class ViewDiff:
    """One filesystem (a partition, or a whole disk) of one disk."""
    view: str                   # "sda-part1", or "sda" for a disk without partitions
    number: int | None          # the partition number; None for a whole disk
    status: str                 # "compared", "unchanged" or "skipped"
    kind: str | None = None     # "ext4"... when opened
    reason: str | None = None   # why it was skipped
    changed_bytes: int = 0      # bytes of the view in possibly changed ranges
    changes: list = field(default_factory=list)     # [treediff.Change]
    damaged: list = field(default_factory=list)     # [(path, message)]
    stats: dict = field(default_factory=dict)


@dataclass
class DiskDiff:
    disk: str
    status: str                 # "compared" or "skipped"
    reason: str | None = None
    changed_bytes: int = 0
    views: list = field(default_factory=list)       # [ViewDiff]


def diff_vm(store, vm, a, b):
    """[DiskDiff] for every disk of VM ``vm``, in its order.  Raises
    NotFound for an unknown VM or snapshot, Busy for ``active`` of a VM
    that runs in QEMU, ImageError for a broken volume."""
    m = store.load_vm(vm)
    states = {name: _state(store, m, name) for name in (a, b)}
    pool = VolumePool()
    try:
        out = []
        for disk in m.all_disks:
            if disk in m.special:
                out.append(DiskDiff(disk, "skipped", f"a {m.special[disk]['kind']} disk: "
                                                     f"no snapshot holds it"))
                continue
            missing = [name for name in (a, b) if disk not in states[name]]
            if missing:
                out.append(DiskDiff(disk, "skipped", f"not in snapshot {missing[0]}"))
                continue
            chain_a = Chain(pool, store.chain_refs(m, states[a][disk]))
            chain_b = Chain(pool, store.chain_refs(m, states[b][disk]))
            out.append(diff_disk(disk, chain_a, chain_b))
        return out
    finally:
        pool.close()


def _state(store, m, name):
    """{disk: top volume id} of snapshot ``name``, or of the active state."""
    if name == ACTIVE:
        for disk, vid in m.active.items():
            if held_by_qemu(store.volume_path(m.name, vid)):
                raise Busy(f"VM {m.name} runs in QEMU, which writes its active disks: diff a "
                           f"snapshot taken now instead (snapfs snapshot create)")
        return dict(m.active)
    snap = m.snapshot(name)
    if snap is None:
        raise NotFound(f"VM {m.name} has no snapshot {name!r} (nor is it {ACTIVE!r})")
    return dict(snap.volumes)


def diff_disk(disk, chain_a, chain_b):
    """The DiskDiff of two chains of one disk."""
    changed = changed_ranges(chain_a, chain_b)
    result = DiskDiff(disk, "compared", changed_bytes=changed.total())
    parts_a = {p.number: p for p in find_partitions(chain_a.read, chain_a.size)}
    parts_b = {p.number: p for p in find_partitions(chain_b.read, chain_b.size)}
    if not parts_a and not parts_b:
        size = min(chain_a.size, chain_b.size)
        result.views.append(_diff_view(disk, None, chain_a, (0, chain_a.size),
                                       chain_b, (0, chain_b.size), changed.window(0, size)))
        return result
    for number in sorted(set(parts_a) | set(parts_b)):
        view = f"{disk}-part{number}"
        pa, pb = parts_a.get(number), parts_b.get(number)
        if pa is None or pb is None:
            result.views.append(ViewDiff(view, number, "skipped", reason=(
                f"partition {number} exists only in {'B' if pa is None else 'A'}")))
            continue
        if (pa.start, pa.length) == (pb.start, pb.length):
            window = changed.window(pa.start, pa.length)
        else:
            window = RangeSet.everything(max(pa.length, pb.length))
        result.views.append(_diff_view(view, number, chain_a, (pa.start, pa.length),
                                       chain_b, (pb.start, pb.length), window))
    return result


def _diff_view(view, number, chain_a, where_a, chain_b, where_b, changed):
    if not changed:
        return ViewDiff(view, number, "unchanged")
    try:
        fs_a, why_a = open_guest_fs(_window_reader(chain_a, *where_a), where_a[1])
        fs_b, why_b = open_guest_fs(_window_reader(chain_b, *where_b), where_b[1])
    except SnapfsError as e:    # damaged, or a journal that cannot be replayed
        return ViewDiff(view, number, "skipped", reason=str(e), changed_bytes=changed.total())
    if fs_a is None or fs_b is None:
        reason = f"A: {why_a}" if fs_a is None else f"B: {why_b}"
        return ViewDiff(view, number, "skipped", reason=reason, changed_bytes=changed.total())
    if fs_a.kind != fs_b.kind:
        return ViewDiff(view, number, "skipped", reason=f"{fs_a.kind} in A, {fs_b.kind} in B",
                        changed_bytes=changed.total())
    with _no_cycle_collector():
        found = diff_trees(fs_a, fs_b, changed)
    return ViewDiff(view, number, "compared", kind=fs_a.kind, changed_bytes=changed.total(),
                    changes=found.changes, damaged=found.damaged, stats=found.stats)


@contextlib.contextmanager
def _no_cycle_collector():
    """The comparison keeps a few hundred thousand small objects (listings,
    decoded inodes, ranges) that reference counting frees, none in a
    cycle; the cyclic collector would scan them again each time the heap
    grew by a quarter, a fifth of the run time.  Off while it runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _window_reader(chain, start, length):
    """read(offset, n) of bytes [start, start+length) of the chain."""
    def read(offset, n):
        n = max(0, min(n, length - offset))
        return chain.read(start + offset, n) if n and offset >= 0 else b""
    return read


# -- output -------------------------------------------------------------------

def escape(name: bytes) -> str:
    """A path as ``zfs diff`` prints it: a space, a backslash and anything
    not printable become ``\\0ooo`` per byte; printable characters of the
    locale's encoding (UTF-8: accented letters) stay as they are."""
    out = []
    for ch in os.fsdecode(name):
        if ch.isprintable() and ch not in " \\":
            out.append(ch)
        else:
            out.extend(f"\\{byte:04o}" for byte in os.fsencode(ch))
    return "".join(out)


def text_lines(disks):
    """(stdout lines, stderr notes) of the text form."""
    lines, notes = [], []
    for disk in disks:
        if disk.status == "skipped":
            notes.append(f"{disk.disk}: skipped: {disk.reason}")
            continue
        for view in disk.views:
            if view.status == "skipped":
                notes.append(f"{view.view}: skipped: {view.reason}")
            for path, message in view.damaged:
                notes.append(f"{view.view}{escape(path)}: damaged: {message}")
            prefix = escape(view.view.encode())
            for c in view.changes:
                line = f"{c.change} {prefix}{escape(c.path)}"
                if c.new_path is not None:
                    line += f" -> {prefix}{escape(c.new_path)}"
                lines.append(line)
    return lines, notes


def to_json(vm, a, b, disks):
    """The JSON document of ``snapfs diff --json``: names as os.fsdecode
    gives them (undecodable bytes as lone surrogates, escaped by json)."""
    return {
        "vm": vm, "a": a, "b": b,
        "disks": {d.disk: {
            "status": d.status, **({"reason": d.reason} if d.reason else {}),
            "changed_bytes": d.changed_bytes,
            "partitions": {v.view: {
                "number": v.number, "status": v.status, "kind": v.kind,
                **({"reason": v.reason} if v.reason else {}),
                "changed_bytes": v.changed_bytes,
                "changes": [dict(change=c.change, path=os.fsdecode(c.path),
                                 **({"new_path": os.fsdecode(c.new_path)}
                                    if c.new_path is not None else {}))
                            for c in v.changes],
                "damaged": [{"path": os.fsdecode(p), "error": e} for p, e in v.damaged],
            } for v in d.views},
        } for d in disks},
    }
