"""ext2, ext3 and ext4, read with ``dissect.extfs``.

dissect parses the superblock, group descriptors, inodes, directory
blocks, extent trees and extended attributes; this module turns its
answers into ``Stat``, names as bytes and byte runs of the view.  Where
dissect's own helpers fall short of what the kernel shows it maps the
extents itself: unwritten (fallocated) extents after a hole, extents past
the end of the file, and inline data longer than the inode's 60 bytes.

A filesystem whose superblock asks for journal recovery (a crash-
consistent snapshot) is read through ``jbd2.replay_journal``: the
committed transactions are applied in memory, as a mount would apply
them, and the view itself is never changed.
"""

from __future__ import annotations

import os
import stat
import struct

from dissect.extfs import ExtFS
from dissect.extfs.c_ext import c_ext
from dissect.extfs.extfs import _parse_extents

from .base import FsDamaged, GuestFs, ReaderFile, Stat, Unsupported
from .jbd2 import replay_journal

SUPERBLOCK = 1024
MAGIC = b"\x53\xef"
INCOMPAT_RECOVER = 0x4
FAST_SYMLINK_MAX = 60           # bytes of i_block
UNWRITTEN = 0x8000              # ee_len above this: an unwritten extent
# The types a directory entry's file_type field names (EXT2_FT_*).
ENTRY_TYPES = {1: stat.S_IFREG, 2: stat.S_IFDIR, 3: stat.S_IFCHR, 4: stat.S_IFBLK,
               5: stat.S_IFIFO, 6: stat.S_IFSOCK, 7: stat.S_IFLNK}


def is_ext(read) -> bool:
    sb = read(SUPERBLOCK, 64)
    return len(sb) == 64 and sb[0x38:0x3A] == MAGIC


def needs_recovery(read) -> bool:
    sb = read(SUPERBLOCK, 0x64)
    return len(sb) == 0x64 and bool(struct.unpack_from("<I", sb, 0x60)[0] & INCOMPAT_RECOVER)


class ExtGuestFs(GuestFs):
    root = 2

    def __init__(self, read, size):
        #: "replayed" when a journal was applied in memory; None if clean.
        self.recovered = None
        if needs_recovery(read):
            read, self.recovered = replay_journal(read, size), "replayed"
        super().__init__(read, size)
        try:
            self.fs = ExtFS(ReaderFile(self.reader, size))
        except NotImplementedError as e:
            raise Unsupported(f"ext: {e}") from None
        except Exception as e:
            raise FsDamaged(f"ext: the superblock cannot be read: {e}") from None
        sb = self.fs.sb
        self.kind = {3: "ext2", 2: "ext3", 1: "ext4"}.get(self.fs.type, "ext4")
        self.block_size = self.fs.block_size
        self.inode_size = sb.s_inode_size or 128
        self.inodes_count = sb.s_inodes_count

    def _inode(self, ino):
        if not 1 <= ino <= self.inodes_count:
            raise FsDamaged(f"ext: inode number {ino} out of range")
        return self.fs.get_inode(ino)

    def _stat(self, ino):
        node = self._inode(ino)
        raw = node.inode
        mode = raw.i_mode
        rdev = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = _device(raw.i_block)
        return Stat(ino=ino, mode=mode, nlink=raw.i_links_count,
                    uid=raw.i_uid | raw.i_uid_high << 16, gid=raw.i_gid | raw.i_gid_high << 16,
                    size=node.size, atime_ns=node.atime_ns, mtime_ns=node.mtime_ns,
                    ctime_ns=node.ctime_ns, rdev=rdev, generation=raw.i_generation)

    def _listdir(self, ino):
        node = self._inode(ino)
        if not stat.S_ISDIR(node.inode.i_mode):
            raise FsDamaged(f"ext: inode {ino} is not a directory")
        entries = []
        for child in node.iterdir():
            name = child.filename.encode(errors="surrogateescape")
            if name in (b".", b"..") or not name or b"/" in name:
                continue
            entries.append((name, child.inum, child._filetype or 0))
            if len(entries) > 100_000:
                break       # the caller refuses it; stop reading
        return entries

    def _readlink(self, ino):
        node = self._inode(ino)
        if not stat.S_ISLNK(node.inode.i_mode):
            raise FsDamaged(f"ext: inode {ino} is not a symlink")
        if node.size > 4096:
            raise FsDamaged(f"ext: symlink {ino} is {node.size} bytes long")
        inline = self._inline_data(ino)
        if inline is not None:
            return inline
        return self.read_file(self._runs(ino), 0, node.size)

    def _xattrs(self, ino):
        node = self._inode(ino)
        return {x.name.encode(errors="surrogateescape"): bytes(x.value) for x in node.xattr
                if x.name != "system.data"}

    def _inline_data(self, ino):
        node = self._inode(ino)
        raw = node.inode
        if raw.i_flags & c_ext.EXT4_INLINE_DATA_FL:
            data = bytes(raw.i_block)
            if node.size > len(data):
                # The rest is the "system.data" attribute's value.
                more = next((x.value for x in node.xattr if x.name == "system.data"), b"")
                data += bytes(more)
            if len(data) < node.size:
                raise FsDamaged(f"ext: inode {ino} has {len(data)} bytes of inline data, "
                                f"not {node.size}")
            return data[:node.size]
        if stat.S_ISLNK(raw.i_mode) and node.size < FAST_SYMLINK_MAX:
            # A fast symlink: no blocks but its attribute block's (as the
            # kernel's ext4_inode_is_fast_symlink).
            acl = raw.i_file_acl_lo | raw.i_file_acl_high << 32
            if raw.i_blocks_lo - (self.block_size >> 9 if acl else 0) == 0:
                return bytes(raw.i_block)[:node.size]
        if stat.S_ISCHR(raw.i_mode) or stat.S_ISBLK(raw.i_mode) or stat.S_ISFIFO(raw.i_mode) \
                or stat.S_ISSOCK(raw.i_mode):
            return b""
        return None

    def _runs(self, ino):
        node = self._inode(ino)
        if self._inline_data(ino) is not None:
            return None
        size, bs = node.size, self.block_size
        if node.inode.i_flags & c_ext.EXT4_EXTENTS_FL:
            blocks = self._extent_runs(node)
        else:
            blocks = node.dataruns()
        runs, pos = [], 0
        for start, count in blocks:
            if pos >= size:
                break
            length = min(count * bs, size - pos)
            runs.append((None if start is None else start * bs, length))
            pos += length
        if pos < size:
            runs.append((None, size - pos))     # a hole at the end
        return _merged(runs)

    def _extent_runs(self, node):
        """[(block or None, count)] from the extent tree, in file order."""
        out, at = [], 0
        extents = sorted(_parse_extents(node, _BytesFile(bytes(node.inode.i_block))),
                         key=lambda e: e.ee_block)
        for extent in extents:
            if extent.ee_block < at:
                raise FsDamaged(f"ext: inode {node.inum} has overlapping extents")
            if extent.ee_block > at:
                out.append((None, extent.ee_block - at))
            count = extent.ee_len
            start = extent.ee_start_hi << 32 | extent.ee_start_lo
            if count > UNWRITTEN:
                count -= UNWRITTEN
                start = None        # allocated, never written: reads as zeros
            out.append((start, count))
            at = extent.ee_block + count
        return out

    def _metadata_ranges(self, ino):
        node = self._inode(ino)
        group, index = divmod(ino - 1, self.fs.sb.s_inodes_per_group)
        desc = self.fs._read_group_desc(group)
        table = desc.bg_inode_table_lo
        if self.fs._group_desc_struct == c_ext.ext4_group_desc:
            table |= desc.bg_inode_table_hi << 32
        ranges = [(table * self.block_size + index * self.inode_size, self.inode_size)]
        acl = node.inode.i_file_acl_lo | node.inode.i_file_acl_high << 32
        if acl:
            ranges.append((acl * self.block_size, self.block_size))
        return ranges


def _device(i_block):
    """The device number of a device inode, old or new encoding (as the
    kernel's ext4_set_inode_flags/old_decode_dev/new_decode_dev)."""
    old, new = struct.unpack_from("<II", bytes(i_block))
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def _merged(runs):
    out = []
    for start, length in runs:
        if out and length:
            prev_start, prev_len = out[-1]
            if (start is None and prev_start is None) or (
                    start is not None and prev_start is not None and prev_start + prev_len == start):
                out[-1] = (prev_start, prev_len + length)
                continue
        if length:
            out.append((start, length))
    return out


class _BytesFile(ReaderFile):
    def __init__(self, data):
        super().__init__(lambda off, n: data[off:off + n], len(data))
