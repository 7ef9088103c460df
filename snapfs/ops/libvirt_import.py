"""``snapfs vm add --libvirt``: a VM from the files that ``virsh dumpxml``
and ``virsh snapshot-dumpxml`` write.  No libvirtd is needed.

The domain XML (``<domain>``) gives the disks, in its order, each named by
its ``<target dev>``:

- ``<disk type='file' device='disk'>`` is a layered disk.  Its chain is
  read from the image headers (``discover_chain``), from ``<source file>``
  in the format ``<driver type>`` gives.  libvirt records backing files by
  absolute path: such a name is followed when it stays inside the top
  image's directory or names a file of the disk's ``<backingStore>`` chain,
  which may be absent or partial and otherwise only supplies a backing
  format an image does not record.
- ``<shareable/>`` on a file disk makes a shareable disk (its image is
  imported as one raw volume); ``<disk type='block'>`` is a direct LUN
  (``<source dev>``, a block device).
- CD-ROMs, floppies, network disks and the types that need libvirtd
  (storage pool volumes, NVMe, vhost-user) are skipped, each with a message.

Each snapshot XML (``<domainsnapshot>``, every ``*.xml`` of the snapshot
directory) names the overlays its creation made,
``<disks><disk name=.. snapshot='external'><source file=..>``.  Its state
is what they were created on, their backing files: the snapshot holds, for
each such disk, the layer that is the overlay's backing file, and no other
disk (``snapshot='no'``, or a disk added later).  It keeps its name, its
description (on one line) and its ``<creationTime>``; its consistency is
"offline" if it was taken shut off, else "crash" (libvirt does not record
a guest freeze).  Internal and memory-only snapshots are reported and
skipped (an image's own snapshot table is imported as ``vm add`` imports
it).  A layer that no snapshot XML names becomes a snapshot of its own
disk, named after its file as ``vm add`` names layers.  Snapshots come in
creation order (``<creationTime>``, then chain order), as far as the chains
allow.  Without a snapshot directory, the layers are named after their
files, as with ``--disk``.

Every XML file is untrusted input: it is parsed by defusedxml with no DTD,
entity or external reference allowed, and at most MAX_XML_BYTES are read.
Every error is one line naming the file and the element.  Everything is
checked before ``add_vm`` writes anything, and ``add_vm`` leaves nothing
behind if it fails.

Limitations: a snapshot whose overlay left the domain's current chain (a
branch after a revert) is refused; a shareable disk is always imported as a
new shared volume, never attached to one the store already has.
"""

import heapq
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ..errors import InvalidArgument, SnapfsError
from ..store.names import MAX_DESCRIPTION_BYTES, check_disk_name, check_snapshot_name
from .discover import discover_chain
from .disk_kinds import check_block_device
from .importer import (DiskSource, PlannedSnapshot, add_vm, created_at, describe_origin,
                       generated_name, unique_name)

# virsh writes a few KiB per domain or snapshot; a file past this is not one.
MAX_XML_BYTES = 16 << 20
IMAGE_FORMATS = ("raw", "qcow2")
LAYERED, LUN, SHAREABLE = "layered", "lun", "shareable"
# Disk types that need libvirtd or a remote server to reach their data.
SKIPPED_TYPES = {"network": "a network disk", "volume": "a storage pool volume",
                 "nvme": "an NVMe disk", "vhostuser": "a vhost-user disk",
                 "dir": "a directory"}
_CONTROL_RUN = re.compile(r"\s*[\x00-\x1f\x7f]+\s*")


class LibvirtError(InvalidArgument):
    """Bad libvirt XML, or a file it names that cannot be imported."""

    def __init__(self, path, element, reason):
        super().__init__(f"{path}: {element}: {reason}")


@dataclass
class DomainDisk:
    name: str              # <target dev>
    kind: str              # LAYERED, LUN or SHAREABLE
    path: str              # <source file> or <source dev>
    source: DiskSource | None = None    # a layered disk's chain


@dataclass
class Domain:
    path: str
    name: str | None
    uuid: str | None
    disks: list = field(default_factory=list)

    def disk(self, name):
        return next((d for d in self.disks if d.name == name), None)


@dataclass
class SnapshotXml:
    path: str
    name: str
    description: str
    created: str | None    # ISO-8601 UTC from <creationTime>
    consistency: str
    overlays: dict         # {disk: (overlay path, element)}


def import_domain(store, vm_name, domain_xml, snapshots_dir=None, move=False, progress=None,
                  report=print):
    """Add VM ``vm_name`` to ``store`` from the domain XML file ``domain_xml``
    and the snapshot XMLs in ``snapshots_dir`` (None: none).  ``report``
    gets one line for each thing skipped.  The caller holds the store lock.
    Returns the new Manifest.  Raises InvalidArgument (LibvirtError) for bad
    XML or files, and whatever ``add_vm`` raises."""
    domain = parse_domain(domain_xml, report)
    planned = None
    if snapshots_dir is not None:
        snapshots = read_snapshots(domain, snapshots_dir, report)
        planned = plan_snapshots(domain, snapshots, snapshots_dir, report)
    kinds = {kind: [d for d in domain.disks if d.kind == kind]
             for kind in (LAYERED, LUN, SHAREABLE)}
    return add_vm(store, vm_name, [d.source for d in kinds[LAYERED]], move=move,
                  progress=progress, luns=[f"{d.name}={d.path}" for d in kinds[LUN]],
                  shareables=[f"{d.name}={d.path}" for d in kinds[SHAREABLE]],
                  order=[d.name for d in domain.disks], planned=planned)


# -- XML ------------------------------------------------------------------------

def read_xml(path):
    """The root element of the XML file ``path``.  Raises InvalidArgument."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_XML_BYTES + 1)
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_XML_BYTES:
        raise InvalidArgument(f"{path}: larger than {MAX_XML_BYTES >> 20} MiB, "
                              "not a libvirt XML file")
    try:
        return fromstring(data, forbid_dtd=True)
    except ParseError as e:
        raise InvalidArgument(f"{path}: malformed XML: {e}") from None
    except DefusedXmlException as e:
        what = {"DTDForbidden": "a <!DOCTYPE>", "EntitiesForbidden": "an entity declaration",
                "ExternalReferenceForbidden": "an external reference"}.get(type(e).__name__,
                                                                            type(e).__name__)
        raise InvalidArgument(f"{path}: refused XML: {what} is not allowed (virsh writes "
                              "none; entities could expand without end or read other "
                              "files)") from None


def _text(element, path):
    """The stripped text of ``element``'s child at ``path``, or None."""
    child = element.find(path)
    return child.text.strip() if child is not None and child.text else None


def _tag(element, *attributes):
    """``<name a='x'>`` for messages."""
    shown = "".join(f" {a}={element.get(a)!r}" for a in attributes if element.get(a) is not None)
    return f"<{element.tag}{shown}>"


# -- the domain -----------------------------------------------------------------

def parse_domain(path, report):
    """The disks of the domain XML file ``path``, in its order."""
    path = os.path.abspath(path)
    root = read_xml(path)
    if root.tag != "domain":
        raise LibvirtError(path, f"<{root.tag}>", "not a domain XML (<domain>, as virsh "
                                                  "dumpxml writes)")
    domain = Domain(path, _text(root, "name"), _text(root, "uuid"))
    for element in root.findall("./devices/disk"):
        disk = _parse_disk(domain, element, report)
        if disk is None:
            continue
        if domain.disk(disk.name) is not None:
            raise LibvirtError(path, f"<target dev={disk.name!r}>", "two disks have this target")
        domain.disks.append(disk)
    if not domain.disks:
        raise LibvirtError(path, "<devices>", "no disk to import")
    return domain


def _parse_disk(domain, element, report):
    """A DomainDisk, or None (skipped, with a message)."""
    device = element.get("device", "disk")
    kind = element.get("type", "file")
    target = element.find("target")
    dev = target.get("dev") if target is not None else None
    where = _tag(element, "type", "device") + (f" with <target dev={dev!r}>" if dev else "")
    if device in ("cdrom", "floppy"):
        report(f"{domain.path}: skipped {where}: a {'CD-ROM' if device == 'cdrom' else 'floppy'}"
               " is not imported")
        return None
    if device not in ("disk", "lun"):
        report(f"{domain.path}: skipped {where}: device {device!r} is not imported")
        return None
    if kind in SKIPPED_TYPES:
        report(f"{domain.path}: skipped {where}: {SKIPPED_TYPES[kind]} is not imported "
               "(its data is not a local file)")
        return None
    if not dev:
        raise LibvirtError(domain.path, where, "has no <target dev>")
    try:
        check_disk_name(dev)
        if "=" in dev:
            raise InvalidArgument(f"invalid disk name {dev!r}: contains '='")
    except SnapfsError as e:
        raise LibvirtError(domain.path, where, str(e)) from None
    source = element.find("source")
    driver = element.find("driver")
    fmt = driver.get("type") if driver is not None else None
    if kind == "block":
        device_path = source.get("dev") if source is not None else None
        if not device_path:
            raise LibvirtError(domain.path, where, "has no <source dev>")
        if fmt not in (None, "raw"):
            raise LibvirtError(domain.path, where, f"<driver type={fmt!r}>: a block device is "
                                                   "imported as a direct LUN, which is raw")
        try:
            check_block_device(device_path, f"<source dev={device_path!r}>")
        except SnapfsError as e:
            raise LibvirtError(domain.path, where, str(e)) from None
        return DomainDisk(dev, LUN, device_path)
    if kind != "file":
        report(f"{domain.path}: skipped {where}: disk type {kind!r} is not imported")
        return None
    file = source.get("file") if source is not None else None
    if not file:
        raise LibvirtError(domain.path, where, "has no <source file>")
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise LibvirtError(domain.path, where, f"<driver type={fmt!r}>: only raw and qcow2 "
                                               "images are imported")
    file = os.path.abspath(file)
    if not os.path.lexists(file):
        raise LibvirtError(domain.path, where, f"<source file={file!r}>: no such file")
    try:
        if element.find("shareable") is not None:
            layers = discover_chain(file, fmt)
            if len(layers) != 1 or layers[0].internal_snapshots:
                raise InvalidArgument(f"{file}: a shareable disk must be one raw image, or a "
                                      "qcow2 image without backing file or internal snapshots")
            return DomainDisk(dev, SHAREABLE, file)
        layers = discover_chain(file, fmt, listed=_backing_store(element))
    except SnapfsError as e:
        raise LibvirtError(domain.path, where, str(e)) from None
    return DomainDisk(dev, LAYERED, file, DiskSource(dev, layers=layers))


def _backing_store(disk):
    """{real path: format or None} of the files of the disk's <backingStore>
    chain (libvirt lists it outermost first, nested)."""
    listed = {}
    node = disk.find("backingStore")
    while node is not None:
        source = node.find("source")
        if node.get("type", "file") == "file" and source is not None and source.get("file"):
            fmt = node.find("format")
            fmt = fmt.get("type") if fmt is not None else None
            listed[os.path.realpath(source.get("file"))] = fmt if fmt in IMAGE_FORMATS else None
        node = node.find("backingStore")
    return listed


# -- snapshot XMLs --------------------------------------------------------------

def read_snapshots(domain, directory, report):
    """The external snapshots of the snapshot XMLs in ``directory``."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".xml"))
    except OSError as e:
        raise InvalidArgument(f"{directory}: cannot list the snapshot XMLs: {e.strerror}") from None
    out = []
    for name in names:
        path = os.path.abspath(os.path.join(directory, name))
        if not os.path.isfile(path) or os.path.samefile(path, domain.path):
            continue
        root = read_xml(path)
        if root.tag != "domainsnapshot":
            report(f"{path}: skipped: <{root.tag}> is not a snapshot XML (<domainsnapshot>)")
            continue
        snap = _parse_snapshot(domain, path, root, report)
        if snap is not None:
            out.append(snap)
    if not names:
        report(f"{directory}: no snapshot XML (*.xml) found")
    return out


def _parse_snapshot(domain, path, root, report):
    """A SnapshotXml, or None for a snapshot that has no external disk."""
    name = _text(root, "name")
    if not name:
        raise LibvirtError(path, "<domainsnapshot>", "has no <name>")
    _check_same_domain(domain, path, root)
    memory = root.find("memory")
    memory = memory.get("snapshot", "no") if memory is not None else "no"
    overlays, internal = {}, []
    for disk in root.findall("./disks/disk"):
        dev, mode = disk.get("name"), disk.get("snapshot")
        where = f"<disk name={dev!r} snapshot={mode!r}>"
        if not dev:
            raise LibvirtError(path, _tag(disk, "snapshot"), "has no name")
        if mode == "internal":
            internal.append(dev)
        elif mode == "external":
            source = disk.find("source")
            file = source.get("file") if source is not None else None
            if disk.get("type", "file") != "file" or not file:
                raise LibvirtError(path, where, "an external snapshot's overlay must be a file "
                                                "(<source file>)")
            if dev in overlays:
                raise LibvirtError(path, where, f"disk {dev} is listed twice")
            overlays[dev] = (os.path.abspath(file), f"{where}<source file={file!r}>")
        elif mode not in ("no", "manual"):
            raise LibvirtError(path, where, f"unknown snapshot mode {mode!r}")
    if not overlays:
        why = ("an internal snapshot (its state is inside the images)"
               if internal or memory == "internal" else
               "a memory-only snapshot" if memory == "external" else "it holds no disk")
        report(f"{path}: skipped snapshot {name!r}: {why}")
        return None
    if internal:
        report(f"{path}: snapshot {name!r}: disks {', '.join(internal)} are internal "
               "snapshots, not imported with it")
    if memory != "no":
        report(f"{path}: snapshot {name!r}: its memory state (<memory snapshot={memory!r}>) "
               "is not imported")
    state = _text(root, "state")
    return SnapshotXml(path, name, _one_line(_text(root, "description") or "", path, report),
                       _creation_time(path, root), "offline" if state == "shutoff" else "crash",
                       overlays)


def _check_same_domain(domain, path, root):
    """A snapshot XML of another domain is refused (names and UUIDs compared
    where both files have them)."""
    inner = root.find("domain")
    if inner is None:
        return
    name, uid = _text(inner, "name"), _text(inner, "uuid")
    if name and domain.name and name != domain.name:
        raise LibvirtError(path, f"<domain><name>{name}</name>",
                           f"the snapshot is of domain {name!r}, not {domain.name!r} "
                           f"({domain.path})")
    if uid and domain.uuid and _uuid(uid) != _uuid(domain.uuid):
        raise LibvirtError(path, f"<domain><uuid>{uid}</uuid>",
                           f"the snapshot is of another domain than {domain.uuid} "
                           f"({domain.path})")


def _uuid(text):
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text


def _creation_time(path, root):
    text = _text(root, "creationTime")
    if text is None:
        return None
    try:
        when = datetime.fromtimestamp(int(text), timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise LibvirtError(path, f"<creationTime>{text[:40]}</creationTime>",
                           "not a time in seconds since 1970") from None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text, path, report):
    """A description as snapfs keeps it: one line (line breaks and other
    control characters become spaces), at most MAX_DESCRIPTION_BYTES."""
    line = _CONTROL_RUN.sub(" ", text).strip()
    data = line.encode("utf-8")
    if len(data) > MAX_DESCRIPTION_BYTES:
        line = data[:MAX_DESCRIPTION_BYTES - 3].decode("utf-8", "ignore") + "\u2026"
        report(f"{path}: <description> cut to {MAX_DESCRIPTION_BYTES} bytes")
    return line


# -- the plan -------------------------------------------------------------------

@dataclass
class _Group:
    """One snapshot of the plan: a snapshot XML's, or generated."""
    states: dict = field(default_factory=dict)    # {disk: history index}
    xml: SnapshotXml | None = None


def plan_snapshots(domain, snapshots, directory, report):
    """PlannedSnapshots for ``add_vm``, oldest first."""
    claims = _claims(domain, snapshots)
    groups, sequences = {}, {}
    for disk in domain.disks:
        if disk.kind != LAYERED:
            continue
        history, occurrences, keys = disk.source.history, {}, []
        for i in range(disk.source.snapshot_count):
            snap = claims.get((disk.name, i))
            if snap is not None:
                key = ("xml", snap.path)
            elif history[i].snapshot is not None:
                # An image's internal snapshot: virsh makes one of the same
                # name in every disk, imported as one snapshot.
                raw = history[i].snapshot.raw_name
                occurrences[raw] = occurrences.get(raw, 0) + 1
                key = ("internal", raw, occurrences[raw])
            else:
                key = ("layer", disk.name, i)
            group = groups.setdefault(key, _Group(xml=snap))
            group.states[disk.name] = i
            keys.append(key)
        sequences[disk.name] = keys
    ordered = _in_order(domain, groups, sequences, directory)
    return _named(domain, ordered, report)


def _claims(domain, snapshots):
    """{(disk, history index): SnapshotXml}: the layer that each overlay a
    snapshot XML names was created on."""
    claims = {}
    for snap in snapshots:
        for dev, (overlay, element) in snap.overlays.items():
            disk = domain.disk(dev)
            if disk is None:
                raise LibvirtError(snap.path, element, f"the domain ({domain.path}) has no "
                                                       f"imported disk {dev}")
            if disk.kind != LAYERED:
                raise LibvirtError(snap.path, element, f"disk {dev} is a {disk.kind} disk, "
                                                       "which has no layers")
            layers = disk.source.layers
            real = os.path.realpath(overlay)
            found = [j for j, layer in enumerate(layers) if os.path.realpath(layer.path) == real]
            if not found or found[0] == 0:
                chain = " <- ".join(os.path.basename(layer.path) for layer in layers)
                raise LibvirtError(snap.path, element,
                                   f"the overlay is not in the chain of disk {dev} ({chain}, "
                                   f"from {domain.path})")
            below = layers[found[0] - 1]
            index = next(i for i, st in enumerate(disk.source.history)
                         if st.layer is below and st.snapshot is None)
            other = claims.get((dev, index))
            if other is not None:
                raise LibvirtError(snap.path, element, f"{other.path} names the same overlay")
            claims[(dev, index)] = snap
    return claims


def _created(domain, group):
    first = next(d for d in domain.disks if d.name in group.states)
    if group.xml is not None and group.xml.created is not None:
        return group.xml.created
    return created_at(first.source.history[group.states[first.name]])


def _in_order(domain, groups, sequences, directory):
    """The groups in an order every disk's chain allows, by creation time,
    then chain position, where the chains leave a choice."""
    after = {key: set() for key in groups}
    waiting = dict.fromkeys(groups, 0)
    for keys in sequences.values():
        for a, b in zip(keys, keys[1:]):
            if b not in after[a]:
                after[a].add(b)
                waiting[b] += 1
    seen = list(groups)      # the order the disks met them: ties keep it
    priority = {key: (_created(domain, groups[key]), min(groups[key].states.values()),
                      seen.index(key)) for key in groups}
    ready = [(priority[k], k) for k in groups if waiting[k] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, key = heapq.heappop(ready)
        out.append(groups[key])
        for nxt in after[key]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (priority[nxt], nxt))
    if len(out) != len(groups):
        stuck = sorted(_label(domain, groups[k]) for k in groups if waiting[k])
        raise InvalidArgument(f"{directory}: snapshots {', '.join(stuck)} hold the disks' "
                              "layers in contradicting orders")
    return out


def _label(domain, group):
    """A group as messages name it: its snapshot XML, or its first layer."""
    if group.xml is not None:
        return f"{group.xml.name!r} ({os.path.basename(group.xml.path)})"
    first = next(d for d in domain.disks if d.name in group.states)
    state = first.source.history[group.states[first.name]]
    if state.snapshot is not None:
        return f"internal snapshot {state.snapshot.name!r} of {first.name}"
    return os.path.basename(state.layer.path)


def _named(domain, ordered, report):
    """PlannedSnapshots: a snapshot XML's name where snapfs takes it, else
    a generated one, unique."""
    taken, names = set(), {}
    for group in ordered:
        if group.xml is None:
            continue
        try:
            name = check_snapshot_name(group.xml.name)
        except SnapfsError as e:
            report(f"{group.xml.path}: <name>: {e}; a name is generated instead")
            continue
        if name in taken:
            other = next(g.xml.path for g in ordered if g.xml and g.xml.name == name)
            raise LibvirtError(group.xml.path, f"<name>{name}</name>",
                               f"{other} has the same snapshot name")
        taken.add(name)
        names[id(group)] = name
    out = []
    for group in ordered:
        first = next(d for d in domain.disks if d.name in group.states)
        states = {d.name: d.source.history[group.states[d.name]]
                  for d in domain.disks if d.name in group.states}
        index = group.states[first.name]
        name = names.get(id(group))
        if name is None:
            name = unique_name(generated_name(states[first.name], index), taken)
            taken.add(name)
        if group.xml is not None:
            description, consistency = group.xml.description, group.xml.consistency
        else:
            description, consistency = describe_origin(list(states.values())), "offline"
        out.append(PlannedSnapshot(name, description, _created(domain, group),
                                   dict(group.states), consistency))
    return out
