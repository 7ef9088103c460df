"""The tree of nodes behind the mount, and how it follows each VM's
manifest.

``Tree`` owns the nodes (inode -> Node), builds directories lazily from
``Listings`` and, after an operation, makes a VM's nodes match its new
manifest: snapshot directories keep their inodes (they are keyed by
snapshot id), views are pointed at their snapshots' chains now, the active
slots get new leaves, and nodes that left the tree let go of their files.
``Vfs`` (vfs.py) serves requests on top of it.
"""

import copy
import logging
import os
import threading

from ..errors import NotFound, SnapfsError
from ..ops.users import changed_volumes, snapshot_use
from .nodes import ROOT_INODE, Node
from .views import DiskView, PartitionView

log = logging.getLogger(__name__)


class Tree:
    """Nodes, and the VMs' manifests they show.  ``notify(parent, name)``
    and ``notify_inode(inode)`` tell the kernel what changed."""

    def __init__(self, store, pool, listings, notify=None, notify_inode=None):
        self.store = store
        self.pool = pool
        self.listings = listings
        self.notify = notify or (lambda parent, name: None)
        self.notify_inode = notify_inode or (lambda inode: None)
        self._nodes = {}
        self._next_inode = 1
        self._lock = threading.RLock()

    def node(self, inode):
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"no inode {inode}") from None

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
        if child.filetree is not None:
            child.filetree.top = child
        if child.vm is not None and child.vm.inode == 0:
            child.vm.inode = child.inode
        parent.children[name] = child.inode
        return child

    # -- keeping the tree in step with the manifest ----------------------------

    def _refresh_vm(self, vm, manifest=None):
        """Follow the VM's manifest (reloaded, or as just saved) and replace
        what changed: snapshot nodes by key, the chains behind snapshot
        views, the active leaves in their slots, the before-preview
        directory.

        Volumes whose files changed (``changed_volumes``) are forgotten
        first, then the views are pointed at their new chains: a read in
        between opens the old chain anew, which still reads the same bytes
        (every volume of it exists until this returns)."""
        try:
            manifest = copy.deepcopy(manifest) if manifest else self.store.load_vm(vm.name)
        except SnapfsError as e:
            # The manifest may have moved on without the mount: a write must
            # never land in a leaf that may now belong to a snapshot.
            log.error("VM %s cannot be reloaded, its active disks are read-only: %s", vm.name, e)
            for slot in vm.active.values():
                with slot.lock:
                    slot.disk.retire(f"VM {vm.name} cannot be reloaded: {e}")
            return
        with self._lock:
            changed = changed_volumes(vm.manifest, manifest)
            vm.manifest = manifest
            self.listings.forget(vm, changed)
            self._retarget_views(vm, changed)
            self._switch_leaves(vm, changed)
            vm_node = self._nodes[vm.inode]
            if vm_node.children is None:
                return
            self._refresh_dir(vm_node, "snapshots", self.listings.snapshots(vm))
            self._drop_given_up_disks(vm, vm_node)
            wanted = [self.listings.before_preview(vm)] if vm.manifest.preview else []
            self._refresh_children(vm_node, wanted, only={"before-preview"})

    def _show_vm(self, name):
        """VM ``name`` was added to the store by this mount (a clone): show
        it at the top level.  A root not listed yet will list it anyway.
        Raises NotFound, StoreError."""
        manifest = self.store.load_vm(name)
        with self._lock:
            root = self._nodes[ROOT_INODE]
            if root.children is None or name in root.children:
                return
            self._attach(root, self.listings.vm_entry(name, manifest))
        self.notify(ROOT_INODE, name)     # may be cached as absent

    def _retarget_views(self, vm, changed):
        """Point each listed snapshot view at its snapshot's chain now; let
        go of the views of snapshots that are gone."""
        snapshots = {s.id: s for s in vm.manifest.snapshots}
        for snapshot_id, views in list(vm.snapshot_views.items()):
            snap = snapshots.get(snapshot_id)
            for disk, view in list(views.items()):
                if snap is None or disk not in snap.volumes:
                    # Gone, or the disk given up by a custom preview's commit.
                    view.release()
                    del views[disk]
                    continue
                refs = self.listings.chain_refs(vm, snap.volumes[disk])
                if refs != view.refs or _touches(refs, changed):
                    view.retarget(refs)
            if snap is None:
                del vm.snapshot_views[snapshot_id]

    def _drop_given_up_disks(self, vm, vm_node):
        """A custom preview's commit can take a disk from a kept snapshot
        (ops: _cut_branches): its files leave that snapshot's directory."""
        snaps_node = self._nodes[vm_node.children["snapshots"]]
        held = {snapshot_use(s.id): s.volumes for s in vm.manifest.snapshots}
        for inode in (snaps_node.children or {}).values():
            node = self._nodes[inode]
            volumes = held.get(node.key)
            if volumes is None or node.children is None:
                continue
            for name in [n for n in node.children if n.endswith(".raw")]:
                stem = name[:-len(".raw")]
                # <disk>.raw, or a partition <disk>-partN.raw
                if stem not in volumes and stem.rsplit("-part", 1)[0] not in volumes:
                    self.notify(node.inode, name)
                    self._retire(node.children.pop(name))

    def _switch_leaves(self, vm, changed):
        """Give each active slot whose chain changed a new ActiveDisk.  The
        slot's lock is held: by the operation that changed it, already."""
        for disk, slot in vm.active.items():
            if disk in vm.manifest.special:
                continue            # no operation changes a LUN or shareable disk
            refs = self.listings.chain_refs(vm, vm.manifest.active[disk])
            if refs == slot.disk.refs and not _touches(refs[:-1], changed):
                continue
            with slot.lock:
                old, slot.disk = slot.disk, self.listings.active_disk(vm, disk)
                old.retire()
            vm.stale_pages = True
            vm_node = self._nodes.get(vm.inode)
            active = self._nodes[vm_node.children["active"]] if vm_node and vm_node.children \
                else None
            if active is not None and active.children is not None:
                node = self._nodes.get(active.children.get(f"{disk}.raw"))
                if node is not None:
                    self._refresh_partitions(node)

    def _retire(self, inode):
        """Node ``inode`` left the tree: it and everything below it refuse
        opens from now on and let go of their chains (their files close with
        the last read in flight).  The kernel may still ask for their
        attributes until it forgets them (``forget``)."""
        node = self._nodes.get(inode)
        if node is None or node.stale:
            return
        node.stale = True
        if node.filetree is not None:
            self.listings.trees.drop(node.filetree)
        view = node.view.disk if isinstance(node.view, PartitionView) else node.view
        if isinstance(view, DiskView):
            view.release()
        for child in (node.children or {}).values():
            self._retire(child)

    def forget(self, inodes):
        """The kernel forgot these inodes: drop the ones that left the tree."""
        with self._lock:
            for inode in inodes:
                node = self._nodes.get(inode)
                if node is not None and (node.stale or node.key == "creating"):
                    del self._nodes[inode]

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
        kept = set(new.values())
        for name, inode in old.items():
            if new.get(name) != inode:
                self.notify(parent.inode, name)
                if parent.children.get(name) == inode:
                    del parent.children[name]
            if inode not in kept:
                self._retire(inode)
        for name, inode in new.items():
            if old.get(name) is None:
                self.notify(parent.inode, name)   # may be cached as absent
        parent.children.update(new)

    def _refresh_partitions(self, node):
        """Make the ``<disk>-partN.raw`` siblings of active view ``node``
        match the disk's partition table now."""
        active = self._nodes.get(node.parent)
        if active is None or active.children is None:
            return
        disk = node.name[:-len(".raw")]
        prefix = disk + "-part"
        parts = self.listings.active_partitions(node.vm, node.view)
        wanted = {f"{prefix}{p.number}.raw": (p.start, p.length) for p in parts}
        shown = {n: (self._nodes[i].view.start, self._nodes[i].view.size)
                 for n, i in active.children.items() if n.startswith(prefix)}
        if shown == wanted:
            return
        for name in shown:
            self._retire(active.children.pop(name))
        for part in parts:
            self._attach(active, self.listings.active_partition(node.vm, node.view, disk, part))
        for name in set(shown) | set(wanted):
            self.notify(active.inode, name)


def _touches(refs, changed):
    """Whether any of the volumes ``refs`` names is in ``changed`` (ids)."""
    return any(os.path.basename(r.path) in changed for r in refs)
