"""The qemu-system arguments that run a VM on the store's volumes, and the
QEMU ids of its disks.

Each disk is one ``-blockdev`` of its active leaf (a format node over a
``file`` node) and one ``virtio-blk-pci`` device.  Only the leaf is named:
QEMU opens the backing chain itself from the bare-UUID backing names,
which it resolves against the leaf's own directory, with the recorded
backing formats.  Nothing is passed that would make QEMU write a backing
path into a header.

The arguments are printed one per line (``snapfs vm qemu-args``): that
survives spaces in paths with ``mapfile``/``xargs -d '\\n'``, and
``$(...)`` works whenever the store's path has no blank in it.  Inside
QEMU's ``key=value,...`` option syntax a comma in a value is written
twice; a newline cannot be passed this way at all, and is refused.
"""

import hashlib
import re

from ..errors import InvalidArgument

PREFIX = "snapfs-"
ID_MAX = 31                   # QEMU's limit on block node names
_VALID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_INVALID_CHAR = re.compile(r"[^A-Za-z0-9._-]")
QMP_CHARDEV = "snapfs-qmp"
AGENT_CHARDEV = "snapfs-qga"
AGENT_PORT = "org.qemu.guest_agent.0"


def disk_id(disk):
    """The node name and device id of ``disk``: ``snapfs-<disk>`` when the
    disk's name is a valid QEMU id and short enough; else its valid
    characters (others become ``_``), cut, and 8 hex digits of its
    SHA-256, so that two names that map alike stay apart.  Deterministic,
    so the ids of a running QEMU can be found again."""
    plain = PREFIX + disk
    if _VALID.match(plain) and len(plain) <= ID_MAX:
        return plain
    digest = hashlib.sha256(disk.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    room = ID_MAX - len(PREFIX) - 1 - len(digest)
    return f"{PREFIX}{_INVALID_CHAR.sub('_', disk)[:room]}-{digest}"


def disk_ids(disks):
    """{disk: id} for a VM's disks; refuses (never expected) a collision."""
    ids = {disk: disk_id(disk) for disk in disks}
    if len(set(ids.values())) != len(ids):
        raise InvalidArgument(f"disks {sorted(disks)} map to clashing QEMU ids {ids}")
    return ids


def opt(value):
    """``value`` inside a QEMU ``key=value,...`` option: commas doubled."""
    if "\n" in value or "\0" in value:
        raise InvalidArgument(f"{value!r}: QEMU options cannot carry a newline")
    return value.replace(",", ",,")


def qemu_args(leaves, qmp=None, guest_agent=None, kinds=None):
    """The arguments for disks ``leaves`` ({disk: (absolute path of the
    active leaf, its format)}, in the VM's disk order), with a QMP monitor
    on UNIX socket ``qmp`` and a guest-agent channel on ``guest_agent``
    (QEMU listens on both; it does not wait for a client).  ``kinds`` gives
    the kind ("lun", "shareable") of the disks that are not layered: a
    LUN's file is a ``host_device``, and a shareable disk's device lets
    other QEMUs write the image too (``share-rw``)."""
    kinds = kinds or {}
    args = []
    for disk, node in disk_ids(leaves).items():
        path, fmt = leaves[disk]
        protocol = "host_device" if kinds.get(disk) == "lun" else "file"
        share = ",share-rw=on" if kinds.get(disk) == "shareable" else ""
        args += ["-blockdev", f"driver={fmt},node-name={node},file.driver={protocol},"
                              f"file.filename={opt(path)}",
                 "-device", f"virtio-blk-pci,drive={node},id={node}{share}"]
    if qmp:
        # -chardev + -mon rather than -qmp unix:PATH: the legacy form can't
        # escape a comma in the path.
        args += ["-chardev", f"socket,id={QMP_CHARDEV},path={opt(qmp)},server=on,wait=off",
                 "-mon", f"chardev={QMP_CHARDEV},mode=control"]
    if guest_agent:
        args += ["-chardev", f"socket,id={AGENT_CHARDEV},path={opt(guest_agent)},"
                             f"server=on,wait=off",
                 "-device", "virtio-serial",
                 "-device", f"virtserialport,chardev={AGENT_CHARDEV},name={AGENT_PORT}"]
    return args
