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

The nodes, and how they follow each VM's manifest after an operation, are
in fs/tree.py (``Vfs`` is a ``Tree``); ``notify(parent, name)`` tells the
kernel to drop its cached entries (the adapter queues that outside the
request handler).  What each directory holds is decided in fs/listings.py;
the node types are in fs/nodes.py.
"""

import json
import logging
import os
import threading
import time

from ..errors import (
    Busy, CrossDevice, InvalidArgument, NameTooLong, NotFound, NotPermitted, PermissionDenied,
    ReadOnly, SnapfsError,
)
from ..ops.finish import utc_now
from ..ops.operations import VmOperations, refuse_create
from ..ops.users import is_active_write
from ..store.names import MAX_NAME_BYTES
from ..store.volume import VolumePool
from . import control
from .listings import Listings
from .malloc_arena import one_malloc_arena
from .nodes import DIR_MODE, MUTABLE_TIMEOUT, ROOT_INODE, VIEW_MODE, Handle, Node
from .tree import Tree
from .uses import MountUsers, close_use, open_use
from .views import ActiveSlot, DiskView, PartitionView

log = logging.getLogger(__name__)


class Vfs(Tree):
    def __init__(self, store, pool=None, notify=None, notify_inode=None):
        one_malloc_arena()
        pool = pool or VolumePool()
        self.mount_time_ns = time.time_ns()
        super().__init__(store, pool, Listings(store, pool, self.mount_time_ns), notify,
                         notify_inode)
        self._background = []       # threads finishing operations after their request
        self._add("", ROOT_INODE, DIR_MODE, self.mount_time_ns, timeout=MUTABLE_TIMEOUT,
                  lister=self.listings.root)

    # -- lookups and reads ---------------------------------------------------

    def lookup(self, parent, name):
        """The child ``name`` of directory inode ``parent``.  Raises NotFound."""
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise NameTooLong(f"no entry can have a name of over {MAX_NAME_BYTES} bytes")
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

    def open(self, inode, writable, readable=True):
        node = self.node(inode)
        if node.stale:
            raise NotFound(f"{node.name} was removed")
        if node.is_dir:
            raise InvalidArgument("is a directory")
        if node.control == "status":
            if writable:
                raise ReadOnly("control/status is read-only")
            return Handle(node, self._status(node.vm))
        if node.control:
            if readable:
                # Root passes the mode check of a write-only file.
                raise PermissionDenied(f"control/{node.control} is write-only")
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
        handle = Handle(node)
        owner = node.owner
        if owner is not None and (writable or not is_active_write(owner)):
            open_use(node.vm, owner)
            handle.use = owner
        return handle

    def closed(self, handle):
        """The kernel released ``handle`` (cheap: called in the event loop)."""
        if handle.use is not None:
            close_use(handle.node.vm, handle.use)
            handle.use = None

    def read(self, handle, offset, length):
        if handle.data is not None:
            return handle.data[offset:offset + length]
        node = handle.node
        if node.control:
            raise PermissionDenied("control files are write-only")
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
        """Write to the active view, or to a control file (each complete
        line is a command, run now).  Returns the number of bytes taken."""
        node = handle.node
        if node.control:
            try:
                for line in control.complete_lines(handle, data):
                    self._command(node, line)
            except SnapfsError:
                # What follows a failed command in this open is not run,
                # at close or later: the write that carried it failed.
                handle.pending.clear()
                raise
            return len(data)
        if handle.creating is not None:
            # ``cp f snapshots/NAME`` or ``echo x > snapshots/NAME``: a
            # snapshot holds no data.  Nothing is created.
            log.warning("snapshot %s of VM %s not created: data was written to its name",
                        handle.creating, node.vm.name)
            handle.creating = None
            raise ReadOnly("a snapshot is made with touch or mkdir; it holds no data")
        if isinstance(node.view, ActiveSlot) or _is_active_part(node):
            node.view.write(offset, data)
            handle.wrote = True
            return len(data)
        raise ReadOnly(f"{node.name} is a read-only view")

    def needs_flush(self, handle):
        """Whether closing ``handle`` runs something (see ``flush``)."""
        return handle.creating is not None or bool(handle.pending) or handle.error is not None

    def flush(self, handle):
        """close() of a file: run a control command left without a newline,
        or create the snapshot a ``touch snapshots/NAME`` opened.  Errors
        reach close(); a failed creation fails every later close too (touch
        closes a dup of the file last)."""
        node = handle.node
        if handle.creating is not None:
            name, handle.creating = handle.creating, None
            try:
                self._run(node.vm, "create", lambda ops: ops.create(name))
            except SnapfsError as e:
                handle.error = e
                raise
        elif node.control:
            line = control.take_rest(handle)
            if line is not None:
                self._command(node, line)
        elif handle.error is not None:
            raise handle.error

    def release(self, handle):
        """After writes to a whole active disk, its partition table may have
        changed (sfdisk, parted): list its partition views anew."""
        node = handle.node
        if handle.wrote and isinstance(node.view, ActiveSlot):
            with self._lock:
                self._refresh_partitions(node)
    def fsync(self, handle):
        node = handle.node
        if isinstance(node.view, ActiveSlot) or _is_active_part(node):
            node.view.flush()

    def setattr(self, inode, size=None, times=False, other=False):
        """``touch control/create`` (times only) creates a snapshot named by
        the time.  An active view may be truncated to its own size (a
        no-op, as for a block device); the file a ``touch snapshots/NAME``
        is creating takes its times.  Everything else (chmod, chown,
        times, sizes) is refused: nothing here can keep it.  ``other``:
        mode or owner changes."""
        node = self.node(inode)
        if node.stale:
            raise NotFound(f"{node.name} was removed")
        if other:
            raise NotPermitted(f"{node.name}: modes and owners are fixed")
        if size is not None:
            active = isinstance(node.view, ActiveSlot) or _is_active_part(node)
            if not active or size != node.view.size:
                raise NotPermitted(f"{node.name}: its size cannot change")
        if times and size is None:
            if node.control == "create":
                self._run(node.vm, "create", lambda ops: ops.create(None))
            elif node.key != "creating":
                raise NotPermitted(f"{node.name}: its times are fixed")
        return node

    # -- the namespace as a command line ---------------------------------------

    def mkdir(self, parent, name):
        vm = self._snapshots_dir_vm(parent)
        self._run(vm, "create", lambda ops: ops.create(name))
        return self.lookup(parent, name)

    def create_file(self, parent, name, truncate=False):
        """``touch snapshots/NAME``: answer with a short-lived regular file
        (the kernel insists), and create the snapshot when it is closed
        (``flush``) unless data was written to it: ``cp f snapshots/NAME``
        must not make one.  Everything that would refuse the snapshot is
        checked now.  ``truncate`` (O_TRUNC: ``echo x > snapshots/NAME``)
        is refused at once.  The next lookup finds the directory."""
        vm = self._snapshots_dir_vm(parent)
        if truncate:
            raise ReadOnly("a snapshot is made with touch or mkdir; it holds no data")
        try:
            refuse_create(vm.manifest, name)
            if vm.running:
                raise Busy(f"VM {vm.name} is busy: {vm.running['op']} is running")
        except SnapfsError as e:
            self._refused(vm, "create", e)
        node = Node(inode=0, name=name, parent=parent, mode=VIEW_MODE, mtime_ns=time.time_ns(),
                    timeout=0.0, immutable=False, view=b"", vm=vm, key="creating")
        with self._lock:
            node.inode = self._next_inode
            self._next_inode += 1
            self._nodes[node.inode] = node
        return Handle(node, creating=name), node

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
        if old == "latest":
            raise NotPermitted("snapshots/latest follows the newest snapshot; it cannot be renamed")
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

    def _command(self, node, line):
        """Run one command line written to control file ``node``."""
        try:
            op, args = control.parse(node.control, line)
        except SnapfsError as e:
            self._refused(node.vm, node.control, e)
        snapshot = args[0] if op in ("delete", "preview") else None
        self._run(node.vm, op, lambda ops: getattr(ops, op)(*args), snapshot=snapshot)

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
        users = MountUsers(vm, writing=lambda vids: self._writing(vm, vids))
        try:
            vm.running = {"op": op, "snapshot": snapshot, "started": utc_now(),
                          "progress": None}

            def progress(done, total):
                vm.running["progress"] = {"done": done, "total": total}

            # Every manifest switch is followed at once, while the operation
            # still holds the disks it changed (MountUsers.hold): files it
            # dropped are deleted only afterwards, and writes waiting for a
            # disk land in its new leaf.
            ops = VmOperations(self.store, vm.name, progress=progress,
                               on_saved=lambda m: self._refresh_vm(vm, m), users=users)
            try:
                result = action(ops)
            except SnapfsError as e:
                self._refused(vm, op, e)
            finally:
                self._refresh_vm(vm)
                if then is None:
                    users.release_claims()
                self._flush_page_caches(vm)
            if then is not None:
                thread = threading.Thread(target=self._continue,
                                          args=(vm, op, ops, then, result, users),
                                          name=f"snapfs-{op}-{vm.name}", daemon=True)
                self._background.append(thread)
                thread.start()
                background = True
            return result
        finally:
            if not background:
                vm.running = None
                vm.op_lock.release()

    def _continue(self, vm, op, ops, then, result, users):
        try:
            try:
                then(ops, result)
            finally:
                self._refresh_vm(vm)
        except SnapfsError as e:
            vm.last_error = {"op": op, "error": str(e), "errno": e.errno, "time": utc_now()}
            log.error("%s on VM %s failed: %s (it resumes with the next operation)",
                      op, vm.name, e)
        except Exception:
            log.exception("%s on VM %s failed", op, vm.name)
        finally:
            users.release_claims()
            vm.running = None
            vm.op_lock.release()
            self._flush_page_caches(vm)
            self._background = [t for t in self._background if t.is_alive()
                                and t is not threading.current_thread()]

    def _writing(self, vm, volume_ids):
        """An operation is about to write these volumes: read their maps
        first, so that chains opened meanwhile use maps that stay valid."""
        self.listings.prime(vm, volume_ids)

    def _refused(self, vm, op, error):
        vm.last_error = {"op": op, "error": str(error), "errno": error.errno,
                         "time": utc_now()}
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
        self.listings.close()
        self.pool.close()
def _is_active_part(node):
    return isinstance(node.view, PartitionView) and isinstance(node.view.disk, ActiveSlot)
