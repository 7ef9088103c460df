"""New qcow2 images and backing references: the metadata the store writes
outside of guest writes.  Both functions produce images that
``qemu-img check`` reports clean."""

import os
import struct

from ..errors import CorruptImage, InvalidArgument
from . import structs as S
from .header import read_header

DEFAULT_CLUSTER_BITS = 16
HEADER_LENGTH = 112  # v3 header with the compression type byte, padded
# A new image is its owner's only, as libvirt makes its images: it holds a
# guest's disk.  Set with fchmod too, since the umask applies at creation.
IMAGE_MODE = 0o600


def _ext(ext_type, data):
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)


def _header_tail(backing, backing_format, extensions=()):
    """Extensions, end marker and backing name that follow the header."""
    tail = b"".join(_ext(t, d) for t, d in extensions)
    if backing:
        tail += _ext(S.EXT_BACKING_FORMAT, backing_format.encode())
    tail += _ext(S.EXT_END, b"")
    return tail


def create_image(path, size, backing=None, backing_format=None,
                 cluster_bits=DEFAULT_CLUSTER_BITS):
    """Create an empty v3 qcow2 image of ``size`` bytes at ``path``, fsynced.

    The file must not exist; it is made mode 0600 whatever the umask.
    Layout: header, refcount table, one refcount block, L1 table.
    """
    if backing and backing_format not in ("raw", "qcow2"):
        raise InvalidArgument(f"backing format must be raw or qcow2, not {backing_format!r}")
    cs = 1 << cluster_bits
    size = -(-size // 512) * 512
    l1_size = -(-size // (cs * (cs // 8)))
    l1_clusters = max(1, -(-(l1_size * 8) // cs))
    total = 3 + l1_clusters
    if total > cs // 2:
        raise InvalidArgument(f"disk size {size} is too large for one refcount block")
    name = backing.encode() if backing else b""
    tail = _header_tail(backing, backing_format)
    backing_offset = HEADER_LENGTH + len(tail) if backing else 0
    if HEADER_LENGTH + len(tail) + len(name) > cs:
        raise InvalidArgument("backing name does not fit in the header cluster")
    header = S.HeaderV2.build(dict(
        version=3, backing_file_offset=backing_offset,
        backing_file_size=len(name), cluster_bits=cluster_bits, size=size,
        crypt_method=0, l1_size=l1_size, l1_table_offset=3 * cs,
        refcount_table_offset=cs, refcount_table_clusters=1,
        nb_snapshots=0, snapshots_offset=0,
    )) + S.HeaderV3Tail.build(dict(
        incompatible_features=0, compatible_features=0, autoclear_features=0,
        refcount_order=4, header_length=HEADER_LENGTH,
    )) + bytes(HEADER_LENGTH - 104)
    reftable = struct.pack(">Q", 2 * cs)
    refblock = struct.pack(f">{total}H", *([1] * total))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
    try:
        os.fchmod(fd, IMAGE_MODE)
        os.ftruncate(fd, total * cs)
        os.pwrite(fd, header + tail + name, 0)
        os.pwrite(fd, reftable, cs)
        os.pwrite(fd, refblock, 2 * cs)
        os.fsync(fd)
    finally:
        os.close(fd)


def set_backing(path, backing, backing_format):
    """Point the image at ``path`` to ``backing`` (a bare name) of the given format.

    One write of the header cluster's prefix, then fsync.  Unknown header
    extensions are kept; the feature name table, which is informational
    only, is dropped if the new name would not fit otherwise.  Raises
    CorruptImage for an image marked corrupt (it may be read, never written).
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        hdr = read_header(fd, path)
        if hdr.corrupt:
            raise CorruptImage(path, "image is marked corrupt; it will not be written "
                                     "(repair it with qemu-img check -r all)")
        cs = hdr.cluster_size
        head = bytearray(os.pread(fd, hdr.header_length, 0))
        kept = [(t, d) for t, d in hdr.extensions if t != S.EXT_BACKING_FORMAT]
        name = backing.encode() if backing else b""
        tail = _header_tail(backing, backing_format, kept)
        if hdr.header_length + len(tail) + len(name) > cs:
            kept = [(t, d) for t, d in kept if t != S.EXT_FEATURE_NAMES]
            tail = _header_tail(backing, backing_format, kept)
        if hdr.header_length + len(tail) + len(name) > cs:
            raise CorruptImage(path, "backing name does not fit in the header cluster")
        offset = hdr.header_length + len(tail) if backing else 0
        struct.pack_into(">QI", head, 8, offset, len(name))
        os.pwrite(fd, bytes(head) + tail + name, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
