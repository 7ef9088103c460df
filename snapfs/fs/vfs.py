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
    <vm>/control/{create,delete,preview,commit,undo,clone,status}

The nodes, and how they follow each VM's manifest after an operation, are
in fs/tree.py (``Vfs`` is a ``Tree``), and running the operations, one at
a time per VM, in fs/running.py (it is an ``OperationRunner`` too).
``notify(parent, name)`` tells the kernel to drop its cached entries (the
adapter queues that outside the request handler).  What each directory holds is decided in fs/listings.py;
the node types are in fs/nodes.py.
"""

import json
import logging
import os
import time

from ..errors import (
    Busy, CrossDevice, InvalidArgument, NameTooLong, NoAttribute, NotFound, NotPermitted,
    PermissionDenied, ReadOnly, SnapfsError,
)
from ..ops.users import is_active_write, snapshot_use
from ..store.inuse import held_by_qemu
from ..store.names import MAX_NAME_BYTES
from ..store.scratch import default_scratch_dir
from ..store.volume import VolumePool
from . import control
from .filetree import GuestEntry, is_guest_inode, refuse_change
from .listings import Listings
from .malloc_arena import one_malloc_arena
from .nodes import DIR_MODE, MUTABLE_TIMEOUT, ROOT_INODE, VIEW_MODE, Handle, Node
from .overlays import Scratch
from .queue import Job, Projection, refuse_queued
from .running import OperationRunner
from .tree import Tree
from .uses import RELEASE_GRACE, close_use, open_use
from .views import ActiveSlot, DiskView, PartitionView

log = logging.getLogger(__name__)


class Vfs(OperationRunner, Tree):
    def __init__(self, store, pool=None, notify=None, notify_inode=None, *, read_only=False,
                 scratch_dir=None, scratch_limit=None, owner_files=False):
        """``read_only``: the mount's ``ro`` option.  ``scratch_dir`` and
        ``scratch_limit`` (bytes): where the throwaway overlays of snapshot
        views opened for writing live, and how large they may grow in all
        (None: the defaults of fs/overlays.py).  ``owner_files``: the
        mount option of that name (fs/filetree.py, fs/fuse.py)."""
        one_malloc_arena()
        self.read_only = read_only
        # Files in trees show as the mount owner's (mount option owner_files).
        self.owner_files = owner_files
        self.scratch = Scratch(scratch_dir or default_scratch_dir(store), scratch_limit)
        pool = pool or VolumePool()
        self.mount_time_ns = time.time_ns()
        super().__init__(store, pool, Listings(store, pool, self.mount_time_ns), notify,
                         notify_inode)
        self._background = []       # threads finishing operations after their request
        self._add("", ROOT_INODE, DIR_MODE, self.mount_time_ns, timeout=MUTABLE_TIMEOUT,
                  lister=self.listings.root)

    # -- lookups and reads ---------------------------------------------------

    def node(self, inode):
        """The Node at ``inode``, or the GuestEntry of a file in a tree
        (fs/filetree.py).  Raises NotFound."""
        if is_guest_inode(inode):
            return self.listings.trees.of(inode).entry(inode)
        return super().node(inode)

    def lookup(self, parent, name):
        """The child ``name`` of directory inode ``parent``.  Raises NotFound."""
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise NameTooLong(f"no entry can have a name of over {MAX_NAME_BYTES} bytes")
        node = self.node(parent)
        tree = _tree_of(node)
        if tree is not None:
            return tree.lookup(parent, os.fsencode(name))
        inode = self._children(node).get(name)
        if inode is None:
            raise NotFound(f"no entry {name!r}")
        return self._nodes[inode]

    def listdir(self, inode):
        """[(name, Node)] in a stable order."""
        node = self.node(inode)
        tree = _tree_of(node)
        if tree is not None:
            if not node.is_dir:
                raise NotFound(f"{node.name} is not a directory")
            return [(os.fsdecode(name), entry) for name, entry in tree.listdir(inode)]
        children = self._children(node)
        return [(name, self._nodes[i]) for name, i in list(children.items())]

    def tree_listing(self, inode, wait=True):
        """[(name bytes, GuestEntry)] of a directory in a tree, kept by the
        tree (not to be changed); None for any other directory, or, with
        ``wait=False``, when the listing is not at hand (fs/filetree.py)."""
        node = self.node(inode) if wait else self.node_nowait(inode)
        tree = _tree_of(node) if node is not None else None
        if tree is None or not node.is_dir:
            return None
        return tree.listdir(inode, wait)

    def node_nowait(self, inode):
        """``node`` if it needs no parsing (in a tree: its stat is at hand),
        else None."""
        try:
            if not is_guest_inode(inode):
                return super().node(inode)
            return self.listings.trees.of(inode).entry(inode, wait=False)
        except NotFound:
            return None

    def guest_stat(self, node):
        """The guest's Stat of a file in a tree or of a tree's root, else None."""
        if isinstance(node, GuestEntry):
            return node.stat
        tree = node.filetree
        if tree is None or node.stale or tree.error is not None:
            return None
        try:
            return tree.root_stat()
        except SnapfsError as e:
            # The tree's directory still lists (EIO comes from inside it),
            # and so does the snapshot's directory around it.
            log.error("%s: its root cannot be read: %s", tree.label, e)
            return None

    def getxattr(self, inode, name, wait=True):
        found = self.listxattr(inode, wait)
        if found is None:
            return None
        if name not in found:
            raise NoAttribute(f"no attribute {name!r}")
        return found[name]

    def listxattr(self, inode, wait=True):
        """{name: value} of a file in a tree (none elsewhere); with
        ``wait=False``, None where a tree would have to read."""
        node = self.node(inode) if wait else self.node_nowait(inode)
        if node is None:
            return None
        tree = _tree_of(node)
        return tree.xattrs(inode, wait) if tree is not None else {}

    def size(self, node):
        if isinstance(node, GuestEntry):
            return node.stat.size
        if node.view is not None and not isinstance(node.view, bytes):
            return node.view.size
        if node.control == "status":
            return len(self._status(node.vm))
        if node.render is not None:
            return node.render.size()
        return node.size

    def readlink(self, inode):
        node = self.node(inode)
        if isinstance(node, GuestEntry):
            return node.tree.readlink(inode)
        return node.target

    def open(self, inode, writable, readable=True):
        node = self.node(inode)
        if node.stale:
            raise NotFound(f"{node.name} was removed")
        if node.is_dir:
            raise InvalidArgument("is a directory")
        if isinstance(node, GuestEntry):
            return self._open_guest(node, writable)
        if writable and self.read_only:
            # The kernel refuses first on an ro mount; this covers any path around it.
            raise ReadOnly(f"{node.name}: the mount is read-only (-o ro)")
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
        # EIO now rather than on the first read.
        disk = node.view.disk if isinstance(node.view, PartitionView) else node.view
        if isinstance(disk, DiskView):
            disk.chain()
        elif isinstance(disk, ActiveSlot):
            leaf = disk.disk.refs[-1].path
            # A shareable disk or a LUN is raw and written in place, by any
            # number of writers (QEMU opens it with share-rw): no tables to
            # corrupt.  A layered leaf is QEMU's alone.
            if not node.shared and held_by_qemu(leaf):
                # QEMU owns the leaf while it runs; a second writer would
                # corrupt it, and a reader would see tables QEMU has not
                # written back (issue: running VMs).
                raise Busy(f"VM {node.vm.name} runs in QEMU, which has the active volume "
                           f"{os.path.basename(leaf)} open; stop the VM first (snapshot views "
                           f"stay readable)")
            disk.check()
        elif writable:
            raise ReadOnly(f"{node.name} is read-only")
        handle = Handle(node)
        owner = node.owner
        if owner is not None and (writable or not is_active_write(owner)):
            open_use(node.vm, owner)
            handle.use = owner
        if writable and isinstance(disk, DiskView):
            # A snapshot never changes: this open writes to its own
            # throwaway overlay (fs/overlays.py).
            try:
                handle.overlay = self.scratch.open(node.view, self._label(node), owner=node.vm)
            except BaseException:
                self.closed(handle)
                raise
        if isinstance(disk, ActiveSlot):
            # Counted last: nothing after this can fail, so every count
            # has its release (ActiveSlot.released).
            disk.opened()
            handle.active = disk
        return handle

    def _open_guest(self, node, writable):
        """A file inside a tree: read-only, and only regular files."""
        if writable:
            raise ReadOnly(f"{node.name}: the files of a snapshot never change")
        handle = Handle(node, guest=node.tree.open(node.inode))
        # Open files of a snapshot's tree hold it like its views do.
        if node.owner is not None:
            open_use(node.vm, node.owner)
            handle.use = node.owner
        return handle

    def closed(self, handle):
        """The kernel released ``handle`` (cheap: called in the event loop;
        an overlay is let go in ``release``)."""
        if handle.use is not None:
            close_use(handle.node.vm, handle.use)
            handle.use = None

    def read(self, handle, offset, length):
        if handle.data is not None:
            return handle.data[offset:offset + length]
        node = handle.node
        if handle.guest is not None:
            return node.tree.read(handle.guest, offset, length)
        if node.control:
            raise PermissionDenied("control files are write-only")
        if isinstance(node.view, bytes):
            return node.view[offset:offset + length]
        if handle.overlay is not None:
            return handle.overlay.read(offset, length)
        return node.view.read(offset, length)

    def read_nowait(self, handle, offset, length):
        """``read`` if it can be answered without waiting on a lock or on
        CPU-heavy work (decompression), else None.  It may still read the
        host disk: one blocking pread costs less than a thread hop."""
        node = handle.node
        if handle.guest is not None:
            return node.tree.read(handle.guest, offset, length, wait=False)
        if handle.data is not None or isinstance(node.view, bytes) or node.control:
            return self.read(handle, offset, length)
        if handle.overlay is not None:
            return None     # it may copy from the snapshot: a worker's job
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
        if node.vm.write_gate.closed or not node.view.write(offset, data, wait=False):
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
            node.vm.write_gate.wait()
            node.view.write(offset, data)
            handle.wrote = True
            return len(data)
        if handle.overlay is not None:
            return handle.overlay.write(offset, data)
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
                # Waits for the operations asked before it (a merge): close()
                # holds no directory lock.
                self._run(node.vm, "create", lambda ops: ops.create(name), snapshot=name,
                          asked_by="touch")
            except SnapfsError as e:
                handle.error = e
                raise
        elif node.control:
            line = control.take_rest(handle)
            if line is not None:
                self._command(node, line)
        elif handle.error is not None:
            raise handle.error

    def needs_release(self, handle):
        """Whether ``release`` has work (for a worker thread)."""
        return handle.wrote or handle.overlay is not None or handle.active is not None

    def release(self, handle):
        """After writes to a whole active disk, its partition table may have
        changed (sfdisk, parted): list its partition views anew.  A
        throwaway overlay is deleted (closing a large one frees blocks)."""
        node = handle.node
        if handle.overlay is not None:
            handle.overlay.close()
        if handle.wrote and isinstance(node.view, ActiveSlot):
            with self._lock:
                self._refresh_partitions(node)
        # Last: reading the partition table above would open a writer again.
        if handle.active is not None:
            handle.active.released()
    def fsync(self, handle):
        """Throwaway overlays need no sync: they are gone at release."""
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
        node = refuse_change(self.node(inode))
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
        """Create snapshot ``name``.  The kernel holds the snapshots
        directory's lock until mkdir is answered, so it never waits for the
        VM: while the VM is busy (a merge runs, operations wait), the
        creation is checked against what the queue will leave, queued
        (fs/queue.py) and answered with a short-lived entry.  The snapshot
        shows once it is made, after the merge, and holds the disks as they
        were when mkdir was answered: writes to the VM's active views wait
        until it is made (WriteGate)."""
        vm = self._snapshots_dir_vm(parent)
        job = Job("create", name, asked_by="mkdir")
        # Closed before the job can be queued, so that no write slips in
        # between the answer and the gate; opened when the job is done.
        vm.write_gate.close()
        queued = False
        try:
            queued = self._run_or_queue(vm, job, lambda ops: ops.create(name),
                                        after=vm.write_gate.open)
        finally:
            if not queued:
                vm.write_gate.open()
        if queued:
            return self._short_lived(parent, name, vm, DIR_MODE, lister=list)
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
            # Checked against what the operations asked before will leave; a
            # busy VM is no refusal: the creation waits for them (flush).
            vm.queue.check(lambda jobs: refuse_queued(Job("create", name),
                                                      Projection(vm.manifest, jobs), vm))
        except SnapfsError as e:
            self._refused(vm, "create", e)
        node = self._short_lived(parent, name, vm, VIEW_MODE, view=b"")
        return Handle(node, creating=name), node

    def _short_lived(self, parent, name, vm, mode, **kw):
        """A node for a reply that must describe ``name`` before it is in
        the tree (touch, a queued mkdir): entry and attribute timeouts 0,
        so the next lookup asks again; dropped once the kernel forgets it
        (key "creating")."""
        node = Node(inode=0, name=name, parent=parent, mode=mode, mtime_ns=time.time_ns(),
                    timeout=0.0, immutable=False, vm=vm, key="creating", **kw)
        with self._lock:
            node.inode = self._next_inode
            self._next_inode += 1
            self._nodes[node.inode] = node
        return node

    def rmdir(self, parent, name):
        """Delete by merge.  rmdir holds the snapshots directory's lock in
        the kernel until it is answered, and that lock would stall every
        lookup and listing there: so it never waits for the VM.  Idle, it
        is answered once the deletion is recorded (the snapshot is gone
        from the namespace) and the merge goes on in the background, shown
        in control/status.  Busy, the deletion is checked, queued
        (fs/queue.py) and answered; the snapshot goes when its turn comes."""
        vm = self._snapshots_dir_vm(parent)
        if vm.queue.busy:
            self._wait_for_releases(vm, name)
        job = Job("delete", name, asked_by="rmdir")
        self._run_or_queue(vm, job, lambda ops: ops.start_delete(name),
                           then=lambda ops, started: ops.finish_delete(started))

    def _wait_for_releases(self, vm, name):
        """Before a delete is queued: views of the snapshot closed just now
        may not be released yet (fs/uses.py, RELEASE_GRACE); wait for them,
        as the delete itself would.  A view still open refuses it."""
        snap = vm.manifest.snapshot(name)
        if snap is None:
            return
        use = snapshot_use(snap.id)
        deadline = time.monotonic() + RELEASE_GRACE
        with vm.uses_changed:
            while vm.open_views.get(use) and deadline > time.monotonic():
                vm.uses_changed.wait(deadline - time.monotonic())

    def rename(self, parent_old, old, parent_new, new):
        """``mv snapshots/OLD snapshots/NEW``.  Like rmdir it holds the
        snapshots directory's lock in the kernel: it never waits for a busy
        VM, but is checked, queued and answered (fs/queue.py)."""
        vm = self._snapshots_dir_vm(parent_old)
        if old == "latest":
            raise NotPermitted("snapshots/latest follows the newest snapshot; it cannot be renamed")
        if parent_new != parent_old:
            other = self.node(parent_new)
            raise CrossDevice("snapshots move only within their VM's snapshots/") \
                if other.vm is not vm else NotPermitted("snapshots stay in snapshots/")
        job = Job("rename", old, target=new, asked_by="mv")
        self._run_or_queue(vm, job, lambda ops: ops.rename(old, new))

    def _label(self, node):
        """``VM/snapshots/NAME/FILE``: how control/status names a view."""
        names = []
        while node.inode != ROOT_INODE:
            names.append(node.name)
            node = self._nodes.get(node.parent)
            if node is None:
                break
        return "/".join(reversed(names))

    def _snapshots_dir_vm(self, inode):
        node = refuse_change(self.node(inode))
        if node.filetree is not None:
            refuse_change(node.filetree.entry(inode))
        if node.vm is None or node.name != "snapshots" or node.parent != node.vm.inode:
            raise NotPermitted("snapshots are created and deleted in <vm>/snapshots/")
        return node.vm

    def _command(self, node, line):
        """Run one command line written to control file ``node``."""
        try:
            op, args = control.parse(node.control, line)
        except SnapfsError as e:
            self._refused(node.vm, node.control, e)
        snapshot = args[0] if op in ("create", "delete", "preview", "clone") else None
        target = args[1] if op == "clone" else None
        # Waits for the operations asked before it (a merge): a control
        # file's write holds no directory lock.  A clone holds its source VM
        # (it reads a snapshot, which no merge may change meanwhile); the
        # other VMs go on.
        self._run(node.vm, op, lambda ops: getattr(ops, op)(*args), snapshot=snapshot,
                  asked_by=f"control/{node.control}", target=target)
        if op == "clone":
            try:
                self._show_vm(target)
            except SnapfsError as e:
                log.error("VM %s was cloned, but cannot be shown: %s", target, e)

    def _status(self, vm):
        m = vm.manifest
        preview = None
        if m.preview:
            snap = next((s for s in m.snapshots if s.id == m.preview["snapshot"]), None)
            preview = {"snapshot": snap.name if snap else None}
        holder, queued = vm.queue.jobs()
        busy = vm.running or holder is not None or queued
        state = "running" if busy else ("preview" if m.preview else "idle")
        # "queue": what was asked while the VM was busy, in the order it
        # runs ("answered": mkdir, rmdir, mv, whose requests returned).
        doc = {"vm": vm.name, "state": state, "operation": vm.running, "preview": preview,
               "queue": [job.describe() for job in queued],
               "snapshots": [s.name for s in m.snapshots],
               "overlays": [{"file": label, "bytes": size}
                            for label, size in self.scratch.overlays(vm)],
               "last_operation": m.last_operation, "last_error": vm.last_error,
               "file_trees": self.listings.trees.notes(vm)}
        return (json.dumps(doc, indent=2) + "\n").encode()

    def close(self):
        # The kernel is gone (unmounted): nothing to invalidate any more.
        self.notify = lambda parent, name: None
        self.notify_inode = lambda inode: None
        # A merge continuing after rmdir, and the operations queued behind
        # it, finish before the store is let go: their requests were
        # answered, so dropping them would lose a mkdir, mv or rmdir the
        # shell was told had worked (a queued rmdir is not recorded in the
        # manifest until it runs), and killing a merge would only leave the
        # next mount to redo it.  No request waits any more: the kernel
        # refuses to unmount while a file (a control file) is open.
        self._join_background()
        for vm in self._vms():
            for disk in vm.active.values():
                try:
                    disk.flush()
                except (SnapfsError, OSError) as e:
                    log.error("flushing %s failed: %s", vm.name, e)
        self.listings.close()
        self.pool.close()
def _tree_of(node):
    """The FileTree a node lies in (or is the root of), else None."""
    return node.tree if isinstance(node, GuestEntry) else node.filetree


def _is_active_part(node):
    return isinstance(node.view, PartitionView) and isinstance(node.view.disk, ActiveSlot)
