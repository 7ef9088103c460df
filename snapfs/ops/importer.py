"""``snapfs vm add``: build a VM from new blank disks and existing images.

A qcow2 chain is imported layer by layer: each backing layer becomes a
snapshot named after its file (oldest first) and the top becomes the active
state.  A layer's internal snapshots become snapshots too, just before the
layer itself, each a new volume holding what changed
(``internal_snapshots``); such a layer is rebuilt, never copied or moved,
so that no volume keeps a snapshot table.  A raw image becomes a read-only
base volume (a snapshot) with an empty overlay on top.  Blank disks get
empty layers so that every snapshot has a volume for every disk.

A caller with snapshot metadata of its own (libvirt's, ``libvirt_import``)
lays the snapshots out itself instead (``PlannedSnapshot``): each holds an
entry of the history of some disks, so chains may differ in length.

The VM is assembled in a hidden staging directory and renamed into place
with its manifest, so a failed or interrupted import leaves no VM behind.
Like every store file, the volumes are 0600 (moved images are chmodded,
and get their mode back if the import fails) and the directory 0700.
"""

import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone

from ..errors import AlreadyExists, InvalidArgument, SnapfsError
from ..qcow2.create import create_image, set_backing
from ..store import manifest as M
from ..store.chain import MAX_CHAIN_DEPTH, Chain, VolumeRef
from ..store.names import check_description, check_disk_name, check_name, check_snapshot_name
from ..store.sizes import looks_like_size, parse_size
from ..store.transfer import copy_file
from ..store.volume import VolumePool
from .discover import discover_chain
from .disk_kinds import SharedImport, parse_lun
from .internal_snapshots import history, rebuild_layer


@dataclass
class DiskSource:
    name: str
    size: int | None = None       # a new blank disk
    layers: list | None = None    # discovered image layers, base first

    @cached_property
    def history(self):
        """internal_snapshots.State of every snapshot, then of the active state."""
        return history(self.layers or [])

    @property
    def snapshot_count(self):
        if self.layers is None:
            return 0
        # The top qcow2 layer becomes the active leaf; a raw top is frozen
        # as a snapshot and gets a new overlay.
        return len(self.history) - (1 if self.layers[-1].format == "qcow2" else 0)

    @property
    def has_internal_snapshots(self):
        return any(layer.internal_snapshots for layer in self.layers or ())


@dataclass
class PlannedSnapshot:
    """A snapshot laid out by the caller: ``states`` maps each disk it holds
    to an index into that disk's ``DiskSource.history``."""
    name: str
    description: str
    created: str          # ISO-8601 UTC, as Snapshot.created
    states: dict
    consistency: str = "offline"


def parse_disk_spec(spec):
    """'NAME=SIZE' or 'NAME=PATH' -> DiskSource.  Raises InvalidArgument/ImageError."""
    name, sep, value = spec.partition("=")
    if not sep or not value:
        raise InvalidArgument(f"invalid --disk {spec!r}: use NAME=SIZE or NAME=PATH")
    check_disk_name(name)
    if os.path.lexists(value):
        return DiskSource(name, layers=discover_chain(value))
    if looks_like_size(value):
        return DiskSource(name, size=parse_size(value))
    raise InvalidArgument(f"invalid --disk {spec!r}: {value!r} is neither a size nor an existing file")


def now_utc():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mtime_utc(path):
    return datetime.fromtimestamp(os.stat(path).st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snapshot_names(sources, count):
    """Names from the first imaged disk (``generated_name``), made unique."""
    imaged = [s for s in sources if s.layers]
    names = []
    for i in range(count):
        stem = generated_name(imaged[0].history[i], i) if imaged else f"snap{i}"
        names.append(unique_name(stem, names))
    return names


def generated_name(state, i):
    """The name of snapshot ``i`` made of ``state``: its internal snapshot's
    name, or its layer file's name up to the first dot.  A name snapfs
    refuses (empty, '/', a control character, a leading '.', 'latest'...)
    becomes 'internal-ID' (the snapshot's ID in its image) or 'layerN'."""
    if state.snapshot is not None:
        return _internal_name(state.snapshot)
    stem = os.path.basename(state.layer.path).split(".")[0]
    try:
        return check_snapshot_name(stem)
    except SnapfsError:
        return f"layer{i}"


def unique_name(stem, taken):
    """``stem``, or with '-2', '-3'... if ``taken`` has it."""
    name, n = stem, 2
    while name in taken:
        name = f"{stem}-{n}"
        n += 1
    return name


def _internal_name(snapshot):
    try:
        return check_snapshot_name(snapshot.raw_name.decode("utf-8"))
    except (UnicodeDecodeError, SnapfsError):
        return f"internal-{snapshot.id}"


def describe_origin(states):
    """Where a snapshot came from (``states``: its entry in each imaged
    disk's history), as one line of text."""
    state = states[0]
    files = ", ".join(dict.fromkeys(os.path.basename(st.layer.path) for st in states))
    if state.snapshot is None:
        return f"imported from {os.path.basename(state.layer.path)}"
    name = state.snapshot.name or "(no name)"
    text = f"internal snapshot {name} of {files}"
    if any(st.snapshot.vm_state_size for st in states):
        text += " (its saved VM state was not imported)"
    try:
        return check_description(text)
    except SnapfsError:
        # A control character or an endless name: keep it readable on one line.
        return check_description(ascii(text)[1:-1][:1000])


def created_at(state):
    """When ``state`` was made: its internal snapshot's date, or its layer
    file's mtime (read it before a --move)."""
    if state.snapshot is not None:
        return state.snapshot.date.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _mtime_utc(state.layer.path)


def _check_snapshot_lists(sources):
    """Snapshot i of the VM is entry i of every imaged disk's history, so
    the histories must match: the same length, and internal snapshots of
    the same names at the same places (virsh makes one of the same name in
    every disk).  Raises InvalidArgument."""
    imaged = [s for s in sources if s.layers is not None]
    if not any(s.has_internal_snapshots for s in imaged):
        counts = {s.snapshot_count for s in imaged}
        if len(counts) > 1:
            detail = ", ".join(f"{s.name}: {s.snapshot_count}" for s in imaged)
            raise InvalidArgument(f"disks have backing chains of different lengths ({detail}); "
                                  "layer i of every disk must belong to snapshot i")
        return

    def listing(src, shown=8):
        names = [repr(st.snapshot.name) if st.snapshot else os.path.basename(st.layer.path)
                 for st in src.history[:src.snapshot_count]]
        return names[:shown] + ([f"... {len(names) - shown} more"] if len(names) > shown else [])

    def signature(src):
        return [st.snapshot.raw_name if st.snapshot else None
                for st in src.history[:src.snapshot_count]]

    if len({tuple(signature(s)) for s in imaged}) > 1:
        detail = "; ".join(f"{s.name}: {', '.join(listing(s)) or 'none'}" for s in imaged)
        raise InvalidArgument(f"the disks' snapshots do not match ({detail}): internal snapshots "
                              "are matched by name and position, layer i of every disk "
                              "belongs to snapshot i")


def _check_plan(sources, planned):
    """Each entry of an imaged disk's history but the active one belongs to
    exactly one planned snapshot, in the disk's order; names are valid and
    unique.  Raises InvalidArgument (InvalidName, AlreadyExists)."""
    by_name = {s.name: s for s in sources}
    held = {s.name: [] for s in sources if s.layers}
    names = set()
    for p in planned:
        check_snapshot_name(p.name)
        check_description(p.description)
        if p.consistency not in M.CONSISTENCIES:
            raise InvalidArgument(f"snapshot {p.name!r}: unknown consistency {p.consistency!r}")
        if p.name in names:
            raise AlreadyExists(f"two snapshots are named {p.name!r}")
        names.add(p.name)
        if not p.states:
            raise InvalidArgument(f"snapshot {p.name!r} holds no disk")
        for disk, i in p.states.items():
            src = by_name.get(disk)
            if src is None or not src.layers or not 0 <= i < src.snapshot_count:
                raise InvalidArgument(f"snapshot {p.name!r}: disk {disk!r} has no layer {i} "
                                      "below its active one")
            held[disk].append(i)
    for disk, got in held.items():
        if got != list(range(by_name[disk].snapshot_count)):
            raise InvalidArgument(f"disk {disk}: the snapshots must hold each of its "
                                  f"{by_name[disk].snapshot_count} layers below the active "
                                  f"one once, oldest first (they hold {got})")


def _check_depth(sources):
    for src in sources:
        if src.layers is None:
            continue
        depth = len(src.history) + (1 if src.layers[-1].format == "raw" else 0)
        if depth > MAX_CHAIN_DEPTH:
            raise InvalidArgument(f"{src.layers[-1].path}: its layers and internal snapshots "
                                  f"make {depth} volumes, more than the {MAX_CHAIN_DEPTH} "
                                  "a disk's chain may hold")


def add_vm(store, vm_name, specs, move=False, progress=None, luns=(), shareables=(),
           order=None, planned=None):
    """Create VM ``vm_name`` in ``store`` from ``specs`` ('NAME=SIZE|PATH',
    or a DiskSource already discovered), direct LUNs ``luns``
    ('NAME=/dev/X') and shareable disks ``shareables`` ('NAME=PATH' to
    import, 'NAME' to attach the store's).  The disks come in ``order``
    (names), or layered, LUNs, shareable.  ``planned`` (PlannedSnapshots,
    oldest first) replaces the rule that snapshot i is entry i of every
    disk's history; a blank disk then gets one volume, held by none.

    The caller holds the store lock.  Returns the new Manifest.
    """
    check_name(vm_name, "VM name")
    if store.has_vm(vm_name):
        raise AlreadyExists(f"VM {vm_name!r} already exists in {store.path}")
    if not (specs or luns or shareables):
        raise InvalidArgument("a VM needs at least one --disk, --lun or --shareable")
    sources = [s if isinstance(s, DiskSource) else parse_disk_spec(s) for s in specs]
    special = dict(parse_lun(spec) for spec in luns)
    shared = [SharedImport(store, spec) for spec in shareables]
    special.update((s.name, s.record) for s in shared)
    disk_names = [s.name for s in sources] + list(special)
    if len(set(disk_names)) != len(sources) + len(luns) + len(shareables):
        raise AlreadyExists("duplicate disk names")
    if order is not None and sorted(order) != sorted(disk_names):
        raise InvalidArgument(f"disk order {order} does not name the disks {disk_names}")
    if order is not None:
        sources.sort(key=lambda s: order.index(s.name))
    if planned is None:
        _check_snapshot_lists(sources)
        count = max((s.snapshot_count for s in sources if s.layers is not None), default=0)
    else:
        _check_plan(sources, planned)
        count = 0
    _check_depth(sources)
    if move:
        _check_movable(sources)

    imaged = [s for s in sources if s.layers]
    # Taken before any --move: the layer files' times say when each state
    # was made (internal snapshots have their own dates).
    created = [created_at(imaged[0].history[i]) if imaged else now_utc()
               for i in range(count)]
    staging = os.path.join(store.vms_dir, f".import-{uuid.uuid4()}")
    M.private_dir(staging)
    moved = []   # (store path, layer, original mode) to put back on failure
    made = []    # shared volumes written, removed on failure
    try:
        for share in shared:
            made.append(share.create(progress))
        volumes, chains = {}, {}
        for src in sources:
            chains[src.name] = _build_disk(src, count, staging, volumes, move, moved, progress)
        names = _snapshot_names(sources, count)
        snapshots = []
        for i in range(count):
            origin = describe_origin([s.history[i] for s in imaged]) if imaged else "empty layer"
            snapshots.append(M.Snapshot(str(uuid.uuid4()), names[i], origin, created[i],
                                        {d: chains[d][i] for d in chains}))
        for p in planned or ():
            snapshots.append(M.Snapshot(str(uuid.uuid4()), p.name, p.description, p.created,
                                        {d: chains[d][i] for d, i in p.states.items()},
                                        p.consistency))
        manifest = M.Manifest(name=vm_name, id=str(uuid.uuid4()), created=now_utc(),
                              disks=[s.name for s in sources], volumes=volumes,
                              snapshots=snapshots, active={d: chains[d][-1] for d in chains},
                              special=special, order=(order or disk_names) if special else None)
        M.save(manifest, os.path.join(staging, M.MANIFEST))
        target = store.vm_dir(vm_name)
        if os.path.exists(target):
            raise AlreadyExists(f"VM {vm_name!r} already exists in {store.path}")
        os.rename(staging, target)
        M.fsync_dir(store.vms_dir)
        manifest.path = os.path.join(target, M.MANIFEST)
        return manifest
    except BaseException:
        for inside, layer, mode in reversed(moved):
            if layer.backing:
                set_backing(inside, layer.backing, layer.backing_format)
            os.rename(inside, layer.path)
            # Unchanged if the chmod in was what failed (not the owner's file).
            if stat.S_IMODE(os.stat(layer.path).st_mode) != mode:
                os.chmod(layer.path, mode)
        shutil.rmtree(staging, ignore_errors=True)
        for path in made:
            if path:
                os.unlink(path)
        raise


def _check_movable(sources):
    for src in sources:
        for layer in src.layers or ():
            if layer.internal_snapshots:
                # Renamed in, the file would keep its snapshot table and the
                # clusters only the snapshots use; it is rebuilt instead.
                raise InvalidArgument(f"{layer.path}: has internal snapshots, which are imported "
                                      "as new layers, so it cannot be moved in; import it "
                                      "without --move (the file is left as it is)")
            if not os.access(os.path.dirname(os.path.abspath(layer.path)), os.W_OK):
                raise InvalidArgument(f"{layer.path}: cannot move, its directory is not writable")


def _build_disk(src, count, staging, volumes, move, moved, progress):
    """Create the volumes of one disk in ``staging``; return the volume ids
    of snapshots 0..count-1 followed by the active leaf."""
    ids = []
    parent = None

    def add(fmt):
        vid = str(uuid.uuid4())
        volumes[vid] = {"disk": src.name, "format": fmt, "parent": parent}
        ids.append(vid)
        return vid, os.path.join(staging, vid)

    if src.layers is None:
        for _ in range(count + 1):
            vid, path = add("qcow2")
            create_image(path, src.size, backing=parent, backing_format="qcow2" if parent else None)
            parent = vid
        return ids
    for layer in src.layers:
        if layer.internal_snapshots:
            def new_volume():
                nonlocal parent
                backing = parent
                parent, path = add("qcow2")
                return path, backing, volumes[backing]["format"] if backing else None

            _rebuild(layer, staging, ids[:], volumes, new_volume, progress)
            continue
        vid, path = add(layer.format)
        st = os.lstat(layer.path) if move else None
        # A symlink is copied, as a file on another filesystem is: moved,
        # it would put a link to a file outside into the store.
        if move and stat.S_ISREG(st.st_mode) and st.st_dev == os.stat(staging).st_dev:
            os.rename(layer.path, path)
            moved.append((path, layer, stat.S_IMODE(st.st_mode)))
            # The image keeps its inode, so its mode: 0644 from a umask of
            # 022 would let any local user read the disk in the store.
            os.chmod(path, M.FILE_MODE)
        else:
            copy_file(layer.path, path, progress=progress)
        if layer.format == "qcow2" and parent is not None:
            set_backing(path, parent, volumes[parent]["format"])
        parent = vid
    if src.layers[-1].format == "raw":
        vid, path = add("qcow2")
        create_image(path, src.layers[-1].size, backing=parent, backing_format="raw")
    return ids


def _rebuild(layer, staging, below, volumes, new_volume, progress):
    """Rebuild ``layer`` and its internal snapshots over the volumes
    ``below`` (its backing chain, already in ``staging``, base first)."""
    pool = VolumePool()
    try:
        chain = (Chain(pool, [VolumeRef(os.path.join(staging, v), volumes[v]["format"])
                              for v in below]) if below else None)
        rebuild_layer(layer, chain, new_volume, progress)
    finally:
        pool.close()
