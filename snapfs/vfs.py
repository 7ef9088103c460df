"""The mounted namespace as plain objects (DESIGN.md section 2).

``Vfs`` answers "what is at this inode, what are its bytes"; it knows
nothing of FUSE.  Nodes are created lazily and keep their inode numbers for
the life of the mount.  Every method may block on disk I/O: the FUSE
adapter calls them from worker threads.

    <vm>/active/<disk>.raw                  the current state (read-only for now)
    <vm>/snapshots/<name>/<disk>.raw        the disk as of that snapshot
    <vm>/snapshots/<name>/<disk>-partN.raw  its partitions
    <vm>/snapshots/<name>/snapshot.json
    <vm>/snapshots/latest -> <name>

Limitations: the tree reflects the store as it was when each VM was first
looked up; layer operations (a later change) will refresh it.
"""

import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from .chain import Chain
from .errors import ImageError, NotFound, ReadOnly, SnapfsError, StoreError
from .partitions import find_partitions
from .volume import VolumePool

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Snapshot contents never change: the kernel may cache them for long.
IMMUTABLE_TIMEOUT = 3600.0
# Directories whose listing will change with layer operations.
MUTABLE_TIMEOUT = 1.0

DIR_MODE = stat.S_IFDIR | 0o555
VIEW_MODE = stat.S_IFREG | 0o440
LINK_MODE = stat.S_IFLNK | 0o777


@dataclass
class Node:
    inode: int
    name: str
    parent: int
    mode: int
    mtime_ns: int
    timeout: float = IMMUTABLE_TIMEOUT
    immutable: bool = True
    children: dict | None = None          # name -> inode, once listed
    lister: object = None                 # () -> list of Node specs
    view: object = None                   # DiskView / PartitionView / bytes
    target: str | None = None             # symlink target
    size: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)


class DiskView:
    """A disk as of one volume: opens (and merges) its chain on first use.

    A broken chain makes this view raise ImageError (EIO); the error is
    logged once.
    """

    def __init__(self, pool, refs):
        self.pool = pool
        self.refs = refs
        self._chain = None
        self._error = None
        self._lock = threading.Lock()

    @property
    def size(self):
        try:
            return self.pool.get(self.refs[-1].path, self.refs[-1].format).size
        except SnapfsError:
            return 0

    def chain(self):
        with self._lock:
            if self._chain is None and self._error is None:
                try:
                    self._chain = Chain(self.pool, self.refs)
                except SnapfsError as e:
                    self._error = e
                    log.error("volume broken, its views return EIO: %s", e)
            if self._error is not None:
                raise self._error
            return self._chain

    def read(self, offset, length):
        try:
            return self.chain().read(offset, length)
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(self.refs[-1].path, f"read failed: {e.strerror}") from None


class PartitionView:
    def __init__(self, disk, start, length):
        self.disk, self.start, self.size = disk, start, length

    def read(self, offset, length):
        if offset >= self.size:
            return b""
        return self.disk.read(self.start + offset, min(length, self.size - offset))


class Vfs:
    def __init__(self, store, pool=None):
        self.store = store
        self.pool = pool or VolumePool()
        self._nodes = {}
        self._next_inode = ROOT_INODE
        self._lock = threading.RLock()
        self.mount_time_ns = time.time_ns()
        root = self._add("", ROOT_INODE, DIR_MODE, self.mount_time_ns,
                         timeout=MUTABLE_TIMEOUT, lister=self._list_root)
        assert root.inode == ROOT_INODE

    # -- public interface (used by the FUSE adapter) -----------------------

    def node(self, inode):
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"no inode {inode}") from None

    def lookup(self, parent, name):
        """The child ``name`` of directory inode ``parent``.  Raises NotFound."""
        children = self._children(self.node(parent))
        inode = children.get(name)
        if inode is None:
            raise NotFound(f"no entry {name!r}")
        return self._nodes[inode]

    def listdir(self, inode):
        """[(name, Node)] in a stable order."""
        children = self._children(self.node(inode))
        return [(name, self._nodes[i]) for name, i in children.items()]

    def size(self, node):
        if node.view is not None and not isinstance(node.view, bytes):
            return node.view.size
        return node.size

    def open(self, inode, writable):
        node = self.node(inode)
        if node.is_dir:
            raise NotFound("is a directory")
        if writable:
            raise ReadOnly(f"{node.name} is read-only")
        if isinstance(node.view, DiskView):
            node.view.chain()    # EIO now rather than on the first read
        return node

    def read(self, inode, offset, length):
        view = self.node(inode).view
        if isinstance(view, bytes):
            return view[offset:offset + length]
        return view.read(offset, length)

    def readlink(self, inode):
        return self.node(inode).target

    def close(self):
        self.pool.close()

    # -- building the tree --------------------------------------------------

    def _add(self, name, parent, mode, mtime_ns, **kw):
        with self._lock:
            inode = self._next_inode
            self._next_inode += 1
            node = Node(inode=inode, name=name, parent=parent, mode=mode, mtime_ns=mtime_ns, **kw)
            self._nodes[inode] = node
            return node

    def _children(self, node):
        if not node.is_dir:
            raise NotFound(f"{node.name} is not a directory")
        with self._lock:
            if node.children is None:
                node.children = {}
                for spec in node.lister():
                    name = spec.pop("name")
                    child = self._add(name, node.inode, **spec)
                    node.children[name] = child.inode
            return node.children

    def _list_root(self):
        specs = []
        for vm in self.store.vm_names():
            try:
                manifest = self.store.load_vm(vm)
            except (SnapfsError, OSError) as e:
                log.error("VM %s is not shown: %s", vm, e)
                continue
            mtime = _iso_ns(manifest.created) or self.mount_time_ns
            specs.append(dict(name=vm, mode=DIR_MODE, mtime_ns=mtime, timeout=MUTABLE_TIMEOUT,
                              lister=lambda m=manifest: self._list_vm(m)))
        return specs

    def _list_vm(self, manifest):
        mtime = _iso_ns(manifest.created) or self.mount_time_ns
        return [
            dict(name="active", mode=DIR_MODE, mtime_ns=mtime, timeout=MUTABLE_TIMEOUT,
                 lister=lambda: self._list_disks(manifest, manifest.active, None)),
            dict(name="snapshots", mode=DIR_MODE, mtime_ns=mtime, timeout=MUTABLE_TIMEOUT,
                 lister=lambda: self._list_snapshots(manifest)),
        ]

    def _list_snapshots(self, manifest):
        specs = []
        for snap in manifest.snapshots:
            specs.append(dict(name=snap.name, mode=DIR_MODE,
                              mtime_ns=_iso_ns(snap.created) or self.mount_time_ns,
                              lister=lambda s=snap: self._list_disks(manifest, s.volumes, s)))
        if manifest.snapshots:
            newest = manifest.snapshots[-1]
            specs.append(dict(name="latest", mode=LINK_MODE, timeout=MUTABLE_TIMEOUT,
                              immutable=False, mtime_ns=_iso_ns(newest.created) or self.mount_time_ns,
                              target=newest.name, size=len(newest.name.encode())))
        return specs

    def _list_disks(self, manifest, volumes, snapshot):
        mtime = (_iso_ns(snapshot.created) if snapshot else None) or self.mount_time_ns
        specs = []
        info = {}
        for disk in manifest.disks:
            refs = self.store.chain_refs(manifest, volumes[disk])
            view = DiskView(self.pool, refs)
            specs.append(dict(name=f"{disk}.raw", mode=VIEW_MODE, mtime_ns=mtime, view=view))
            info[disk] = {"volume": volumes[disk], "chain": [os.path.basename(r.path) for r in refs],
                          "size": view.size}
            for part in self._partitions(view):
                specs.append(dict(name=f"{disk}-part{part.number}.raw", mode=VIEW_MODE,
                                  mtime_ns=mtime,
                                  view=PartitionView(view, part.start, part.length)))
        if snapshot is not None:
            doc = snapshot.to_json()
            doc["volumes"] = info
            data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
            specs.append(dict(name="snapshot.json", mode=VIEW_MODE, mtime_ns=mtime, view=data,
                              size=len(data)))
        return specs

    def _partitions(self, view):
        try:
            return find_partitions(view.read, view.size)
        except SnapfsError:
            return []    # already logged by the view


def _iso_ns(text):
    """Nanoseconds since the epoch of an ISO-8601 UTC time, or None."""
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except (ValueError, AttributeError):
        return None
