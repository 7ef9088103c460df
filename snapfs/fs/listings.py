"""What each directory of the mount holds, as node specs.

A spec is a dict of Node fields plus "name"; a directory's spec carries a
``lister`` that makes its children's specs when it is first listed.  The
listers open volumes and read partition tables, so they may block on disk
I/O; fs/tree.py calls them under its lock, from worker threads.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from ..errors import NotFound, SnapfsError
from ..ops.users import BEFORE_PREVIEW_USE, active_write_use, snapshot_use
from ..store.chain import VolumeRef
from .nodes import (
    ACTIVE_MODE, CONTROL_COMMANDS, CONTROL_MODE, DIR_MODE, DISK_VIEW_MODE, LINK_MODE,
    MUTABLE_TIMEOUT, SNAPSHOTS_DIR_MODE, STATUS_MODE, VIEW_MODE, VmState,
)
from .filetree import FileTrees
from .partition_reuse import chain_partitions, read_table
from ..guestfs.partitions import find_partitions
from .snapshot_json import SnapshotJson
from .views import ActiveDisk, ActiveSlot, DiskView, PartitionView

log = logging.getLogger(__name__)

# Threads that open a chain's volumes side by side (see _open_ahead).
OPEN_AHEAD_THREADS = 8


class Listings:
    def __init__(self, store, pool, mount_time_ns):
        self.store = store
        self.pool = pool
        self.mount_time_ns = mount_time_ns
        self._opener = None         # ThreadPoolExecutor of _open_ahead, made on first use
        self._opened = set()        # volume paths _open_ahead has seen open
        self.trees = FileTrees()

    def root(self):
        specs = []
        for name, manifest in self.store.load_vms():
            if isinstance(manifest, (SnapfsError, OSError)):
                log.error("VM %s is not shown: %s", name, manifest)
                continue
            if isinstance(manifest, BaseException):
                raise manifest
            specs.append(self.vm_entry(name, manifest))
        return specs

    def vm_entry(self, name, manifest):
        """The spec of VM ``name``'s directory at the top level."""
        vm = VmState(name, manifest)
        # Every disk has its slot from the start: an operation holds the
        # slots of the disks it changes (MountUsers.hold), listed or not.
        for disk in manifest.all_disks:
            vm.active[disk] = ActiveSlot(self.active_disk(vm, disk))
        return dict(name=name, mode=DIR_MODE, mtime_ns=self.time(manifest.created),
                    timeout=MUTABLE_TIMEOUT, vm=vm, lister=lambda: self.vm(vm))

    def vm(self, vm):
        mtime = self.time(vm.manifest.created)
        specs = [
            dict(name="active", mode=DIR_MODE, mtime_ns=mtime, timeout=MUTABLE_TIMEOUT, vm=vm,
                 lister=lambda: self.active(vm)),
            dict(name="snapshots", mode=SNAPSHOTS_DIR_MODE, mtime_ns=mtime,
                 timeout=MUTABLE_TIMEOUT, vm=vm, lister=lambda: self.snapshots(vm)),
            dict(name="control", mode=DIR_MODE, mtime_ns=mtime, vm=vm,
                 lister=lambda: self.control(vm)),
        ]
        if vm.manifest.preview:
            specs.append(self.before_preview(vm))
        return specs

    def before_preview(self, vm):
        before = vm.manifest.preview["before"]
        return dict(name="before-preview", mode=DIR_MODE, mtime_ns=self.mount_time_ns, vm=vm,
                    key=("before", tuple(sorted(before.items()))),
                    lister=lambda: self._disks(vm, before, None))

    def control(self, vm):
        specs = [dict(name=c, mode=CONTROL_MODE, mtime_ns=self.mount_time_ns, control=c, vm=vm,
                      immutable=False) for c in CONTROL_COMMANDS]
        specs.append(dict(name="status", mode=STATUS_MODE, mtime_ns=self.mount_time_ns,
                          control="status", vm=vm, immutable=False, timeout=0.0))
        return specs

    def snapshots(self, vm):
        specs = []
        for snap in vm.manifest.snapshots:
            # Keyed by id, not by name or chain: a renamed snapshot keeps its
            # inode, as the kernel moves its cached entry, and so does one
            # whose chain a merge changed, since its bytes did not change
            # (its views are retargeted: Tree._retarget_views).
            specs.append(dict(name=snap.name, mode=DIR_MODE, mtime_ns=self.time(snap.created),
                              vm=vm, key=snapshot_use(snap.id),
                              lister=lambda s=snap: self._snapshot_disks(vm, s.id)))
        if vm.manifest.snapshots:
            newest = vm.manifest.snapshots[-1]
            specs.append(dict(name="latest", mode=LINK_MODE, timeout=MUTABLE_TIMEOUT,
                              immutable=False, mtime_ns=self.time(newest.created), vm=vm,
                              key=("latest",), target=newest.name,
                              size=len(newest.name.encode())))
        return specs

    def active(self, vm):
        specs = []
        for disk in vm.manifest.all_disks:
            slot = vm.active[disk]
            specs.append(dict(name=f"{disk}.raw", mode=ACTIVE_MODE, mtime_ns=self.mount_time_ns,
                              view=slot, vm=vm, immutable=False, timeout=MUTABLE_TIMEOUT,
                              owner=active_write_use(disk),
                              shared=disk in vm.manifest.special))
            for part in self.active_partitions(vm, slot):
                specs.append(self.active_partition(vm, slot, disk, part))
        return specs

    def active_partition(self, vm, slot, disk, part):
        return dict(name=f"{disk}-part{part.number}.raw", mode=ACTIVE_MODE,
                    mtime_ns=self.mount_time_ns, vm=vm, immutable=False,
                    timeout=MUTABLE_TIMEOUT, view=PartitionView(slot, part.start, part.length),
                    owner=active_write_use(disk), shared=disk in vm.manifest.special)

    def active_disk(self, vm, disk):
        m = vm.manifest
        if disk in m.special:
            return ActiveDisk(self.pool, [self.store.special_ref(m, disk)])
        return ActiveDisk(self.pool, self.chain_refs(vm, m.active[disk]))

    def active_partitions(self, vm, slot):
        """The partitions of an active disk as it reads now.  Until its
        writer opens, the leaf's file holds every write, so the table is
        found as a snapshot's is, through read-only volumes: listing
        ``active/`` of many VMs opens no writer (and no writer's L2 cache).
        Once the writer is open it is read through it, as its table updates
        may not be written back yet; the writer then stays open, so the
        read-only view's map is never read after a write."""
        disk = slot.disk
        if disk.writer_open:
            return self._partitions(slot)

        def read_chain(n):
            if n == len(disk.refs):
                return read_table(disk.readonly_view)
            return read_table(DiskView(self.pool, disk.refs[:n]))

        return chain_partitions(self.pool, vm.partitions, disk.refs, read_chain,
                                remember_top=False, parallel_map=self._map)

    def forget(self, vm, volume_ids):
        """Volumes of the VM changed on disk (written, merged into, deleted):
        drop what is known of them.  The others stay open, with their maps."""
        paths = {self.store.volume_path(vm.name, vid) for vid in volume_ids}
        vm.refs = {v: r for v, r in vm.refs.items() if v in vm.manifest.volumes}
        # Partition tables found through chains are cheap to find again.
        vm.partitions = {}
        self.pool.forget_paths(paths)
        self._opened -= paths

    def prime(self, vm, volume_ids):
        """Open volumes and read their maps before an operation writes them."""
        for vid in volume_ids:
            info = vm.manifest.volumes.get(vid)
            if info is not None:
                self.pool.prime(self.store.volume_path(vm.name, vid), info["format"])

    def close(self):
        if self._opener is not None:
            self._opener.shutdown()

    def time(self, iso):
        try:
            return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
        except (ValueError, AttributeError):
            return self.mount_time_ns

    # -- snapshot views ----------------------------------------------------------

    def chain_refs(self, vm, volume_id):
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

    def _snapshot_disks(self, vm, snapshot_id):
        """The files of a snapshot's directory, from the manifest as it is
        now.  Raises NotFound if the snapshot is gone (a stale directory)."""
        snap = next((s for s in vm.manifest.snapshots if s.id == snapshot_id), None)
        if snap is None:
            raise NotFound("the snapshot was deleted")
        return self._disks(vm, snap.volumes, snap)

    def _disks(self, vm, volumes, snapshot):
        m = vm.manifest
        mtime = self.time(snapshot.created) if snapshot else self.mount_time_ns
        owner = snapshot_use(snapshot.id) if snapshot else BEFORE_PREVIEW_USE
        specs, views = [], {}
        # A snapshot holds the layered disks it was taken of; its
        # snapshot.json names the others (``excluded``).
        for disk in (d for d in m.disks if d in volumes):
            view = DiskView(self.pool, self.chain_refs(vm, volumes[disk]))
            specs.append(dict(name=f"{disk}.raw", mode=DISK_VIEW_MODE, mtime_ns=mtime, view=view,
                              vm=vm, owner=owner))
            views[disk] = view
            parts = self._view_partitions(vm, view)
            for part in parts:
                part_view = PartitionView(view, part.start, part.length)
                specs.append(dict(name=f"{disk}-part{part.number}.raw", mode=DISK_VIEW_MODE,
                                  mtime_ns=mtime, vm=vm, owner=owner, view=part_view))
                specs.extend(self._file_tree(vm, f"{disk}-part{part.number}", part_view,
                                             snapshot, owner, mtime))
            if not parts:
                specs.extend(self._file_tree(vm, f"{disk}.files", view, snapshot, owner, mtime))
        if snapshot is not None:
            vm.snapshot_views[snapshot.id] = views
            specs.append(dict(name="snapshot.json", mode=VIEW_MODE, mtime_ns=mtime, vm=vm,
                              immutable=False, timeout=MUTABLE_TIMEOUT,
                              render=SnapshotJson(vm, snapshot.id, views)))
        return specs

    def _file_tree(self, vm, name, view, snapshot, owner, mtime):
        """[the spec of directory ``name``, the files of the filesystem in
        ``view``], or [] when there is none snapfs can read (logged)."""
        where = f"snapshots/{snapshot.name}" if snapshot else "before-preview"
        try:
            tree = self.trees.make(view, f"{vm.name}/{where}/{name}")
        except SnapfsError as e:        # the view itself is broken (logged)
            log.info("%s/%s/%s: no file tree: %s", vm.name, where, name, e)
            return []
        if tree is None:
            return []
        return [dict(name=name, mode=DIR_MODE, mtime_ns=mtime, vm=vm, owner=owner,
                     filetree=tree)]

    def _view_partitions(self, vm, view):
        """The partitions of a read-only view (a snapshot, before-preview),
        reusing the table of the chain below where it cannot differ."""
        refs = view.refs

        def read_chain(n):
            if n < len(refs):
                return read_table(DiskView(self.pool, refs[:n]))
            self._open_ahead(refs)
            return read_table(view)

        return chain_partitions(self.pool, vm.partitions, refs, read_chain, parallel_map=self._map)

    def _partitions(self, view):
        try:
            return find_partitions(view.read, view.size)
        except SnapfsError:
            return []    # already logged by the view

    def _map(self, fn, items):
        """``map`` over the opener's threads, when there are items to share."""
        if len(items) < 2:
            return map(fn, items)
        return self._executor().map(fn, items)

    def _executor(self):
        if self._opener is None:
            self._opener = ThreadPoolExecutor(OPEN_AHEAD_THREADS, thread_name_prefix="snapfs-open")
        return self._opener

    def _open_ahead(self, refs):
        """Open the volumes of a chain, and read their maps, side by side
        before the chain does it one by one: from a cold cache each volume
        costs a few small reads, and their latencies add up.  Errors are
        left for the chain to meet and report."""
        todo = [r for r in refs if r.path not in self._opened]
        if len(todo) < 2:
            return

        def load(ref):
            try:
                self.pool.runs(self.pool.get(ref.path, ref.format))
            except Exception:
                return
            self._opened.add(ref.path)

        for _ in self._executor().map(load, todo):
            pass
