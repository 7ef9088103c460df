"""A live snapshot inside the QEMU that runs a VM: the QMP side.

snapfs makes the overlays itself (the bare-UUID backing name and format of
the leaf they go on, as offline); QEMU is asked to:

1. ``blockdev-add`` each overlay: a qcow2 node over a ``file`` node, with
   ``backing: null``, so QEMU opens only the overlay and not a second copy
   of the chain under it (``blockdev-snapshot`` refuses an overlay that has
   a backing node anyway);
2. one ``transaction`` of ``blockdev-snapshot`` actions, one per disk: all
   disks switch, or none.  QEMU attaches each device's current top node as
   the overlay's backing node in memory; it does not rewrite the overlay's
   header, which keeps the bare name snapfs wrote.  The old tops are
   reopened read-only, which flushes QEMU's caches of them to the files.

Node names come from the volume UUID (``node_names``), so that recovery
can find, and remove, what an interrupted create added.
"""

import os

from ..errors import ImageError, QemuError
from ..qcow2.image import Qcow2Image
from .verify import block_devices

_NODE = "snapfs-{}"
_FILE_NODE = "snapfs-{}-file"


def node_names(vid):
    """(format node, file node) of volume ``vid`` once blockdev-added: 16 hex
    digits of its UUID (QEMU node names have at most 31 characters)."""
    key = vid.replace("-", "")[:16]
    return _NODE.format(key), _FILE_NODE.format(key)


def device_tops(store, m, qmp):
    """{disk: node name of the top of the device that runs its active leaf}.
    Called after ``check_runs_active``; raises QemuError if a disk has no
    such device after all (it changed meanwhile)."""
    vm_dir = os.path.realpath(store.vm_dir(m.name))
    nodes = {path: node for _, path, node in block_devices(qmp)}
    tops = {}
    for disk, vid in m.active.items():
        node = nodes.get(os.path.join(vm_dir, vid))
        if node is None:
            raise QemuError(f"VM {m.name}: QEMU at {qmp.path} no longer runs the active leaf "
                            f"of disk {disk}")
        tops[disk] = node
    return tops


def add_overlays(qmp, paths):
    """``blockdev-add`` overlay ``paths`` ({volume id: path}).  On failure,
    removes what it added and raises QemuError."""
    added = []
    try:
        for vid, path in paths.items():
            node, file_node = node_names(vid)
            qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, "backing": None,
                "file": {"driver": "file", "node-name": file_node, "filename": path}})
            added.append(vid)
    except BaseException:
        remove_overlays(qmp, added)
        raise


def remove_overlays(qmp, vids):
    """``blockdev-del`` the nodes of volumes ``vids`` that QEMU has and
    that no device uses; nodes it doesn't have are no error (a crash may
    have come before or after each)."""
    present = {n["node-name"] for n in qmp.execute("query-named-block-nodes")}
    for vid in vids:
        # The file node was defined inside the qcow2 node's blockdev-add:
        # it goes with it.
        for node in node_names(vid):
            if node in present:
                qmp.execute("blockdev-del", {"node-name": node})
                break


def switch(qmp, tops, new):
    """One transaction: each disk's device top ``tops[disk]`` gets overlay
    ``new[disk]`` (a volume id added by ``add_overlays``) on top.  Raises
    QemuError, and then no disk switched."""
    qmp.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot",
         "data": {"node": tops[disk], "overlay": node_names(new[disk])[0]}}
        for disk in sorted(new)]})


def switched_disks(store, m, qmp, new):
    """The disks whose device in QEMU now writes the new overlay ``new[disk]``."""
    vm_dir = os.path.realpath(store.vm_dir(m.name))
    running = {path for _, path, _ in block_devices(qmp)}
    return {disk for disk, vid in new.items() if os.path.join(vm_dir, vid) in running}


def overlays_written(paths):
    """Does any of overlay files ``paths`` map a cluster, as it stands on
    disk?  True too when one can't be read: the caller then keeps it."""
    for path in paths:
        try:
            with Qcow2Image(path) as image:
                if image.runs():
                    return True
        except FileNotFoundError:
            continue                  # never made: nothing was written there
        except (ImageError, OSError):  # unreadable: can't tell, so keep it
            return True
    return False
