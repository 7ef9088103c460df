"""Does the QEMU attached to a VM run the VM's active leaves?

Before snapfs acts on a running VM it asks QEMU (``query-block``) which
image each block device has on top, the one the guest writes, and compares
real paths with the manifest's active leaves.  Anything else is refused
with every difference named: a QEMU started on a snapshot's volume, on a
copy, or on another VM writes somewhere the manifest does not say, and a
snapshot taken of what the manifest says would miss the guest's writes.

``query-block`` and not ``query-named-block-nodes``: it lists what the
devices use, top first, whatever the node names (QEMU started by hand or
by libvirt names nodes its own way), while the named nodes also hold
backing and unattached nodes, which say nothing about what is written.
Devices are matched to disks by path first, then by the device id
``snapfs vm qemu-args`` gives them, then by the disk a volume belongs to.
"""

import json
import os

from ..errors import QemuMismatch
from .args import disk_id

_PERIPHERAL = "/machine/peripheral/"


def block_tops(qmp):
    """[(device label, top image file name)] of QEMU's block devices that
    have a medium.  The label is the device id (``-device ...,id=``), or
    the legacy drive name, or the node name."""
    return [(label, name) for label, name, _ in _devices(qmp)]


def block_devices(qmp):
    """[(device label, real path of its top image, top node name)]."""
    return [(label, _real(name), node) for label, name, node in _devices(qmp)]


def _devices(qmp):
    devices = []
    for dev in qmp.execute("query-block"):
        inserted = dev.get("inserted")
        if not inserted:
            continue            # an empty CD-ROM drive
        filename = (inserted.get("image") or {}).get("filename") or inserted.get("file")
        devices.append((_label(dev, inserted), _plain(filename), inserted.get("node-name")))
    return devices


def _plain(filename):
    """The file under a ``json:{...}`` name.  QEMU names a node that way
    when it was opened with options its header doesn't imply, as a live
    snapshot's overlay is (``backing: null``, its backing attached later):
    ``json:{"driver": "qcow2", "file": {"driver": "file", "filename": P},
    "backing": ...}`` is the qcow2 image at P."""
    if not filename or not filename.startswith("json:"):
        return filename
    try:
        spec = json.loads(filename[len("json:"):])
        file = spec.get("file")
        if isinstance(file, dict) and file.get("driver") == "file" \
                and isinstance(file.get("filename"), str):
            return file["filename"]
    except (ValueError, AttributeError):
        pass
    return filename


def _label(dev, inserted):
    qdev = dev.get("qdev") or ""
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL):].split("/", 1)[0]
    return dev.get("device") or inserted.get("node-name") or qdev or "?"


def mismatches(store, m, tops):
    """Lines naming each difference between QEMU's device tops ``tops``
    (see ``block_tops``) and the active leaves of manifest ``m``; empty if
    QEMU runs exactly them."""
    vm_dir = os.path.realpath(store.vm_dir(m.name))
    volume_of = {os.path.join(vm_dir, vid): vid for vid in m.volumes}
    leaves = {disk: os.path.join(vm_dir, vid) for disk, vid in m.active.items()}
    real = [(label, name, _real(name)) for label, name in tops]
    running = {path for _, _, path in real}
    problems, explained = [], set()
    for disk in m.disks:
        if leaves[disk] in running:
            continue
        dev = _device_of(disk, real, volume_of, m)
        if dev is None:
            has = "no device with a volume of this disk"
        else:
            explained.add(dev[0])
            has = f"device {dev[0]} on {dev[1]}{_what(dev[2], volume_of, m)}"
        problems.append(f"disk {disk}: QEMU has {has}; the store's active leaf is {leaves[disk]}")
    active = set(leaves.values())
    for label, name, path in real:
        if label in explained or path in active:
            continue
        if path in volume_of or os.path.dirname(path) == vm_dir:
            problems.append(f"device {label}: QEMU has {name}{_what(path, volume_of, m)}, "
                            f"which is no active leaf of VM {m.name}")
    return problems


def check_runs_active(store, m, qmp):
    """Raise QemuMismatch (EBUSY) unless the QEMU of session ``qmp`` runs
    the active leaves of manifest ``m``, naming every difference."""
    problems = mismatches(store, m, block_tops(qmp))
    if problems:
        raise QemuMismatch(f"VM {m.name}: the QEMU attached at {qmp.path} does not run the "
                           f"store's active volumes: " + "; ".join(problems)
                           + "; start QEMU with 'snapfs vm qemu-args', or detach it")


def _real(name):
    # "json:{...}" names and the like are no paths: compared as they are.
    return os.path.realpath(name) if name and name.startswith("/") else name


def _device_of(disk, real, volume_of, m):
    """QEMU's device that stands for ``disk``: by the id qemu-args gives
    it, else the first whose top is a volume of the disk."""
    for dev in real:
        if dev[0] == disk_id(disk):
            return dev
    for dev in real:
        vid = volume_of.get(dev[2])
        if vid is not None and m.volumes[vid]["disk"] == disk:
            return dev
    return None


def _what(path, volume_of, m):
    """`` (snapshot S's volume of disk D)`` and the like, for a message."""
    vid = volume_of.get(path)
    if vid is None:
        return ""
    owners = [s.name for s in m.snapshots if vid in s.volumes.values()]
    if owners:
        return f" (the volume of snapshot {owners[0]})"
    if m.preview and vid in m.preview["before"].values():
        return " (the active volume from before the preview)"
    if vid in m.active.values():
        return f" (the active leaf of disk {m.volumes[vid]['disk']})"
    return " (an inner layer of the store's chain)"
