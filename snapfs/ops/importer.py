"""``snapfs vm add``: build a VM from new blank disks and existing images.

A qcow2 chain is imported layer by layer: each backing layer becomes a
snapshot named after its file (oldest first) and the top becomes the active
state.  A raw image becomes a read-only base volume (a snapshot) with an
empty overlay on top.  Blank disks get empty layers so that every snapshot
has a volume for every disk.

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
from datetime import datetime, timezone

from ..errors import AlreadyExists, InvalidArgument, SnapfsError
from ..qcow2.create import create_image, set_backing
from ..store import manifest as M
from ..store.names import check_disk_name, check_name, check_snapshot_name
from ..store.sizes import looks_like_size, parse_size
from ..store.transfer import copy_file
from .discover import discover_chain


@dataclass
class DiskSource:
    name: str
    size: int | None = None       # a new blank disk
    layers: list | None = None    # discovered image layers, base first

    @property
    def snapshot_count(self):
        if self.layers is None:
            return 0
        # The top qcow2 layer becomes the active leaf; a raw top is frozen
        # as a snapshot and gets a new overlay.
        return len(self.layers) - (1 if self.layers[-1].format == "qcow2" else 0)


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
    """Names from the first imaged disk's layer files, made unique."""
    imaged = [s for s in sources if s.layers]
    names = []
    for i in range(count):
        stem = os.path.basename(imaged[0].layers[i].path).split(".")[0] if imaged else f"snap{i}"
        try:
            check_snapshot_name(stem)
        except SnapfsError:
            stem = f"layer{i}"
        name = stem
        n = 2
        while name in names:
            name = f"{stem}-{n}"
            n += 1
        names.append(name)
    return names


def add_vm(store, vm_name, specs, move=False, progress=None):
    """Create VM ``vm_name`` in ``store`` from ``specs`` ('NAME=SIZE|PATH').

    The caller holds the store lock.  Returns the new Manifest.
    """
    check_name(vm_name, "VM name")
    if store.has_vm(vm_name):
        raise AlreadyExists(f"VM {vm_name!r} already exists in {store.path}")
    if not specs:
        raise InvalidArgument("a VM needs at least one --disk")
    sources = [parse_disk_spec(s) for s in specs]
    if len({s.name for s in sources}) != len(sources):
        raise AlreadyExists("duplicate disk names")
    counts = {s.snapshot_count for s in sources if s.layers is not None}
    if len(counts) > 1:
        detail = ", ".join(f"{s.name}: {s.snapshot_count}" for s in sources if s.layers)
        raise InvalidArgument(f"disks have backing chains of different lengths ({detail}); "
                              "layer i of every disk must belong to snapshot i")
    count = counts.pop() if counts else 0
    if move:
        _check_movable(sources)

    imaged = [s for s in sources if s.layers]
    # Taken before any --move: the layer files' times say when each state was made.
    created = [_mtime_utc(imaged[0].layers[i].path) if imaged else now_utc()
               for i in range(count)]
    staging = os.path.join(store.vms_dir, f".import-{uuid.uuid4()}")
    M.private_dir(staging)
    moved = []   # (store path, layer, original mode) to put back on failure
    try:
        volumes, chains = {}, {}
        for src in sources:
            chains[src.name] = _build_disk(src, count, staging, volumes, move, moved, progress)
        names = _snapshot_names(sources, count)
        snapshots = []
        for i in range(count):
            origin = (f"imported from {os.path.basename(imaged[0].layers[i].path)}"
                      if imaged else "empty layer")
            snapshots.append(M.Snapshot(str(uuid.uuid4()), names[i], origin, created[i],
                                        {d: chains[d][i] for d in chains}))
        manifest = M.Manifest(name=vm_name, id=str(uuid.uuid4()), created=now_utc(),
                              disks=[s.name for s in sources], volumes=volumes,
                              snapshots=snapshots, active={d: chains[d][-1] for d in chains})
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
        raise


def _check_movable(sources):
    for src in sources:
        for layer in src.layers or ():
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
