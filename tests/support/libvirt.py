"""libvirt as the importer meets it: images made as virsh makes them, and
the XML that ``virsh dumpxml`` and ``virsh snapshot-dumpxml`` write (two
spaces of indent, single quotes, a snapshot's own ``<domain>`` inside it).

No libvirtd is needed: ``disk_only_snapshot`` does what ``virsh
snapshot-create-as --disk-only`` does to the files (a new qcow2 overlay
next to each top, named after the snapshot, its backing file recorded by
absolute path with its format), and the XML is written from templates.
"""

import contextlib
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

from tests.support.qemu import qemu_img, qemu_io

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def _attr(value):
    """An attribute value in single quotes, as libvirt writes them."""
    return "'" + escape(str(value), {"'": "&apos;"}) + "'"


def make_image(path, size="4M", backing=None, fmt="qcow2", writes=()):
    """A new image; ``writes``: (pattern byte, offset, length) written with
    qemu-io.  A backing file is recorded by absolute path, with its format."""
    args = ["create", "-f", fmt]
    if backing is not None:
        args += ["-b", str(Path(backing).resolve()), "-F", "qcow2"]
    qemu_img(*args, path, *([size] if backing is None else []))
    write(path, writes, fmt)
    return Path(path)


def write(path, writes, fmt="qcow2"):
    for pattern, offset, length in writes:
        qemu_io(path, f"write -P {pattern} {offset} {length}", fmt=fmt)


def disk_only_snapshot(tops, name):
    """``virsh snapshot-create-as DOMAIN NAME --disk-only`` on ``tops``
    ({disk: current top image}): {disk: its new overlay}, each
    ``<top without extension>.NAME`` beside it."""
    return {disk: make_image(top.parent / f"{top.name.split('.')[0]}.{name}", backing=top)
            for disk, top in tops.items()}


# -- domain XML ----------------------------------------------------------------

def file_disk(dev, source, fmt="qcow2", chain=None, complete=True, shareable=False,
              bus="virtio"):
    """A ``<disk type='file' device='disk'>``.  ``chain``: its backing
    files, nearest first, as the ``<backingStore>`` elements virsh nests
    (ending in an empty one if ``complete``); None: no <backingStore>, as
    virsh writes for a domain that is shut off."""
    backing = ""
    if chain is not None:
        backing = "<backingStore/>" if complete else ""
        for path in reversed(list(chain)):
            inner = ("\n" + backing).replace("\n", "\n  ") if backing else ""
            backing = (f"<backingStore type='file'>\n  <format type='qcow2'/>\n"
                       f"  <source file={_attr(path)}/>{inner}\n</backingStore>")
    lines = ["<disk type='file' device='disk'>",
             f"  <driver name='qemu' type={_attr(fmt)}/>",
             f"  <source file={_attr(source)}/>"]
    lines += ["  " + line for line in backing.splitlines()]
    lines += [f"  <target dev={_attr(dev)} bus={_attr(bus)}/>"]
    lines += ["  <shareable/>"] if shareable else []
    lines += ["</disk>"]
    return "\n".join(lines)


def block_disk(dev, device):
    return (f"<disk type='block' device='disk'>\n"
            f"  <driver name='qemu' type='raw' cache='none' io='native'/>\n"
            f"  <source dev={_attr(device)}/>\n"
            f"  <backingStore/>\n"
            f"  <target dev={_attr(dev)} bus='virtio'/>\n"
            f"</disk>")


def cdrom(dev, iso):
    return (f"<disk type='file' device='cdrom'>\n"
            f"  <driver name='qemu' type='raw'/>\n"
            f"  <source file={_attr(iso)}/>\n"
            f"  <target dev={_attr(dev)} bus='sata'/>\n"
            f"  <readonly/>\n"
            f"</disk>")


def network_disk(dev):
    return (f"<disk type='network' device='disk'>\n"
            f"  <driver name='qemu' type='raw'/>\n"
            f"  <source protocol='rbd' name='pool/image'>\n"
            f"    <host name='ceph.example' port='6789'/>\n"
            f"  </source>\n"
            f"  <target dev={_attr(dev)} bus='virtio'/>\n"
            f"</disk>")


def domain_xml(name, disks, uuid=UUID, tag="domain"):
    """A domain as virsh dumpxml writes it, with ``disks`` (XML of <disk>s)."""
    devices = "\n".join("    " + line for d in disks for line in d.splitlines())
    return (f"<{tag} type='kvm'>\n"
            f"  <name>{escape(name)}</name>\n"
            f"  <uuid>{uuid}</uuid>\n"
            f"  <metadata>\n"
            f"    <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\n"
            f"      <libosinfo:os id='http://debian.org/debian/12'/>\n"
            f"    </libosinfo:libosinfo>\n"
            f"  </metadata>\n"
            f"  <memory unit='KiB'>2097152</memory>\n"
            f"  <currentMemory unit='KiB'>2097152</currentMemory>\n"
            f"  <vcpu placement='static'>2</vcpu>\n"
            f"  <os>\n"
            f"    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>\n"
            f"    <boot dev='hd'/>\n"
            f"  </os>\n"
            f"  <clock offset='utc'/>\n"
            f"  <on_poweroff>destroy</on_poweroff>\n"
            f"  <on_reboot>restart</on_reboot>\n"
            f"  <on_crash>destroy</on_crash>\n"
            f"  <devices>\n"
            f"    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
            f"{devices}\n"
            f"    <controller type='sata' index='0'/>\n"
            f"    <interface type='network'>\n"
            f"      <mac address='52:54:00:6b:3c:58'/>\n"
            f"      <source network='default'/>\n"
            f"      <model type='virtio'/>\n"
            f"    </interface>\n"
            f"  </devices>\n"
            f"</{tag}>\n")


# -- snapshot XML --------------------------------------------------------------

def snapshot_xml(name, created, disks, domain, description=None, state="shutoff",
                 memory="no", parent=None):
    """A ``<domainsnapshot>`` as virsh snapshot-dumpxml writes it.
    ``disks``: (dev, mode, overlay path or None); ``domain``: the domain XML
    of the moment before the snapshot, embedded as virsh does."""
    lines = ["<domainsnapshot>", f"  <name>{escape(name)}</name>"]
    if description is not None:
        lines.append(f"  <description>{escape(description)}</description>")
    lines.append(f"  <state>{state}</state>")
    if parent:
        lines += ["  <parent>", f"    <name>{escape(parent)}</name>", "  </parent>"]
    lines.append(f"  <creationTime>{created}</creationTime>")
    lines.append(f"  <memory snapshot={_attr(memory)}"
                 + (" file='/var/lib/libvirt/qemu/save/mem'" if memory == "external" else "")
                 + "/>")
    if disks:
        lines.append("  <disks>")
        for dev, mode, overlay in disks:
            if mode == "external":
                lines += [f"    <disk name={_attr(dev)} snapshot='external' type='file'>",
                          "      <driver type='qcow2'/>",
                          f"      <source file={_attr(overlay)}/>",
                          "    </disk>"]
            else:
                lines.append(f"    <disk name={_attr(dev)} snapshot={_attr(mode)}/>")
        lines.append("  </disks>")
    lines += ["  " + line for line in domain.strip().splitlines()]
    lines += ["  <active>0</active>", "</domainsnapshot>"]
    return "\n".join(lines) + "\n"


# -- loop devices --------------------------------------------------------------

@contextlib.contextmanager
def loop_device(backing_file):
    """``losetup -f --show`` on a file; always detached."""
    device = subprocess.run(["losetup", "-f", "--show", str(backing_file)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True, capture_output=True)


# -- a VM with a history -------------------------------------------------------

KIB = 1024
TEMPLATE_TIME = 1690000000            # 2023-07-22T04:26:40Z
PRE_UPGRADE_TIME = 1700000000         # 2023-11-14T22:13:20Z
NIGHTLY_TIME = 1700086400             # 2023-11-15T22:13:20Z


def utc(seconds):
    """Unix time as a snapshot's ``created``."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Built:
    domain: Path                      # the domain XML
    snapshots: Path                   # the directory of snapshot XMLs
    views: dict                       # {snapshot name or 'active': {disk: image to convert}}
    sources: list                     # every image file made, for --move checks
    shared: Path | None = None


def build_web01(root, lun=None, extra_disks=(), shareable=True):
    """Domain web01 as virsh leaves it, in ``root``:

    - vda: a template base (``debian12.qcow2``, which no snapshot names), the
      VM's image on it, and the overlays of snapshots pre-upgrade and nightly;
    - vdb: a data disk, in pre-upgrade only (nightly has it ``snapshot='no'``);
    - sda, a CD-ROM; vde, a network disk (both skipped);
    - vdc, a direct LUN on the block device ``lun`` (if given); vdd, a
      shareable raw disk (if ``shareable``).

    Snapshot XMLs: pre-upgrade (running, two disks, a description on two
    lines), nightly (shut off, vda only), an internal one and a memory-only
    one (both skipped), and a ``<domain>`` file that is not a snapshot.
    """
    images = root / "images"
    images.mkdir(parents=True)
    template = make_image(images / "debian12.qcow2", writes=[(0x61, 0, 64 * KIB),
                                                             (0x62, 1024 * KIB, 64 * KIB)])
    os.utime(template, (TEMPLATE_TIME, TEMPLATE_TIME))
    vda = make_image(images / "web01.qcow2", backing=template,
                     writes=[(0x11, 64 * KIB, 64 * KIB), (0x12, 1024 * KIB, 4 * KIB)])
    vdb = make_image(images / "web01-data.qcow2", size="2M", writes=[(0x21, 0, 128 * KIB)])
    iso = images / "debian-12.iso"
    iso.write_bytes(b"CD001" * 100)
    shared = None
    if shareable:
        shared = images / "quorum.img"
        shared.write_bytes(os.urandom(256 * KIB))

    def disks(vda_disk, vdb_disk):
        out = [vda_disk, vdb_disk, cdrom("sda", iso), network_disk("vde")]
        if lun is not None:
            out.append(block_disk("vdc", lun))
        if shared is not None:
            out.append(file_disk("vdd", shared, fmt="raw", shareable=True))
        return out + list(extra_disks)

    before_pre = domain_xml("web01", disks(file_disk("vda", vda, chain=[template]),
                                           file_disk("vdb", vdb, chain=[])))
    pre = disk_only_snapshot({"vda": vda, "vdb": vdb}, "pre-upgrade")
    write(pre["vda"], [(0x13, 128 * KIB, 64 * KIB), (0x14, 0, 4 * KIB)])
    write(pre["vdb"], [(0x22, 64 * KIB, 64 * KIB)])
    before_nightly = domain_xml("web01", disks(file_disk("vda", pre["vda"]),
                                               file_disk("vdb", pre["vdb"])))
    nightly = disk_only_snapshot({"vda": pre["vda"]}, "nightly")
    write(nightly["vda"], [(0x15, 192 * KIB, 64 * KIB), (0x16, 64 * KIB, 4 * KIB)])
    # Running, as virsh dumpxml shows it: vda's <backingStore> lists part of
    # its chain, vdb's none.
    domain = root / "web01.xml"
    domain.write_text(domain_xml("web01", disks(
        file_disk("vda", nightly["vda"], chain=[pre["vda"]], complete=False),
        file_disk("vdb", pre["vdb"]))))

    held = [("sda", "no", None), ("vde", "no", None)] + (
        [("vdc", "no", None)] if lun is not None else []) + (
        [("vdd", "no", None)] if shared is not None else [])
    snaps = root / "snapshots"
    snaps.mkdir()
    (snaps / "pre-upgrade.xml").write_text(snapshot_xml(
        "pre-upgrade", PRE_UPGRADE_TIME,
        [("vda", "external", pre["vda"]), ("vdb", "external", pre["vdb"])] + held,
        before_pre, description="Before the\n    upgrade to 2.0", state="disk-snapshot"))
    (snaps / "nightly.xml").write_text(snapshot_xml(
        "nightly", NIGHTLY_TIME,
        [("vda", "external", nightly["vda"]), ("vdb", "no", None)] + held,
        before_nightly, description="nightly", state="shutoff", parent="pre-upgrade"))
    (snaps / "savevm.xml").write_text(snapshot_xml(
        "savevm", NIGHTLY_TIME + 10, [("vda", "internal", None), ("vdb", "internal", None)],
        before_nightly, state="running", memory="internal"))
    (snaps / "memory-only.xml").write_text(snapshot_xml(
        "memory-only", NIGHTLY_TIME + 20, [("vda", "no", None), ("vdb", "no", None)],
        before_nightly, state="running", memory="external"))
    (snaps / "web01.xml").write_text(domain.read_text())

    views = {"debian12": {"vda": template},
             "pre-upgrade": {"vda": vda, "vdb": vdb},
             "nightly": {"vda": pre["vda"]},
             "active": {"vda": nightly["vda"], "vdb": pre["vdb"]}}
    sources = [template, vda, vdb, pre["vda"], pre["vdb"], nightly["vda"]]
    return Built(domain, snaps, views, sources, shared=shared)
