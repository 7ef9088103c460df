"""Random qcow2 backing chains, built with QEMU's own tools.

:func:`chain_specs` is a hypothesis strategy of :class:`ChainSpec`;
:func:`build_chain` turns a spec into real image files with ``qemu-img`` and
``qemu-io``; :func:`expected_views` asks ``qemu-img convert`` what each layer
of the chain looks like as a raw disk, which is the oracle for snapfs.

Format settings live on :class:`ChainSpec` as chain-wide defaults; any layer
may override them with its own :class:`QcowOptions` (so one chain can mix
cluster sizes, compat levels, refcount widths, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from tests.support import qemu

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
MIN_LAYER_SIZE = 64 * KiB
MAX_LAYER_SIZE = 8 * MiB
MAX_OP_LENGTH = 1 * MiB          # pattern/zero/discard ops (at least one cluster)
MAX_COMPRESSED_CLUSTERS = 4
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
CLUSTER_SIZES = tuple(1 << n for n in range(9, 22))   # 512 B .. 2 MiB

# Op kinds and the qemu-io command each one becomes.
WRITE, ZERO, ZERO_UNMAP, DISCARD, COMPRESSED = (
    "write", "zero", "zero_unmap", "discard", "compressed")
RAW_OP_KINDS = (WRITE, ZERO)
QCOW2_OP_KINDS = (WRITE, ZERO, ZERO_UNMAP, DISCARD, COMPRESSED)


@dataclass(frozen=True)
class Op:
    """One qemu-io operation; *offset*/*length* in bytes, multiples of 512."""

    kind: str
    offset: int
    length: int
    pattern: int = 0            # fill byte, for WRITE and COMPRESSED

    def command(self) -> str:
        """The qemu-io ``-c`` command string for this op."""
        span = f"{self.offset} {self.length}"
        return {
            WRITE: f"write -q -P {self.pattern} {span}",
            ZERO: f"write -q -z {span}",
            ZERO_UNMAP: f"write -q -z -u {span}",
            DISCARD: f"discard -q {span}",
            COMPRESSED: f"write -q -c -P {self.pattern} {span}",
        }[self.kind]


@dataclass(frozen=True)
class QcowOptions:
    """The ``qemu-img create -o`` settings of one qcow2 layer."""

    compat: str = "1.1"                 # "0.10" (v2) or "1.1" (v3)
    cluster_size: int = 64 * KiB
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"      # "zlib" or "zstd"

    def validate(self) -> None:
        """Raise ValueError for combinations qemu-img would refuse."""
        v2 = self.compat == "0.10"
        for bad, why in [
            (self.compat not in ("0.10", "1.1"), "compat is 0.10 or 1.1"),
            (self.cluster_size not in CLUSTER_SIZES, "cluster_size is 2**9 .. 2**21"),
            (self.refcount_bits not in REFCOUNT_BITS, "refcount_bits is 2**0 .. 2**6"),
            (self.compression_type not in ("zlib", "zstd"), "zlib or zstd"),
            (v2 and self.refcount_bits != 16, "compat 0.10 needs refcount_bits=16"),
            (v2 and self.extended_l2, "compat 0.10 has no extended L2"),
            (v2 and self.compression_type != "zlib", "compat 0.10 needs zlib"),
            (self.extended_l2 and self.cluster_size < 16 * KiB,
             "extended_l2 needs cluster_size >= 16 KiB"),
        ]:
            if bad:
                raise ValueError(f"{self}: {why}")

    def create_options(self) -> str:
        """The ``-o`` argument for ``qemu-img create``."""
        return (f"compat={self.compat},cluster_size={self.cluster_size},"
                f"refcount_bits={self.refcount_bits},"
                f"extended_l2={'on' if self.extended_l2 else 'off'},"
                f"compression_type={self.compression_type}")


@dataclass
class LayerSpec:
    """One layer: its size, the ops applied to it, and an optional snapshot.

    ``snapshot_after=k`` takes an internal snapshot (``qemu-img snapshot -c``)
    after the first *k* ops; the remaining ops are applied afterwards.
    ``options=None`` means "use the chain-wide defaults".
    """

    virtual_size: int
    ops: list[Op] = field(default_factory=list)
    snapshot_after: int | None = None
    options: QcowOptions | None = None


@dataclass
class ChainSpec:
    """A whole chain, bottom layer first, plus chain-wide qcow2 defaults."""

    layers: list[LayerSpec]
    raw_base: bool = False              # layer 0 is a raw file
    compat: str = "1.1"
    cluster_size: int = 64 * KiB
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"

    @property
    def defaults(self) -> QcowOptions:
        return QcowOptions(self.compat, self.cluster_size, self.refcount_bits,
                           self.extended_l2, self.compression_type)

    def is_raw(self, index: int) -> bool:
        return index == 0 and self.raw_base

    def options_for(self, index: int) -> QcowOptions:
        """Effective qcow2 options of layer *index* (meaningless for a raw base)."""
        return self.layers[index].options or self.defaults

    def validate(self) -> None:
        """Raise ValueError if the spec cannot be built as described."""
        if not 1 <= len(self.layers) <= 4:
            raise ValueError("a chain has 1..4 layers")
        for i, layer in enumerate(self.layers):
            if layer.virtual_size % SECTOR or layer.virtual_size <= 0:
                raise ValueError(f"layer {i}: size must be a positive multiple of 512")
            if not self.is_raw(i):
                self.options_for(i).validate()
            elif layer.snapshot_after is not None:
                raise ValueError("a raw layer cannot hold a snapshot")
            if layer.snapshot_after is not None and not _snapshot_fits(
                    self.options_for(i), layer.ops[:layer.snapshot_after]):
                raise ValueError(f"layer {i}: refcount_bits too small for a snapshot")
            cluster = self.options_for(i).cluster_size
            for op in layer.ops:
                end = op.offset + op.length
                if op.offset % SECTOR or op.length % SECTOR or op.length <= 0 \
                        or end > layer.virtual_size:
                    raise ValueError(f"layer {i}: bad op span {op}")
                if op.kind == COMPRESSED and (op.offset % cluster or (
                        op.length % cluster and end != layer.virtual_size)):
                    raise ValueError(f"layer {i}: misaligned compressed write {op}")


@dataclass
class BuiltChain:
    """Image files of a built chain, bottom first (``layers[-1]`` is the top)."""

    spec: ChainSpec
    directory: Path
    layers: list[Path]
    formats: list[str]                  # "raw" or "qcow2", parallel to layers

    @property
    def top(self) -> Path:
        return self.layers[-1]


# --------------------------------------------------------------------------
# hypothesis strategies

@st.composite
def qcow_options(draw) -> QcowOptions:
    """Any valid combination of qcow2 creation options."""
    cluster_size = draw(st.sampled_from(CLUSTER_SIZES))
    if draw(st.sampled_from(["0.10", "1.1"])) == "0.10":
        return QcowOptions("0.10", cluster_size)
    return QcowOptions(
        "1.1", cluster_size,
        refcount_bits=draw(st.sampled_from(REFCOUNT_BITS)),
        extended_l2=cluster_size >= 16 * KiB and draw(st.booleans()),
        compression_type=draw(st.sampled_from(["zlib", "zstd"])))


def _snapshot_fits(options: QcowOptions, ops_before: list[Op]) -> bool:
    """Whether ``qemu-img snapshot -c`` can double every refcount in the layer.

    One compressed write packs up to MAX_COMPRESSED_CLUSTERS compressed
    clusters into a host cluster (refcount <= 4, 8 after the snapshot), so
    2-bit refcounts (max 3) only fit when no compressed write came before.
    """
    if options.refcount_bits == 2:
        return not any(op.kind == COMPRESSED for op in ops_before)
    return options.refcount_bits >= 4


def _layer_size(draw, parent_size: int | None) -> int:
    """64 KiB .. 8 MiB in sectors; small sizes likelier; sometimes = parent."""
    if parent_size is not None and draw(st.booleans()):
        return parent_size
    lo = MIN_LAYER_SIZE // SECTOR
    return SECTOR * draw(st.one_of(st.integers(lo, lo * 8),
                                   st.integers(lo, MAX_LAYER_SIZE // SECTOR)))


def _span(draw, size: int, cluster: int) -> tuple[int, int]:
    """An (offset, length) inside *size*, sector- or sometimes cluster-aligned."""
    grain = draw(st.sampled_from([SECTOR, cluster])) if cluster <= size else SECTOR
    offset = grain * draw(st.integers(0, size // grain - 1))
    room = size - offset
    if draw(st.integers(0, 4)) == 0:          # now and then: run to the end
        return offset, room
    limit = max(grain, min(room, MAX_OP_LENGTH)) // grain
    return offset, grain * draw(st.integers(1, limit))


def _compressed_span(draw, size: int, cluster: int,
                     touched: set[int]) -> tuple[int, int] | None:
    """A run of clusters untouched so far in this layer, or None if none left.

    qemu refuses compressed writes over clusters that already have a host
    offset, so compressed writes only go where no earlier op in the layer went.
    """
    count = -(-size // cluster)
    clean = [c for c in range(count) if c not in touched]
    if not clean:
        return None
    start = draw(st.sampled_from(clean))
    run = 1
    while run < MAX_COMPRESSED_CLUSTERS and start + run < count \
            and start + run not in touched:
        run += 1
    n = draw(st.integers(1, run))
    offset = start * cluster
    return offset, min((start + n) * cluster, size) - offset


def _ops(draw, size: int, cluster: int, kinds: tuple[str, ...],
         min_ops: int) -> list[Op]:
    touched: set[int] = set()
    ops = []
    for _ in range(draw(st.integers(min_ops, 8))):
        kind = draw(st.sampled_from(kinds))
        span = _compressed_span(draw, size, cluster, touched) \
            if kind == COMPRESSED else None
        if span is None:
            kind = WRITE if kind == COMPRESSED else kind
            span = _span(draw, size, cluster)
        offset, length = span
        pattern = draw(st.integers(1, 255)) if kind in (WRITE, COMPRESSED) else 0
        ops.append(Op(kind, offset, length, pattern))
        touched.update(range(offset // cluster, -(-(offset + length) // cluster)))
    return ops


@st.composite
def chain_specs(draw, max_layers: int = 4) -> ChainSpec:
    """Strategy: random but always buildable :class:`ChainSpec` values."""
    defaults = draw(qcow_options())
    n_layers = draw(st.integers(1, max_layers))
    raw_base = draw(st.booleans())
    snapshot_layer = draw(st.none() | st.integers(0, n_layers - 1))
    layers: list[LayerSpec] = []
    for i in range(n_layers):
        size = _layer_size(draw, layers[-1].virtual_size if layers else None)
        if i == 0 and raw_base:
            ops = _ops(draw, size, SECTOR, RAW_OP_KINDS, 0)
            layers.append(LayerSpec(size, ops))
            continue
        options = draw(st.none() | qcow_options())
        effective = options or defaults
        snapshot = i == snapshot_layer and effective.refcount_bits >= 2
        ops = _ops(draw, size, effective.cluster_size, QCOW2_OP_KINDS,
                   2 if snapshot else 0)
        after = draw(st.integers(1, len(ops) - 1)) if snapshot else None
        if after is not None and not _snapshot_fits(effective, ops[:after]):
            after = None
        layers.append(LayerSpec(size, ops, after, options))
    return ChainSpec(layers, raw_base, defaults.compat, defaults.cluster_size,
                     defaults.refcount_bits, defaults.extended_l2,
                     defaults.compression_type)


# --------------------------------------------------------------------------
# building

def _sessions(ops: list[Op]) -> list[list[Op]]:
    """Split *ops* so that every compressed write starts a fresh qemu-io process.

    Works around a QEMU 7.2 bug: qcow2 remembers a partly used "compressed
    bytes" host cluster per open image; if that cluster is freed (its
    compressed guest cluster overwritten) and reused for data or metadata, a
    later compressed write in the same session packs into it and corrupts the
    image.  A new process starts with no remembered cluster.
    """
    sessions: list[list[Op]] = []
    for op in ops:
        if not sessions or op.kind == COMPRESSED:
            sessions.append([])
        sessions[-1].append(op)
    return sessions


def _apply(path: Path, ops: list[Op], fmt: str) -> None:
    for session in _sessions(ops):
        qemu.qemu_io(path, *(op.command() for op in session), fmt=fmt)


def build_chain(spec: ChainSpec, directory: str | os.PathLike[str]) -> BuiltChain:
    """Create the images of *spec* in *directory* and check them with qemu-img.

    Files are ``layer0.raw`` (raw base) or ``layerN.qcow2``; each overlay names
    its parent by bare relative file name.
    """
    spec.validate()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers: list[Path] = []
    formats: list[str] = []
    for i, layer in enumerate(spec.layers):
        if spec.is_raw(i):
            path, fmt = directory / "layer0.raw", "raw"
            with open(path, "wb") as f:
                f.truncate(layer.virtual_size)
        else:
            path, fmt = directory / f"layer{i}.qcow2", "qcow2"
            args = ["create", "-q", "-f", "qcow2",
                    "-o", spec.options_for(i).create_options()]
            if layers:
                args += ["-b", layers[-1].name, "-F", formats[-1]]
            qemu.qemu_img(*args, path.name, str(layer.virtual_size), cwd=directory)
        split = len(layer.ops) if layer.snapshot_after is None else layer.snapshot_after
        _apply(path, layer.ops[:split], fmt)
        if layer.snapshot_after is not None:
            qemu.qemu_img("snapshot", "-c", f"snap{i}", path)
            _apply(path, layer.ops[split:], fmt)
        layers.append(path)
        formats.append(fmt)

    for path, fmt in zip(layers, formats):
        if fmt == "qcow2":
            report = qemu.check(path)
            if not qemu.is_clean(report):
                raise AssertionError(f"qemu-img check not clean for {path}: {report}")
    chain = qemu.info_chain(layers[-1])
    if len(chain) != len(layers):
        raise AssertionError(f"backing chain of {layers[-1]} is {chain}")
    return BuiltChain(spec, directory, layers, formats)


def expected_views(built: BuiltChain) -> list[bytes]:
    """Raw guest content of the chain as seen from each layer, bottom first."""
    return [qemu.to_raw(path, fmt=fmt) for path, fmt in zip(built.layers, built.formats)]
