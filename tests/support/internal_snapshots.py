"""Images with internal snapshots (``qemu-img snapshot -c``), built with
QEMU's own tools, and QEMU's view of each snapshot: the oracle for
importing them.

An image is a list of steps: qemu-io operations (:class:`chains.Op`),
internal snapshots (:class:`Snap`) and resizes (:class:`Resize`).  A
history is one image or a backing chain of them, base first.

QEMU has two views of an internal snapshot, and they differ only when the
disk was resized after it: ``qemu-img convert -l`` reads the snapshot's
tables at the image's *current* virtual size, while ``qemu-img snapshot
-a`` (what ``virsh snapshot-revert`` does) restores the snapshot's own disk
size.  :func:`snapshot_views` returns both.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import strategies as st

from tests.support import qemu
from tests.support.chains import COMPRESSED, DISCARD, WRITE, ZERO, ZERO_UNMAP, Op, QcowOptions, _apply

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
# Small disks for each cluster size: a few clusters, and with 512 B and
# 4 KiB clusters more than one L2 table.
CLUSTER_SIZES = (512, 4 * KiB, 64 * KiB, 2 * MiB)
MAX_CLUSTERS = {512: 160, 4 * KiB: 96, 64 * KiB: 24, 2 * MiB: 3}
SNAPSHOT_NAMES = ("s1", "before upgrade", "nightly 2026-11-27", "ünïcode état", "x",
                  "with  two  spaces", "v2.0 rc1", "pre-merge")


@dataclass(frozen=True)
class Snap:
    """``qemu-img snapshot -c NAME``."""
    name: str


@dataclass(frozen=True)
class Resize:
    """``qemu-img resize [--shrink] IMAGE SIZE`` (v3 only: QEMU refuses to
    resize a v2 image that has snapshots)."""
    size: int


@dataclass
class ImageSpec:
    size: int
    options: QcowOptions
    steps: list = field(default_factory=list)

    @property
    def snapshot_names(self):
        return [s.name for s in self.steps if isinstance(s, Snap)]


@dataclass
class InternalSnapshot:
    """One entry of ``qemu-img info``'s snapshot list."""
    id: str
    name: str
    date_sec: int
    date_nsec: int

    @property
    def created(self):
        return datetime.fromtimestamp(self.date_sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_image(spec: ImageSpec, path: Path, backing: Path | None = None) -> Path:
    """Create ``path`` as ``spec`` says (over ``backing``, a qcow2 image in
    the same directory) and check it with qemu-img."""
    args = ["create", "-q", "-f", "qcow2", "-o", spec.options.create_options()]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    qemu.qemu_img(*args, path.name, str(spec.size), cwd=path.parent)
    ops: list[Op] = []
    for step in spec.steps + [None]:
        if isinstance(step, Op):
            ops.append(step)
            continue
        if ops:
            _apply(path, ops, "qcow2")
            ops = []
        if isinstance(step, Snap):
            qemu.qemu_img("snapshot", "-c", step.name, path)
        elif isinstance(step, Resize):
            qemu.qemu_img("resize", "-q", "--shrink", path, str(step.size))
    report = qemu.check(path)
    assert qemu.is_clean(report), f"qemu-img check of the fixture {path}: {report}"
    return path


def build_history(specs: list[ImageSpec], directory: Path) -> list[Path]:
    """The images of ``specs`` (base first) as ``layer0.qcow2``, ``layer1.qcow2``...,
    each backed by the one before."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, spec in enumerate(specs):
        paths.append(build_image(spec, directory / f"layer{i}.qcow2", paths[-1] if paths else None))
    return paths


def internal_snapshots(path) -> list[InternalSnapshot]:
    """The image's internal snapshots in table order, as qemu-img lists them."""
    out = json.loads(qemu.qemu_img("info", "--output=json", "-U", path))
    return [InternalSnapshot(s["id"], s["name"], s["date-sec"], s["date-nsec"])
            for s in out.get("snapshots", [])]


def in_history_order(snapshots):
    """Oldest first: by date, then table order (``sorted`` is stable)."""
    return sorted(snapshots, key=lambda s: (s.date_sec, s.date_nsec))


def snapshot_listing(path) -> str:
    """``qemu-img snapshot -l``: empty for an image without internal snapshots."""
    return qemu.qemu_img("snapshot", "-l", "-U", path)


def converted(path, snapshot_id: str) -> bytes:
    """``qemu-img convert -O raw -l snapshot.id=ID``: the snapshot's tables at
    the image's current virtual size."""
    with tempfile.TemporaryDirectory(prefix="snapfs-is-") as tmp:
        out = Path(tmp) / "view.raw"
        qemu.qemu_img("convert", "-O", "raw", "-l", f"snapshot.id={snapshot_id}", path, out)
        return out.read_bytes()


def reverted(path: Path, snapshot_id: str) -> bytes:
    """The disk after ``qemu-img snapshot -a ID`` of a copy of the image (the
    copy sits next to it, so that its backing name still resolves)."""
    copy = path.parent / f".revert-{snapshot_id}-{path.name}"
    shutil.copyfile(path, copy)
    try:
        qemu.qemu_img("snapshot", "-a", snapshot_id, copy)
        return qemu.to_raw(copy)
    finally:
        copy.unlink()


def snapshot_views(path: Path, snapshot_id: str) -> tuple[bytes, bytes]:
    """(reverted, converted) views of one internal snapshot."""
    return reverted(path, snapshot_id), converted(path, snapshot_id)


def set_snapshot_dates(path, dates: list[int]) -> None:
    """Rewrite the date (seconds, nanoseconds 0) of each internal snapshot, in
    table order: the only way to get a table whose order is not the dates'
    order.  A date is not covered by any checksum."""
    with open(path, "r+b") as f:
        head = f.read(72)
        nb, offset = struct.unpack(">IQ", head[60:72])
        assert nb == len(dates)
        pos = offset
        for date in dates:
            f.seek(pos)
            fixed = f.read(40)
            id_size, name_size = struct.unpack(">HH", fixed[12:16])
            extra = struct.unpack(">I", fixed[36:40])[0]
            f.seek(pos + 16)
            f.write(struct.pack(">II", date, 0))
            length = 40 + extra + id_size + name_size
            pos += length + (-length % 8)


def volume_bytes(path) -> bytes:
    """A store volume's view, as QEMU reads it (its backing names are the
    parents' bare file names, the formats are recorded)."""
    return qemu.to_raw(path, fmt="qcow2") if _is_qcow2(path) else qemu.to_raw(path, fmt="raw")


def _is_qcow2(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def allocated_bytes(path) -> int:
    """Bytes of data clusters the file itself holds (``qemu-img map`` of the
    image alone: its backing is not opened)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U",
                          f"json:{{\"driver\": \"qcow2\", \"backing\": null, "
                          f"\"file\": {{\"driver\": \"file\", \"filename\": \"{os.path.abspath(path)}\"}}}}"],
                         check=True, capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e.get("depth", 0) == 0
               and not e["zero"])


# --------------------------------------------------------------------------
# hypothesis strategies

@st.composite
def image_options(draw, cluster_size=None) -> QcowOptions:
    cs = cluster_size or draw(st.sampled_from(CLUSTER_SIZES))
    if draw(st.booleans()):
        return QcowOptions("0.10", cs)
    return QcowOptions("1.1", cs, extended_l2=cs >= 16 * KiB and draw(st.integers(0, 3)) == 0,
                       compression_type=draw(st.sampled_from(["zlib", "zstd"])))


def _disk_size(draw, cs: int) -> int:
    size = cs * draw(st.integers(1, MAX_CLUSTERS[cs]))
    if draw(st.integers(0, 3)) == 0:       # now and then not a whole number of clusters
        size += SECTOR * draw(st.integers(1, max(1, cs // SECTOR - 1)))
    return size


def _op(draw, size: int, cs: int, touched: set[int], patterns) -> Op:
    kind = draw(st.sampled_from((WRITE, WRITE, ZERO, ZERO_UNMAP, DISCARD, COMPRESSED)))
    clusters = -(-size // cs)
    if kind == COMPRESSED:
        # QEMU writes compressed clusters only where the image maps nothing
        # yet, a whole cluster at a time.
        clean = [c for c in range(clusters) if c not in touched]
        if clean:
            c = draw(st.sampled_from(clean))
            touched.add(c)
            return Op(COMPRESSED, c * cs, min(cs, size - c * cs), next(patterns))
        kind = WRITE
    grain = draw(st.sampled_from([SECTOR, cs])) if cs <= size else SECTOR
    offset = grain * draw(st.integers(0, size // grain - 1))
    length = min(size - offset, grain * draw(st.integers(1, max(1, 3 * cs // grain))))
    touched.update(range(offset // cs, -(-(offset + length) // cs)))
    return Op(kind, offset, length, next(patterns) if kind == WRITE else 0)


@st.composite
def image_specs(draw, names, min_snapshots=1, max_snapshots=5, options=None,
                resizes=True) -> ImageSpec:
    """Ops interleaved with ``min_snapshots``..``max_snapshots`` internal
    snapshots named from ``names`` (an iterator), and on v3 images now and
    then a resize."""
    options = options or draw(image_options())
    cs = options.cluster_size
    size = _disk_size(draw, cs)
    spec = ImageSpec(size, options)
    touched: set[int] = set()
    patterns = iter(range(1, 256))
    current = size
    for i in range(draw(st.integers(min_snapshots, max_snapshots)) + 1):
        if i:
            spec.steps.append(Snap(next(names)))
        for _ in range(draw(st.integers(0 if i else 1, 3))):
            spec.steps.append(_op(draw, current, cs, touched, patterns))
        if resizes and options.compat == "1.1" and draw(st.integers(0, 7)) == 0:
            # Clusters cut off by a shrink stay in ``touched``: compressed
            # writes then simply avoid them.
            current = _disk_size(draw, cs)
            spec.steps.append(Resize(current))
    return spec


@st.composite
def histories(draw) -> list[ImageSpec]:
    """One image with 1-5 internal snapshots, or a base (0-2 internal
    snapshots of its own) and an overlay with 1-5.  Names are unique."""
    pool = list(SNAPSHOT_NAMES) + [f"snap {i}" for i in range(20)]
    names = iter(draw(st.permutations(pool)))
    layers = []
    if draw(st.booleans()):
        layers.append(draw(image_specs(names, min_snapshots=0, max_snapshots=2)))
    layers.append(draw(image_specs(names)))
    return layers
