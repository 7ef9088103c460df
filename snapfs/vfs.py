"""The mounted namespace as plain objects (DESIGN.md section 2).

``Vfs`` answers "what is at this inode, what are its bytes" and carries out
what the shell asks of it (mkdir, rmdir, mv, writes to control files); it
knows nothing of FUSE.  Nodes are created lazily and keep their inode
numbers while what they show is unchanged.  Every method may block on disk
I/O: the FUSE adapter calls them from worker threads.

    <vm>/active/<disk>.raw                  the current state, read-write
    <vm>/snapshots/<name>/<disk>.raw        the disk as of that snapshot
    <vm>/snapshots/<name>/<disk>-partN.raw  its partitions
    <vm>/snapshots/<name>/snapshot.json
    <vm>/snapshots/latest -> <name>
    <vm>/before-preview/<disk>.raw          while a preview is open
    <vm>/control/{create,delete,preview,commit,undo,status}

After an operation the VM's tree is compared with the new manifest: nodes
whose content changed get new inodes, and ``notify(parent, name)`` tells
the kernel to drop its cached entries (the adapter queues that outside the
request handler).
"""

import bisect
import copy
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from .errors import (
    Busy, CrossDevice, InvalidArgument, NotFound, NotPermitted, ReadOnly, SnapfsError,
)
from .operations import VmOperations
from .partitions import find_partitions
from .chain import VolumeRef
from .views import ActiveDisk, ActiveSlot, DiskView, PartitionView
from .volume import VolumePool

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Snapshot contents never change; entries that do are invalidated.
IMMUTABLE_TIMEOUT = 3600.0
# Directories and links whose target changes with layer operations.
MUTABLE_TIMEOUT = 1.0

DIR_MODE = stat.S_IFDIR | 0o555
SNAPSHOTS_DIR_MODE = stat.S_IFDIR | 0o755    # the owner may mkdir, rmdir, mv
VIEW_MODE = stat.S_IFREG | 0o440
ACTIVE_MODE = stat.S_IFREG | 0o660
CONTROL_MODE = stat.S_IFREG | 0o220
STATUS_MODE = stat.S_IFREG | 0o440
LINK_MODE = stat.S_IFLNK | 0o777

CONTROL_COMMANDS = ("create", "delete", "preview", "commit", "undo")
# Threads that open a chain's volumes side by side (see _open_ahead).
OPEN_AHEAD_THREADS = 8


@dataclass(slots=True)     # a mount of many VMs holds ~100 nodes per VM
class Node:
    inode: int
    name: str
    parent: int
    mode: int
    mtime_ns: int
    timeout: float = IMMUTABLE_TIMEOUT
    immutable: bool = True
    children: dict | None = None          # name -> inode, once listed
    lister: object = None                 # () -> list of node specs
    view: object = None                   # DiskView, PartitionView, ActiveSlot or bytes
    target: str | None = None             # symlink target
    control: str | None = None            # control file command, or "status"
    render: object = None                 # snapshot.json: () -> bytes, made at open; .size()
    vm: object = None                     # VmState of the VM this node belongs to
    key: object = None                    # what it shows, to keep it across refreshes
    size: int = 0

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)


@dataclass
class Handle:
    """An open file."""
    node: Node
    data: bytes | None = None             # control/status as of open()
    wrote: bool = False


@dataclass
class VmState:
    name: str
    manifest: object
    inode: int = 0
    op_lock: threading.Lock = field(default_factory=threading.Lock)
    # Held by writes to the active disks and by operations (re-entrant:
    # an operation flushes the disks while holding it).
    io_lock: threading.RLock = field(default_factory=threading.RLock)
    running: dict | None = None
    last_error: dict | None = None
    stale_pages: bool = False        # the active leaves changed under the page cache
    active: dict = field(default_factory=dict)    # disk -> ActiveSlot
    # volume id -> VolumeRef, shared by every chain of the VM (a VM of 20
    # snapshots has ~200 chain entries; a volume's path and format never change)
    refs: dict = field(default_factory=dict)
    # top volume path -> (disk size, ranges read, partitions) of a snapshot
    # view's partition table (see _view_partitions); dropped when the
    # manifest changes, as a merge rewrites volumes
    partitions: dict = field(default_factory=dict)


class Vfs:
    def __init__(self, store, pool=None, notify=None, notify_inode=None):
        _one_malloc_arena()
        self.store = store
        self.pool = pool or VolumePool()
        self.notify = notify or (lambda parent, name: None)
        self.notify_inode = notify_inode or (lambda inode: None)
        self._nodes = {}
        self._next_inode = ROOT_INODE
        self._lock = threading.RLock()
        self._background = []       # threads finishing operations after their request
        self._opener = None         # ThreadPoolExecutor of _open_ahead, made on first use
        self._opened = set()        # volume paths _open_ahead has seen open
        self.mount_time_ns = time.time_ns()
        self._add("", ROOT_INODE, DIR_MODE, self.mount_time_ns, timeout=MUTABLE_TIMEOUT,
                  lister=self._list_root)

    # -- lookups and reads ---------------------------------------------------

    def node(self, inode):
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"no inode {inode}") from None

    def lookup(self, parent, name):
        """The child ``name`` of directory inode ``parent``.  Raises NotFound."""
        inode = self._children(self.node(parent)).get(name)
        if inode is None:
            raise NotFound(f"no entry {name!r}")
        return self._nodes[inode]

    def listdir(self, inode):
        """[(name, Node)] in a stable order."""
        children = self._children(self.node(inode))
        return [(name, self._nodes[i]) for name, i in list(children.items())]

    def size(self, node):
        if node.view is not None and not isinstance(node.view, bytes):
            return node.view.size
        if node.control == "status":
            return len(self._status(node.vm))
        if node.render is not None:
            return node.render.size()
        return node.size

    def readlink(self, inode):
        return self.node(inode).target

    def open(self, inode, writable):
        node = self.node(inode)
        if node.is_dir:
            raise InvalidArgument("is a directory")
        if node.control == "status":
            if writable:
                raise ReadOnly("control/status is read-only")
            return Handle(node, self._status(node.vm))
        if node.control:
            return Handle(node)
        if node.render is not None:
            if writable:
                raise ReadOnly(f"{node.name} is read-only")
            return Handle(node, node.render())
        if writable and not isinstance(node.view, ActiveSlot) and not _is_active_part(node):
            raise ReadOnly(f"{node.name} is a read-only view")
        # EIO now rather than on the first read.
        disk = node.view.disk if isinstance(node.view, PartitionView) else node.view
        if isinstance(disk, DiskView):
            disk.chain()
        elif isinstance(disk, ActiveSlot):
            disk.check()
        return Handle(node)

    def read(self, handle, offset, length):
        if handle.data is not None:
            return handle.data[offset:offset + length]
        node = handle.node
        if node.control:
            raise InvalidArgument("control files are write-only")
        if isinstance(node.view, bytes):
            return node.view[offset:offset + length]
        return node.view.read(offset, length)

    def read_nowait(self, handle, offset, length):
        """``read`` if it can be answered without waiting on a lock or on
        CPU-heavy work (decompression), else None.  It may still read the
        host disk: one blocking pread costs less than a thread hop."""
        node = handle.node
        if handle.data is not None or isinstance(node.view, bytes) or node.control:
            return self.read(handle, offset, length)
        if isinstance(node.view, (DiskView, PartitionView)):
            return node.view.read(offset, length, wait=False)
        return None

    # -- writes ---------------------------------------------------------------

    def write_nowait(self, handle, offset, data):
        """``write`` to an active view if no operation holds its VM, else
        None (control commands always return None: they run in threads)."""
        node = handle.node
        if node.control or not (isinstance(node.view, ActiveSlot) or _is_active_part(node)):
            return None
        if not node.view.write(offset, data, wait=False):
            return None
        handle.wrote = True
        return len(data)

    def write(self, handle, offset, data):
        """Write to the active view, or run one control command.  Returns
        the number of bytes taken."""
        node = handle.node
        if node.control:
            self._control(node, data)
            return len(data)
        if isinstance(node.view, ActiveSlot) or _is_active_part(node):
            node.view.write(offset, data)
            handle.wrote = True
            return len(data)
        raise ReadOnly(f"{node.name} is a read-only view")

    def release(self, handle):
        """After writes to a whole active disk, its partition table may have
        changed (sfdisk, parted): list its partition views anew."""
        node = handle.node
        if handle.wrote and isinstance(node.view, ActiveSlot):
            with self._lock:
                self._refresh_partitions(node)

    def _refresh_partitions(self, node):
        """Make the ``<disk>-partN.raw`` siblings of active view ``node``
        match the disk's partition table now."""
        active = self._nodes.get(node.parent)
        if active is None or active.children is None:
            return
        prefix = node.name[:-len(".raw")] + "-part"
        parts = self._partitions(node.view)
        wanted = {f"{prefix}{p.number}.raw": (p.start, p.length) for p in parts}
        shown = {n: (self._nodes[i].view.start, self._nodes[i].view.size)
                 for n, i in active.children.items() if n.startswith(prefix)}
        if shown == wanted:
            return
        for name in shown:
            del active.children[name]
        for part in parts:
            self._attach(active, dict(
                name=f"{prefix}{part.number}.raw", mode=ACTIVE_MODE, mtime_ns=self.mount_time_ns,
                vm=node.vm, immutable=False, timeout=MUTABLE_TIMEOUT,
                view=PartitionView(node.view, part.start, part.length)))
        for name in set(shown) | set(wanted):
            self.notify(active.inode, name)

    def fsync(self, handle):
        node = handle.node
        if isinstance(node.view, ActiveSlot) or _is_active_part(node):
            node.view.flush()

    def setattr(self, inode, truncate, touch):
        """``touch control/create`` (times only) creates a snapshot named by
        the time; truncation of control files (``echo > file``) is a no-op."""
        node = self.node(inode)
        if node.control == "create" and touch and not truncate:
            self._run(node.vm, "create", lambda ops: ops.create(None))
        elif truncate and not node.control:
            raise NotPermitted("the size of a disk view cannot change")
        return node

    # -- the namespace as a command line ---------------------------------------

    def mkdir(self, parent, name):
        vm = self._snapshots_dir_vm(parent)
        self._run(vm, "create", lambda ops: ops.create(name))
        return self.lookup(parent, name)

    def create_file(self, parent, name):
        """``touch snapshots/NAME``: create the snapshot, and answer with a
        short-lived regular file (the kernel insists); the next lookup finds
        the directory."""
        vm = self._snapshots_dir_vm(parent)
        self._run(vm, "create", lambda ops: ops.create(name))
        node = Node(inode=0, name=name, parent=parent, mode=VIEW_MODE,
                    mtime_ns=time.time_ns(), timeout=0.0, immutable=False, view=b"", vm=vm)
        with self._lock:
            node.inode = self._next_inode
            self._next_inode += 1
            self._nodes[node.inode] = node
        return Handle(node), node

    def rmdir(self, parent, name):
        """Delete by merge.  rmdir holds the snapshots directory's lock in
        the kernel until it is answered, and that lock would stall every
        lookup and listing there: so it is answered once the deletion is
        recorded (the snapshot is gone from the namespace) and the merge
        goes on in the background, shown in control/status."""
        vm = self._snapshots_dir_vm(parent)
        self._run(vm, "delete", lambda ops: ops.start_delete(name), snapshot=name,
                  then=lambda ops, started: ops.finish_delete(started))

    def rename(self, parent_old, old, parent_new, new):
        vm = self._snapshots_dir_vm(parent_old)
        if parent_new != parent_old:
            other = self.node(parent_new)
            raise CrossDevice("snapshots move only within their VM's snapshots/") \
                if other.vm is not vm else NotPermitted("snapshots stay in snapshots/")
        self._run(vm, "rename", lambda ops: ops.rename(old, new), snapshot=old)

    def _snapshots_dir_vm(self, inode):
        node = self.node(inode)
        if node.vm is None or node.name != "snapshots" or node.parent != node.vm.inode:
            raise NotPermitted("snapshots are created and deleted in <vm>/snapshots/")
        return node.vm

    def _control(self, node, data):
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidArgument("control commands are UTF-8 text") from None
        command = node.control
        if command == "create":
            name, _, description = text.partition(" ")
            self._run(node.vm, "create", lambda ops: ops.create(name or None, description.strip()))
        elif command in ("delete", "preview"):
            if not text:
                raise InvalidArgument(f"control/{command} needs a snapshot name")
            self._run(node.vm, command, lambda ops: getattr(ops, command)(text), snapshot=text)
        else:
            self._run(node.vm, command, lambda ops: getattr(ops, command)())

    # -- running operations ----------------------------------------------------

    def _run(self, vm, op, action, snapshot=None, then=None):
        """Run ``action(VmOperations)`` as the VM's one operation.  Refusals
        are logged and kept for control/status.  With ``then``, the rest of
        the operation, ``then(ops, result)``, goes on in a background thread
        that keeps the VM busy until it is done."""
        if not vm.op_lock.acquire(blocking=False):
            running = vm.running["op"] if vm.running else "an operation"
            self._refused(vm, op, Busy(f"VM {vm.name} is busy: {running} is running"))
        background = False
        try:
            vm.running = {"op": op, "snapshot": snapshot, "started": _utc_now(),
                          "progress": None}

            def progress(done, total):
                vm.running["progress"] = {"done": done, "total": total}

            # Every manifest switch is followed at once, still under the
            # io_lock: files it dropped are deleted only afterwards, and
            # writes waiting for the lock land in the new leaves.
            ops = VmOperations(self.store, vm.name, progress=progress,
                               on_saved=lambda m: self._refresh_vm(vm, m))
            try:
                with vm.io_lock:
                    for slot in vm.active.values():
                        slot.flush()
                    result = action(ops)
            except SnapfsError as e:
                self._refused(vm, op, e)
            finally:
                self._refresh_vm(vm)
                self._flush_page_caches(vm)
            if then is not None:
                thread = threading.Thread(target=self._continue, args=(vm, op, ops, then, result),
                                          name=f"snapfs-{op}-{vm.name}", daemon=True)
                self._background.append(thread)
                thread.start()
                background = True
            return result
        finally:
            if not background:
                vm.running = None
                vm.op_lock.release()

    def _continue(self, vm, op, ops, then, result):
        try:
            with vm.io_lock:
                try:
                    then(ops, result)
                finally:
                    self._refresh_vm(vm)
        except SnapfsError as e:
            vm.last_error = {"op": op, "error": str(e), "errno": e.errno, "time": _utc_now()}
            log.error("%s on VM %s failed: %s (it resumes with the next operation)",
                      op, vm.name, e)
        except Exception:
            log.exception("%s on VM %s failed", op, vm.name)
        finally:
            vm.running = None
            vm.op_lock.release()
            self._flush_page_caches(vm)

    def _refused(self, vm, op, error):
        vm.last_error = {"op": op, "error": str(error), "errno": error.errno,
                         "time": _utc_now()}
        log.warning("%s on VM %s refused: %s", op, vm.name, error)
        raise error

    def _status(self, vm):
        m = vm.manifest
        preview = None
        if m.preview:
            snap = next((s for s in m.snapshots if s.id == m.preview["snapshot"]), None)
            preview = {"snapshot": snap.name if snap else None}
        state = "running" if vm.running else ("preview" if m.preview else "idle")
        doc = {"vm": vm.name, "state": state, "operation": vm.running, "preview": preview,
               "snapshots": [s.name for s in m.snapshots],
               "last_operation": m.last_operation, "last_error": vm.last_error}
        return (json.dumps(doc, indent=2) + "\n").encode()

    def close(self):
        # A merge continuing after rmdir finishes before the store is let
        # go: killing it would only leave the next mount to redo it.
        for thread in self._background:
            if thread.is_alive():
                log.info("waiting for %s to finish", thread.name)
            thread.join()
        for vm in self._vms():
            for disk in vm.active.values():
                try:
                    disk.flush()
                except (SnapfsError, OSError) as e:
                    log.error("flushing %s failed: %s", vm.name, e)
        if self._opener is not None:
            self._opener.shutdown()
        self.pool.close()

    def _vms(self):
        return [n.vm for n in list(self._nodes.values()) if n.vm is not None and n.inode == n.vm.inode]

    # -- building the tree -------------------------------------------------------

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
                    self._attach(node, spec)
            return node.children

    def _attach(self, parent, spec):
        spec = dict(spec)
        name = spec.pop("name")
        child = self._add(name, parent.inode, **spec)
        if child.vm is not None and child.vm.inode == 0:
            child.vm.inode = child.inode
        parent.children[name] = child.inode
        return child

    def _list_root(self):
        specs = []
        for name, manifest in self.store.load_vms():
            if isinstance(manifest, (SnapfsError, OSError)):
                log.error("VM %s is not shown: %s", name, manifest)
                continue
            if isinstance(manifest, BaseException):
                raise manifest
            vm = VmState(name, manifest)
            specs.append(dict(name=name, mode=DIR_MODE, mtime_ns=self._time(manifest.created),
                              timeout=MUTABLE_TIMEOUT, vm=vm, lister=lambda vm=vm: self._list_vm(vm)))
        return specs

    def _list_vm(self, vm):
        mtime = self._time(vm.manifest.created)
        specs = [
            dict(name="active", mode=DIR_MODE, mtime_ns=mtime, timeout=MUTABLE_TIMEOUT, vm=vm,
                 key=self._active_key(vm), lister=lambda: self._list_active(vm)),
            dict(name="snapshots", mode=SNAPSHOTS_DIR_MODE, mtime_ns=mtime,
                 timeout=MUTABLE_TIMEOUT, vm=vm, lister=lambda: self._list_snapshots(vm)),
            dict(name="control", mode=DIR_MODE, mtime_ns=mtime, vm=vm,
                 lister=lambda: self._list_control(vm)),
        ]
        if vm.manifest.preview:
            specs.append(self._before_preview_spec(vm))
        return specs

    def _before_preview_spec(self, vm):
        before = vm.manifest.preview["before"]
        return dict(name="before-preview", mode=DIR_MODE, mtime_ns=self.mount_time_ns, vm=vm,
                    key=("before", tuple(sorted(before.items()))),
                    lister=lambda: self._list_disks(vm, before, None))

    def _list_control(self, vm):
        specs = [dict(name=c, mode=CONTROL_MODE, mtime_ns=self.mount_time_ns, control=c, vm=vm,
                      immutable=False) for c in CONTROL_COMMANDS]
        specs.append(dict(name="status", mode=STATUS_MODE, mtime_ns=self.mount_time_ns,
                          control="status", vm=vm, immutable=False, timeout=0.0))
        return specs

    def _snapshot_key(self, vm, snap):
        # Not the name: a renamed snapshot keeps its inode, as the kernel
        # moves its cached entry; snapshot.json is made when opened.
        m = vm.manifest
        return (snap.id, tuple(tuple(m.chain(snap.volumes[d])) for d in m.disks))

    def _active_key(self, vm):
        m = vm.manifest
        return tuple(tuple(m.chain(m.active[d])) for d in m.disks)

    def _list_snapshots(self, vm):
        specs = []
        for snap in vm.manifest.snapshots:
            specs.append(dict(name=snap.name, mode=DIR_MODE, mtime_ns=self._time(snap.created),
                              vm=vm, key=self._snapshot_key(vm, snap),
                              lister=lambda s=snap: self._list_disks(vm, s.volumes, s)))
        if vm.manifest.snapshots:
            newest = vm.manifest.snapshots[-1]
            specs.append(dict(name="latest", mode=LINK_MODE, timeout=MUTABLE_TIMEOUT,
                              immutable=False, mtime_ns=self._time(newest.created), vm=vm,
                              key=("latest",), target=newest.name,
                              size=len(newest.name.encode())))
        return specs

    def _list_active(self, vm):
        m = vm.manifest
        for disk in m.disks:
            if disk not in vm.active:
                vm.active[disk] = ActiveSlot(self._active_disk(vm, disk), vm.io_lock)
        specs = []
        for disk in m.disks:
            slot = vm.active[disk]
            self._open_ahead(slot.disk.refs[:-1])     # the leaf is read by its writer
            specs.append(dict(name=f"{disk}.raw", mode=ACTIVE_MODE, mtime_ns=self.mount_time_ns,
                              view=slot, vm=vm, immutable=False, timeout=MUTABLE_TIMEOUT))
            for part in self._partitions(slot):
                specs.append(dict(name=f"{disk}-part{part.number}.raw", mode=ACTIVE_MODE,
                                  mtime_ns=self.mount_time_ns, vm=vm, immutable=False,
                                  timeout=MUTABLE_TIMEOUT,
                                  view=PartitionView(slot, part.start, part.length)))
        return specs

    def _active_disk(self, vm, disk):
        m = vm.manifest
        return ActiveDisk(self.pool, self._chain_refs(vm, m.active[disk]))

    def _chain_refs(self, vm, volume_id):
        """Store.chain_refs, with the VolumeRefs shared across the VM's chains."""
        m, refs = vm.manifest, vm.refs
        chain = []
        for vid in m.chain(volume_id):
            ref = refs.get(vid)
            if ref is None:
                ref = refs[vid] = VolumeRef(self.store.volume_path(vm.name, vid),
                                            m.volumes[vid]["format"])
            chain.append(ref)
        return chain

    def _list_disks(self, vm, volumes, snapshot):
        m = vm.manifest
        mtime = self._time(snapshot.created) if snapshot else self.mount_time_ns
        specs, views = [], {}
        for disk in m.disks:
            view = DiskView(self.pool, self._chain_refs(vm, volumes[disk]))
            specs.append(dict(name=f"{disk}.raw", mode=VIEW_MODE, mtime_ns=mtime, view=view, vm=vm))
            views[disk] = (volumes[disk], view)
            for part in self._view_partitions(vm, view):
                specs.append(dict(name=f"{disk}-part{part.number}.raw", mode=VIEW_MODE,
                                  mtime_ns=mtime, vm=vm,
                                  view=PartitionView(view, part.start, part.length)))
        if snapshot is not None:
            specs.append(dict(name="snapshot.json", mode=VIEW_MODE, mtime_ns=mtime, vm=vm,
                              immutable=False, timeout=MUTABLE_TIMEOUT,
                              render=_SnapshotJson(vm, snapshot.id, views)))
        return specs

    def _open_ahead(self, refs):
        """Open the volumes of a chain, and read their maps, side by side
        before the chain does it one by one: from a cold cache each volume
        costs a few small reads, and their latencies add up (a VM's active
        disk, the first thing ``find`` lists in it, has the whole chain
        below it).  Errors are left for the chain to meet and report."""
        todo = [r for r in refs if r.path not in self._opened]
        if len(todo) < 2:
            return
        if self._opener is None:
            self._opener = ThreadPoolExecutor(OPEN_AHEAD_THREADS, thread_name_prefix="snapfs-open")

        def load(ref):
            try:
                self.pool.runs(self.pool.get(ref.path, ref.format))
            except Exception:
                return
            self._opened.add(ref.path)

        for _ in self._opener.map(load, todo):
            pass

    def _partitions(self, view):
        try:
            return find_partitions(view.read, view.size)
        except SnapfsError:
            return []    # already logged by the view

    def _view_partitions(self, vm, view):
        """The partitions of a read-only view (a snapshot, before-preview).

        A snapshot usually has its parent's partition table: if the chain
        minus its top volume was read before, the disk has the same size,
        and the top volume maps none of the ranges that reading it took,
        those ranges read the same bytes here, so the table is the same;
        neither the chain nor its extent map is needed.  Listing a VM's
        snapshots oldest first (as ``find`` and ``ls -R`` do) then opens one
        new volume per snapshot and merges no chain."""
        refs, size = view.refs, view.size
        known = vm.partitions.get(refs[-2].path) if len(refs) > 1 else None
        if known is not None and known[0] == size:
            try:
                runs = self.pool.runs(self.pool.get(refs[-1].path, refs[-1].format))
            except (SnapfsError, OSError):
                runs = None    # met again, and reported, below
            if runs is not None and not _maps_any(runs, known[1]):
                vm.partitions[refs[-1].path] = known
                return known[2]
        self._open_ahead(refs)
        ranges = []

        def read(offset, length):
            ranges.append((offset, length))
            return view.read(offset, length)

        try:
            parts = find_partitions(read, size)
        except SnapfsError:
            return []    # already logged by the view
        vm.partitions[refs[-1].path] = (size, tuple(ranges), parts)
        return parts

    # -- keeping the tree in step with the manifest ----------------------------

    def _refresh_vm(self, vm, manifest=None):
        """Follow the VM's manifest (reloaded, or as just saved) and replace
        what changed: snapshot nodes by key, the active leaves in their
        slots, the before-preview directory."""
        try:
            manifest = copy.deepcopy(manifest) if manifest else self.store.load_vm(vm.name)
        except SnapfsError as e:
            log.error("VM %s cannot be reloaded: %s", vm.name, e)
            return
        with self._lock:
            vm.manifest = manifest
            vm.refs = {v: r for v, r in vm.refs.items() if v in manifest.volumes}
            vm.partitions = {}
            # Volumes changed on disk (merged, relinked, deleted): open them anew.
            self.pool.forget(self.store.vm_dir(vm.name))
            prefix = os.path.join(self.store.vm_dir(vm.name), "")
            self._opened = {p for p in self._opened if not p.startswith(prefix)}
            vm_node = self._nodes[vm.inode]
            if vm_node.children is None:
                return
            self._refresh_dir(vm_node, "snapshots", self._list_snapshots(vm))
            active = self._nodes[vm_node.children["active"]]
            if active.key != self._active_key(vm):
                active.key = self._active_key(vm)
                for disk, slot in vm.active.items():
                    old, slot.disk = slot.disk, self._active_disk(vm, disk)
                    old.retire()
                    vm.stale_pages = True
                if active.children is not None:
                    for name, inode in list(active.children.items()):
                        node = self._nodes[inode]
                        if isinstance(node.view, ActiveSlot):
                            self._refresh_partitions(node)
            wanted = [self._before_preview_spec(vm)] if vm.manifest.preview else []
            self._refresh_children(vm_node, wanted, only={"before-preview"})

    def _flush_page_caches(self, vm):
        """The kernel may cache pages of the active views: drop them once the
        leaves changed.  Called without the io_lock (a write waiting for it
        may hold a page the kernel needs)."""
        if not vm.stale_pages:
            return
        vm.stale_pages = False
        vm_node = self._nodes[vm.inode]
        active = self._nodes[vm_node.children["active"]] if vm_node.children else None
        for inode in (active.children or {}).values() if active else ():
            self.notify_inode(inode)

    def _refresh_dir(self, vm_node, name, specs):
        node = self._nodes[vm_node.children[name]]
        if node.children is not None:
            self._refresh_children(node, specs)

    def _refresh_children(self, parent, specs, only=None):
        """Make ``parent``'s children match ``specs``: a child with the same
        key keeps its inode (even under a new name); the rest are replaced.
        Every name whose meaning changed is invalidated in the kernel."""
        old = {n: i for n, i in parent.children.items() if only is None or n in only}
        by_key = {self._nodes[i].key: i for i in old.values() if self._nodes[i].key is not None}
        new = {}
        for spec in specs:
            inode = by_key.pop(spec.get("key"), None) if spec.get("key") is not None else None
            if inode is not None:
                node = self._nodes[inode]
                node.name = spec["name"]
                # A link keeps its inode; its target changes in place, so a
                # readlink never sees the old one.
                node.target, node.size = spec.get("target"), spec.get("size", 0)
                node.mtime_ns = spec["mtime_ns"]
                new[spec["name"]] = inode
            else:
                del_name = spec["name"]
                parent.children.pop(del_name, None)
                new[del_name] = self._attach(parent, spec).inode
        for name, inode in old.items():
            if new.get(name) != inode:
                self.notify(parent.inode, name)
                if parent.children.get(name) == inode:
                    del parent.children[name]
        for name, inode in new.items():
            if old.get(name) is None:
                self.notify(parent.inode, name)   # may be cached as absent
        parent.children.update(new)

    def _time(self, iso):
        try:
            return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
        except (ValueError, AttributeError):
            return self.mount_time_ns


class _SnapshotJson:
    """``render`` of snapshot.json: the snapshot's record as it is now (its
    name can change), with its volumes.  Its size is kept until the VM's
    manifest changes: every stat of the file asks for it."""

    __slots__ = ("vm", "snapshot_id", "views", "_size")

    def __init__(self, vm, snapshot_id, views):
        self.vm, self.snapshot_id, self.views = vm, snapshot_id, views
        self._size = (None, 0)     # (the manifest it was measured on, bytes)

    def __call__(self):
        manifest = self.vm.manifest
        data = self._make(manifest)
        self._size = (manifest, len(data))
        return data

    def size(self):
        manifest, size = self._size
        return size if manifest is self.vm.manifest else len(self())

    def _make(self, manifest):
        snap = next((s for s in manifest.snapshots if s.id == self.snapshot_id), None)
        if snap is None:
            raise NotFound("the snapshot was deleted")
        doc = snap.to_json()
        doc["volumes"] = {
            disk: {"volume": vid, "chain": [os.path.basename(r.path) for r in view.refs],
                   "size": view.size}
            for disk, (vid, view) in self.views.items()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


_M_ARENA_MAX = -8      # glibc <malloc.h>


def _one_malloc_arena():
    """Have glibc's malloc keep one arena for the whole process.

    By default each thread may get an arena of its own (up to 8 per core),
    and memory freed into an arena serves only the threads using it.  The
    worker threads that read views allocate 64 KiB decompressed clusters
    (the 64 MiB ClusterCache) and 1 MiB read buffers and free them on other
    threads, so that memory scatters over the arenas: reading every view of
    a deep chain with compressed clusters peaked at 165-235 MB of RSS with
    the default arenas, and at 111 MB with one (scripts/benchlib/scale.py,
    row 9).  Small Python objects do not come from malloc's arenas
    (pymalloc) and the GIL serialises most other allocations, so one arena
    costs no measurable speed.  It must be set before the daemon starts
    threads: a thread keeps the arena it got.  Idempotent; a no-op off
    glibc."""
    global _one_malloc_arena_done
    if _one_malloc_arena_done:
        return
    _one_malloc_arena_done = True
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        import ctypes
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (ValueError, OSError, AttributeError):
        pass


_one_malloc_arena_done = False


def _maps_any(runs, ranges):
    """Whether any of ``runs`` (a volume's sorted, disjoint guest runs) meets
    any of ``ranges`` ((offset, length) pairs)."""
    for offset, length in ranges:
        i = bisect.bisect_right(runs, offset, key=_run_start)
        if i and runs[i - 1][0] + runs[i - 1][1] > offset:
            return True
        if i < len(runs) and runs[i][0] < offset + length:
            return True
    return False


def _run_start(run):
    return run[0]


def _is_active_part(node):
    return isinstance(node.view, PartitionView) and isinstance(node.view.disk, ActiveSlot)


def _utc_now():
    return datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
