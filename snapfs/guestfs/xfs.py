"""XFS (v4 and v5), read with ``dissect.xfs``.

dissect parses the superblock, allocation groups, inodes, short-form
directories, extent lists and extent B+trees; this module turns its
answers into ``Stat``, names as bytes and byte runs of the view.  Where
dissect falls short it does the mapping itself:

- extents: unwritten (preallocated) extents read as zeros, extents past
  the end of the file are cut off, block numbers are translated from
  XFS's (AG number, block in AG) form;
- block, leaf, node and B+tree directories: dissect reads one filesystem
  block at a time, which loses entries when the directory block is larger
  (mkfs -n size=...); the data blocks are walked here, by the directory
  block size, from the extent map;
- timestamps before 1970 (the legacy format's seconds are signed).

Extended attributes are not shown: dissect.xfs does not parse them.

A filesystem whose log does not end with an unmount record (a copy of a
mounted XFS, a crash-consistent snapshot) is refused: a mount would
replay the log first, and snapfs does not.
"""

from __future__ import annotations

import os
import stat
import struct

from dissect.xfs import XFS
from dissect.xfs.c_xfs import FILETYPES, c_xfs

from .base import MAX_RUNS, FsDamaged, GuestFs, ReaderFile, Stat, Unsupported
from .xfs_log import log_is_clean

MAGIC = b"XFSB"
FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 0, 1, 2, 3
DIFLAG_REALTIME = 0x1
# Directory data lives below this byte offset of the directory "file";
# the leaf and free-index blocks above it hold no names.
DIR2_LEAF_OFFSET = 32 << 30
DATA_MAGICS = {b"XD2B", b"XD2D", b"XDB3", b"XDD3"}
BLOCK_MAGICS = {b"XD2B", b"XDB3"}   # single-block directories: leaf and tail at the end
FREE_TAG = 0xFFFF
BTREE_MAXLEVELS = 9                 # XFS_BTREE_MAXLEVELS


def is_xfs(read) -> bool:
    return read(0, 4) == MAGIC


class XfsGuestFs(GuestFs):
    kind = "xfs"
    exact_metadata_ranges = True    # the record, and a B+tree map's blocks

    def __init__(self, read, size):
        super().__init__(read, size)
        try:
            self.fs = XFS(ReaderFile(self.reader, size))
        except Exception as e:
            raise FsDamaged(f"xfs: the superblock cannot be read: {e}") from None
        sb = self.fs.sb
        self.block_size = self.fs.block_size
        self.inode_size = sb.sb_inodesize
        self.dir_block_size = self.block_size << sb.sb_dirblklog
        self.agblklog, self.agblocks = sb.sb_agblklog, sb.sb_agblocks
        self.root = sb.sb_rootino
        if sb.sb_logstart == 0:
            raise Unsupported("XFS: the log is on another device, so whether the "
                              "filesystem is consistent cannot be told")
        try:
            clean, why = log_is_clean(self.reader, self._byte(sb.sb_logstart),
                                      sb.sb_logblocks * self.block_size // 512)
        except Exception as e:
            clean, why = False, f"the log cannot be read ({e})"
        if not clean:
            raise Unsupported(f"XFS: the log needs recovery, which snapfs does not replay; "
                              f"{why} (the filesystem was not unmounted cleanly, as in a "
                              f"snapshot of a running guest)")

    def _byte(self, fsblock):
        """The view's byte offset of an XFS block number (AG number in
        the high bits, block within the AG in the low agblklog bits)."""
        ag, block = fsblock >> self.agblklog, fsblock & ((1 << self.agblklog) - 1)
        return (ag * self.agblocks + block) * self.block_size

    def _inode(self, ino):
        if ino <= 0:
            raise FsDamaged(f"xfs: inode number {ino} out of range")
        node = self.fs.get_inode(ino)
        node.inode          # reads it, checks its magic
        return node

    def _stat(self, ino):
        node = self._inode(ino)
        raw = node.inode
        mode = raw.di_mode
        rdev = 0
        if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and raw.di_format == FMT_DEV:
            # xfs_dev_t: 14 bits of major over 18 of minor (sysv encoding).
            dev = struct.unpack(">I", node.datafork().read(4))[0]
            rdev = os.makedev(dev >> 18, dev & 0x3FFFF)
        bigtime = node._has_bigtime()
        nlink = raw.di_nlink if raw.di_version > 1 else raw.di_onlink
        return Stat(ino=ino, mode=mode, nlink=nlink, uid=raw.di_uid, gid=raw.di_gid,
                    size=raw.di_size, atime_ns=_time_ns(raw.di_atime, bigtime),
                    mtime_ns=_time_ns(raw.di_mtime, bigtime),
                    ctime_ns=_time_ns(raw.di_ctime, bigtime), rdev=rdev,
                    generation=raw.di_gen)

    def _listdir(self, ino):
        node = self._inode(ino)
        if not stat.S_ISDIR(node.inode.di_mode):
            raise FsDamaged(f"xfs: inode {ino} is not a directory")
        if node.inode.di_format == FMT_LOCAL:
            entries = ((e.filename, e.inum, e._filetype) for e in node.iterdir())
        else:
            entries = self._block_dir_entries(node)
        out = []
        for name, child, ftype in entries:
            if isinstance(name, str):
                name = name.encode(errors="surrogateescape")
            if name in (b".", b"..") or not name or b"/" in name:
                continue
            out.append((name, child, ftype or 0))
            if len(out) > 100_000:
                break       # the caller refuses it; stop reading
        return out

    def _block_dir_entries(self, node):
        """(name, ino, type bits) of a directory kept in blocks: every data
        block below the leaf offset, as laid out by the extent map."""
        dbs, bs = self.dir_block_size, self.block_size
        data_end = min(node.inode.di_size, DIR2_LEAF_OFFSET)
        runs = self._block_runs(node, data_end)
        header = 64 if self.fs._has_crc else 16
        has_ftype = bool(self.fs._has_ftype)
        pos = 0
        blocks = []
        for start, length in runs:
            if start is not None:
                # Each directory block that this run touches (deduplicated).
                first, last = pos // dbs, (pos + length - 1) // dbs
                blocks.extend(b for b in range(first, last + 1) if not blocks or b > blocks[-1])
            pos += length
        for index in blocks:
            block = self.read_file(runs, index * dbs, dbs)
            if len(block) != dbs or block[:4] not in DATA_MAGICS:
                continue            # a hole, or not a data block
            end = dbs
            if block[:4] in BLOCK_MAGICS:
                count = struct.unpack_from(">I", block, dbs - 8)[0]
                end = dbs - 8 - 8 * count
            at = header
            while at + 8 <= end:
                if block[at:at + 2] == b"\xff\xff":         # unused space
                    length = struct.unpack_from(">H", block, at + 2)[0]
                    if length < 8 or length % 8:
                        raise FsDamaged(f"xfs: directory {node.inum} has a bad free entry")
                    at += length
                    continue
                child, namelen = struct.unpack_from(">QB", block, at)
                name = block[at + 9:at + 9 + namelen]
                ftype = block[at + 9 + namelen] if has_ftype else 0
                size = (9 + namelen + (1 if has_ftype else 0) + 2 + 7) & ~7
                if namelen == 0 or at + size > end:
                    raise FsDamaged(f"xfs: directory {node.inum} has a bad entry")
                yield name, child, FILETYPES.get(ftype) or 0
                at += size

    def _readlink(self, ino):
        node = self._inode(ino)
        raw = node.inode
        if not stat.S_ISLNK(raw.di_mode):
            raise FsDamaged(f"xfs: inode {ino} is not a symlink")
        if raw.di_size > 4096:
            raise FsDamaged(f"xfs: symlink {ino} is {raw.di_size} bytes long")
        if raw.di_format == FMT_LOCAL:
            return self._inline_data(ino)
        target = node.link.encode(errors="surrogateescape")
        if len(target) != raw.di_size:
            raise FsDamaged(f"xfs: symlink {ino} holds {len(target)} bytes, not {raw.di_size}")
        return target

    def _inline_data(self, ino):
        node = self._inode(ino)
        raw = node.inode
        if raw.di_format == FMT_LOCAL:
            data = node.datafork().read(raw.di_size)
            if len(data) != raw.di_size:
                raise FsDamaged(f"xfs: inode {ino} has {len(data)} bytes of inline data, "
                                f"not {raw.di_size}")
            return data
        if raw.di_format == FMT_DEV or stat.S_ISFIFO(raw.di_mode) or stat.S_ISSOCK(raw.di_mode):
            return b""
        return None

    def _runs(self, ino):
        node = self._inode(ino)
        if self._inline_data(ino) is not None:
            return None
        if node.inode.di_flags & DIFLAG_REALTIME:
            raise Unsupported(f"XFS: inode {ino} lives on the realtime device")
        return self._block_runs(node, node.inode.di_size)

    def _block_runs(self, node, size):
        """[(byte offset or None, length)] of the first ``size`` bytes of
        the inode's data fork."""
        if node.inode.di_format not in (FMT_EXTENTS, FMT_BTREE):
            raise FsDamaged(f"xfs: inode {node.inum} has data fork format {node.inode.di_format}")
        bs = self.block_size
        runs, at = [], 0            # at: the next file block
        for offset, fsblock, count, unwritten in sorted(node._iter_blocks()):
            if offset * bs >= size:
                break
            if offset < at:
                raise FsDamaged(f"xfs: inode {node.inum} has overlapping extents")
            if offset > at:
                runs.append((None, (offset - at) * bs))     # a hole
            runs.append((None if unwritten else self._byte(fsblock), count * bs))
            at = offset + count
        out, pos = [], 0
        for start, length in runs:
            length = min(length, size - pos)
            if length > 0:
                out.append((start, length))
                pos += length
        if pos < size:
            out.append((None, size - pos))      # a hole at the end
        return _merged(out)

    def _metadata_ranges(self, ino):
        """The inode's record, which holds its map unless the data fork is a
        B+tree: then every block of the tree too (the root is in the
        record).  The attribute fork is not shown, so it does not count."""
        node = self._inode(ino)
        ag_start = node.ag.num * self.agblocks * self.block_size
        ranges = [(ag_start + node.relative_inum * self.inode_size, self.inode_size)]
        if node.inode.di_format == FMT_BTREE:
            ranges += [(offset, self.block_size) for offset in self._bmap_btree_blocks(node)]
        return ranges

    def _bmap_btree_blocks(self, node):
        """The view offsets of a B+tree data fork's blocks, nodes and leaves,
        each level checked to be its parent's less one (as the kernel's
        xfs_btree_check_lblock) so that a pointer back up the tree ends."""
        fork = node.datafork().read()
        if len(fork) < 4:
            raise FsDamaged(f"xfs: inode {node.inum} has a truncated B+tree root")
        level, count = struct.unpack_from(">HH", fork, 0)
        most = (len(fork) - 4) // 16
        if not 0 < level <= BTREE_MAXLEVELS or count > most:
            raise FsDamaged(f"xfs: inode {node.inum} has a bad B+tree root "
                            f"(level {level}, {count} records)")
        header, magic = (72, b"BMA3") if self.fs._has_crc else (24, b"BMAP")
        bs = self.block_size
        per_node = (bs - header) // 16
        todo = [(ptr, level - 1) for ptr in struct.unpack_from(f">{count}Q", fork, 4 + most * 8)]
        out = []
        while todo:
            ptr, want = todo.pop()
            offset = self._byte(ptr)
            block = self.reader(offset, bs) if 0 <= offset <= self.size - bs else b""
            if len(block) != bs or block[:4] != magic:
                raise FsDamaged(f"xfs: inode {node.inum} has a bad B+tree block at {ptr}")
            out.append(offset)
            if len(out) > MAX_RUNS:
                raise FsDamaged(f"xfs: inode {node.inum} has over {MAX_RUNS} map blocks")
            level, count = struct.unpack_from(">HH", block, 4)
            if level != want or count > per_node:
                raise FsDamaged(f"xfs: inode {node.inum} has a bad B+tree block at {ptr} "
                                f"(level {level}, {count} records)")
            if level:
                children = struct.unpack_from(f">{count}Q", block, header + per_node * 8)
                todo += [(child, level - 1) for child in children]
        return sorted(out)


def _time_ns(value, bigtime):
    """Nanoseconds since 1970 of an on-disk timestamp: with bigtime, an
    unsigned count of nanoseconds from 1901-12-13; else signed seconds
    over nanoseconds."""
    if bigtime:
        return value - (1 << 31) * 1_000_000_000
    sec, nsec = value >> 32, value & 0xFFFFFFFF
    if sec >= 1 << 31:
        sec -= 1 << 32
    return sec * 1_000_000_000 + nsec


def _merged(runs):
    out = []
    for start, length in runs:
        if out:
            prev_start, prev_len = out[-1]
            if (start is None and prev_start is None) or (
                    start is not None and prev_start is not None and prev_start + prev_len == start):
                out[-1] = (prev_start, prev_len + length)
                continue
        out.append((start, length))
    return out
