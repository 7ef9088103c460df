"""ext2, ext3 and ext4, read as the kernel reads them, on untrusted bytes.

The superblock is parsed with ``dissect.extfs``'s structure definitions.
Inodes, group descriptors, extent trees, indirect blocks, directory blocks
and extended attributes are parsed here, because dissect's walkers trust
the disk: they follow an extent index that points at itself, build a
list of every block of an indirect-mapped file whatever its claimed size,
read attribute values of any claimed length, and keep every inode they
meet (with its block list) in a cache of 1024.  Here every structure is
checked as the kernel checks it (``ext4_ext_check``,
``__ext4_check_dir_entry``, ``ext4_xattr_check_entries``, ``__ext4_iget``)
before it is used, every list is capped while it is built, and the only
caches are small LRUs of decoded inodes, pieces of inode tables and their
places, and parents.

Directories: an entry for a subdirectory is shown only when that
subdirectory's ``..`` names the directory listing it.  A hard link to a
directory elsewhere (which ext never makes, but a hostile image can) would
otherwise let a tree walk loop for ever; with the check, the directories
reachable from the root form a tree.

A filesystem whose superblock asks for journal recovery (a crash-
consistent snapshot) is read through ``jbd2.replay_journal``: the
committed transactions are applied in memory, as a mount would apply
them, and the view itself is never changed.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from dissect.extfs.c_ext import c_ext

from .base import (MAX_DIR_ENTRIES, MAX_LINK_BYTES, MAX_RUNS, MAX_XATTR_BYTES, BudgetExceeded,
                   FsDamaged, GuestFs, Stat, Unsupported)
from .jbd2 import replay_journal

SUPERBLOCK = 1024
MAGIC = b"\x53\xef"
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11
ROOT_INO = 2

# Feature bits (the kernel's ext4.h, EXT4_FEATURE_*).
COMPAT_SPARSE_SUPER2 = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_BIGALLOC = 0x200
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
# What this reader understands; anything else (compression, a journal
# device, dirdata) could change what the bytes mean.
KNOWN_INCOMPAT = (INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS
                  | INCOMPAT_64BIT | INCOMPAT_MMP | INCOMPAT_FLEX_BG | INCOMPAT_EA_INODE
                  | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_INLINE_DATA
                  | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD)

# Inode flags (EXT4_*_FL).
ENCRYPT_FL = 0x800
HUGE_FILE_FL = 0x40000
EXTENTS_FL = 0x80000
EA_INODE_FL = 0x200000
INLINE_DATA_FL = 0x10000000

FAST_SYMLINK_MAX = 60           # bytes of i_block
UNWRITTEN = 0x8000              # ee_len above this: an unwritten extent
EXTENT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5            # EXT4_MAX_EXTENT_DEPTH
XATTR_MAGIC = 0xEA020000
DIR_ENTRY_HEADER = 8
MIN_REC_LEN = 12                # EXT4_DIR_REC_LEN(1)
INLINE_DOTDOT_SIZE = 4          # an inline directory starts with its parent's number

VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
               stat.S_IFIFO, stat.S_IFSOCK}
# The types a directory entry's file_type field names (EXT2_FT_*).
ENTRY_TYPES = {1: stat.S_IFREG, 2: stat.S_IFDIR, 3: stat.S_IFCHR, 4: stat.S_IFBLK,
               5: stat.S_IFIFO, 6: stat.S_IFSOCK, 7: stat.S_IFLNK}
# Attribute name indexes the kernel lists (ext4_xattr_handler_map); others
# (system.data of inline data, richacl, hurd) it keeps to itself.
XATTR_PREFIXES = {1: b"user.", 4: b"trusted.", 6: b"security."}
XATTR_ACLS = {2: b"system.posix_acl_access", 3: b"system.posix_acl_default"}
INLINE_DATA_INDEX, INLINE_DATA_NAME = 7, b"data"
# POSIX ACL tags that carry an id (ACL_USER, ACL_GROUP).
ACL_TAGS_WITH_ID = (0x2, 0x8)
ACL_VALID_TAGS = (0x1, 0x2, 0x4, 0x8, 0x10, 0x20)

INODE_CACHE_BYTES = 4 << 20     # decoded inodes kept, by their on-disk size
CACHE_ENTRIES = 4096            # inode tables and parents kept
READ_CHUNK = 64 << 10           # directory blocks read at once
# An inline file's size: its bytes past the inode read as zeros, which are
# made in memory (mkfs -d keeps a sparse file with little data inline).
MAX_INLINE_FILE = 64 << 20
LOAD_GAP_BLOCKS = 8             # inode table blocks read through between two wanted ones
LOAD_SPAN_BYTES = 256 << 10     # at most this at once
INODE_READ = 16 << 10           # inode table bytes read at once
TABLE_CHUNK_CACHE_BYTES = 4 << 20   # of inode tables, as read


def is_ext(read) -> bool:
    sb = read(SUPERBLOCK, 64)
    return len(sb) == 64 and sb[0x38:0x3A] == MAGIC


def needs_recovery(read) -> bool:
    sb = read(SUPERBLOCK, 0x64)
    return len(sb) == 0x64 and bool(struct.unpack_from("<I", sb, 0x60)[0] & INCOMPAT_RECOVER)


# The fixed part of an on-disk inode (struct ext4_inode up to
# i_checksum_lo), and the extra times after i_extra_isize.
_INODE_HEAD = struct.Struct("<HHIiii4xHHII4x60sIII4xHHHH")
_EXTRA_TIMES = struct.Struct("<III")     # i_ctime_extra, i_mtime_extra, i_atime_extra
_U16 = struct.Struct("<H")


@dataclass(slots=True)
class _Inode:
    """The fields of one on-disk inode this reader uses, decoded."""
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    flags: int
    block: bytes            # i_block: extent root, block pointers, inline data or link
    generation: int
    file_acl: int           # the extended attribute block, 0 if none
    blocks: int             # i_blocks, in 512-byte units
    ibody: bytes            # the in-inode attribute area (after i_extra_isize)

    @property
    def type(self):
        return stat.S_IFMT(self.mode)


class _Lru:
    """A small thread-safe LRU map (the reader is called from threads)."""

    def __init__(self, entries):
        self.entries, self._map, self._lock = entries, OrderedDict(), threading.Lock()

    def get(self, key):
        # Without the lock: each OrderedDict call is atomic (the GIL), and
        # a hit is the common case of every request.  A put may drop the
        # key in between: then it is merely not moved.
        value = self._map.get(key)
        if value is not None:
            try:
                self._map.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key, value):
        with self._lock:
            self._map[key] = value
            self._map.move_to_end(key)
            while len(self._map) > self.entries:
                self._map.popitem(last=False)

    def __len__(self):
        return len(self._map)


class ExtGuestFs(GuestFs):
    root = ROOT_INO
    exact_metadata_ranges = True    # _metadata_ranges names every block of the maps

    def __init__(self, read, size):
        if needs_recovery(read):
            read = replay_journal(read, size)
            self.recovered = (f"its journal was replayed in memory ({read.transactions} "
                              f"transactions, {read.replayed} blocks)")
        super().__init__(read, size)
        try:
            raw = self.reader(SUPERBLOCK, 1024)
            sb = c_ext.ext4_super_block(raw)
        except Exception as e:
            raise FsDamaged(f"ext: the superblock cannot be read: {e}") from None
        self._check_superblock(sb, raw)
        self.drop_caches()

    def drop_caches(self):
        # New caches, not cleared ones: a request in flight keeps the old.
        self._inodes = _Lru(max(64, INODE_CACHE_BYTES // self.inode_size))
        self._tables = _Lru(CACHE_ENTRIES)
        self._table_chunks = _Lru(TABLE_CHUNK_CACHE_BYTES // INODE_READ)
        self._parents = _Lru(CACHE_ENTRIES)

    def _check_superblock(self, sb, raw):
        if sb.s_magic != c_ext.EXT2_FS_MAGIC:
            raise FsDamaged("ext: no ext superblock")
        incompat = sb.s_feature_incompat
        if incompat & ~KNOWN_INCOMPAT:
            raise Unsupported(f"ext: incompatible features {incompat & ~KNOWN_INCOMPAT:#x}")
        if sb.s_feature_ro_compat & RO_COMPAT_BIGALLOC:
            raise Unsupported("ext: bigalloc (clusters larger than blocks)")
        if sb.s_log_block_size > 6:
            raise FsDamaged(f"ext: a block size of 1 KiB << {sb.s_log_block_size}")
        bs = self.block_size = 1024 << sb.s_log_block_size
        self.kind = ("ext4" if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG)
                     else "ext3" if sb.s_feature_compat & c_ext.EXT3_FEATURE_COMPAT_HAS_JOURNAL
                     else "ext2")
        if sb.s_rev_level == 0:
            self.inode_size, self.first_ino = GOOD_OLD_INODE_SIZE, GOOD_OLD_FIRST_INO
        else:
            self.inode_size, self.first_ino = sb.s_inode_size, sb.s_first_ino
        isz = self.inode_size
        if isz < GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
            raise FsDamaged(f"ext: an inode size of {isz}")
        if incompat & INCOMPAT_64BIT:
            self.desc_size = sb.s_desc_size
            if self.desc_size < 64 or self.desc_size > 1024 or self.desc_size & (self.desc_size - 1):
                raise FsDamaged(f"ext: a group descriptor size of {self.desc_size}")
        else:
            self.desc_size = 32
        self.blocks_count = sb.s_blocks_count_lo | (
            sb.s_blocks_count_hi << 32 if incompat & INCOMPAT_64BIT else 0)
        self.first_data_block = sb.s_first_data_block
        self.blocks_per_group = sb.s_blocks_per_group
        self.inodes_per_group = sb.s_inodes_per_group
        self.inodes_count = sb.s_inodes_count
        if not (0 < self.blocks_per_group <= 8 * bs and 0 < self.inodes_per_group <= 8 * bs):
            raise FsDamaged("ext: impossible blocks or inodes per group")
        if self.first_data_block > 1 or self.first_data_block >= self.blocks_count:
            raise FsDamaged(f"ext: first data block {self.first_data_block}")
        if not self.first_ino <= self.inodes_count or self.first_ino <= ROOT_INO:
            raise FsDamaged(f"ext: {self.inodes_count} inodes, the first free {self.first_ino}")
        self.groups_count = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if self.inodes_count > self.groups_count * self.inodes_per_group:
            raise FsDamaged("ext: more inodes than the groups hold")
        # Blocks past the end of the view (a truncated image) are outside.
        self.block_limit = min(self.blocks_count, self.size // bs)
        self.itable_blocks = -(-self.inodes_per_group * isz // bs)
        self.incompat, self.ro_compat, self.compat = (
            incompat, sb.s_feature_ro_compat, sb.s_feature_compat)
        self.first_meta_bg = sb.s_first_meta_bg
        self.backup_bgs = struct.unpack_from("<II", raw, 0x24C)

    # -- blocks, group descriptors and inodes -------------------------------

    def _read(self, offset, length):
        data = self.reader(offset, length)
        if len(data) != length:
            raise FsDamaged("ext: a structure ends past the end of the view")
        return data

    def _check_blocks(self, start, count, what):
        # Block 0 (and the 1 KiB filesystems' boot block) hold the superblock,
        # never a file's or a map's block.
        if start <= self.first_data_block or count < 0 or start + count > self.block_limit:
            raise FsDamaged(f"ext: {what} at block {start} (+{count}) is outside the filesystem")

    def _read_blocks(self, start, count, what):
        self._check_blocks(start, count, what)
        return self._read(start * self.block_size, count * self.block_size)

    def _has_super(self, group):
        """Whether a group keeps a superblock backup (ext4_bg_has_super)."""
        if group == 0:
            return True
        if self.compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return False

    def _descriptor_offset(self, group):
        """Where a group's descriptor is (the kernel's descriptor_loc)."""
        per_block = self.block_size // self.desc_size
        nr, index = divmod(group, per_block)
        if not self.incompat & INCOMPAT_META_BG or nr < self.first_meta_bg:
            block = self.first_data_block + 1 + nr
        else:
            first = nr * per_block
            block = (self.first_data_block + first * self.blocks_per_group
                     + (1 if self._has_super(first) else 0))
        return block * self.block_size + index * self.desc_size

    def _inode_table(self, group):
        table = self._tables.get(group)
        if table is None:
            if group >= self.groups_count:
                raise FsDamaged(f"ext: group {group} of {self.groups_count}")
            desc = self._read(self._descriptor_offset(group), self.desc_size)
            table = struct.unpack_from("<I", desc, 8)[0]
            if self.desc_size >= 64:
                table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
            self._check_blocks(table, self.itable_blocks, f"the inode table of group {group}")
            self._tables.put(group, table)
        return table

    def _inode(self, ino):
        """A decoded inode, any number the superblock allows (internal use)."""
        node = self._inodes.get(ino)
        if node is None:
            if not 1 <= ino <= self.inodes_count:
                raise FsDamaged(f"ext: inode number {ino} out of range")
            group, index = divmod(ino - 1, self.inodes_per_group)
            node = self._decode_inode(ino, self._inode_bytes(group, index))
            self._inodes.put(ino, node)
        return node

    def _inode_bytes(self, group, index):
        """The on-disk inode ``index`` of ``group``.  The inode table is read
        INODE_READ bytes at a time, as the kernel reads ahead in it: the
        inodes a walk wants next (a directory's files) are its neighbours."""
        isz = self.inode_size
        per_read = max(1, INODE_READ // isz)
        first = index - index % per_read
        chunk = self._table_chunks.get((group, first))
        if chunk is None:
            count = min(per_read, self.inodes_per_group - first)
            offset = self._inode_table(group) * self.block_size + first * isz
            chunk = self._read(offset, count * isz)
            self._table_chunks.put((group, first), chunk)
        at = (index - first) * isz
        return chunk[at:at + isz]

    def _file(self, ino):
        """An inode a directory entry may name, in use (as ``__ext4_iget``)."""
        if ino != ROOT_INO and not self.first_ino <= ino <= self.inodes_count:
            raise FsDamaged(f"ext: inode number {ino} is reserved or out of range")
        node = self._inode(ino)
        if node.nlink == 0:
            raise FsDamaged(f"ext: inode {ino} is not in use")
        return node

    def _decode_inode(self, ino, raw):
        (mode, uid, size_lo, atime, ctime, mtime, gid, nlink, blocks_lo, flags, block, generation,
         acl_lo, size_hi, blocks_hi, acl_hi, uid_hi, gid_hi) = _INODE_HEAD.unpack_from(raw)
        if stat.S_IFMT(mode) not in VALID_TYPES:
            raise FsDamaged(f"ext: inode {ino} has a bad mode {mode:#o}")
        extra_isize = 0
        if self.inode_size > GOOD_OLD_INODE_SIZE:
            extra_isize = _U16.unpack_from(raw, 128)[0]
            if GOOD_OLD_INODE_SIZE + extra_isize > self.inode_size or extra_isize & 3:
                raise FsDamaged(f"ext: inode {ino} has a bad i_extra_isize {extra_isize}")
        # i_size_high is a directory's size only with largedir (ext4_isize).
        size = size_lo
        if stat.S_ISREG(mode) or self.incompat & INCOMPAT_LARGEDIR:
            size |= size_hi << 32
        if size >= 1 << 63:
            raise FsDamaged(f"ext: inode {ino} has a negative size")
        blocks = blocks_lo
        if self.ro_compat & RO_COMPAT_HUGE_FILE:
            blocks |= blocks_hi << 32
            if flags & HUGE_FILE_FL:
                blocks *= self.block_size >> 9
        end = GOOD_OLD_INODE_SIZE + extra_isize
        # ext4_decode_extra_time: signed 32-bit seconds, plus two epoch bits
        # and the nanoseconds where the inode's extra part has them.
        atime_ns, mtime_ns, ctime_ns = (atime * 1_000_000_000, mtime * 1_000_000_000,
                                        ctime * 1_000_000_000)
        if end >= 0x88:     # i_ctime_extra, then i_mtime_extra and i_atime_extra if there
            c_extra, m_extra, a_extra = _EXTRA_TIMES.unpack_from(raw, 0x84)
            ctime_ns += _extra_ns(c_extra)
            if end >= 0x8C:
                mtime_ns += _extra_ns(m_extra)
            if end >= 0x90:
                atime_ns += _extra_ns(a_extra)
        return _Inode(ino, mode, nlink, uid | uid_hi << 16, gid | gid_hi << 16, size, atime_ns,
                      mtime_ns, ctime_ns, flags, block, generation, acl_lo | acl_hi << 32, blocks,
                      raw[end:])

    # -- GuestFs -----------------------------------------------------------

    def _stat(self, ino):
        node = self._file(ino)
        rdev = 0
        if node.type in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = _device(node.block)
        return Stat(ino=ino, mode=node.mode, nlink=node.nlink, uid=node.uid, gid=node.gid,
                    size=node.size, atime_ns=node.atime_ns, mtime_ns=node.mtime_ns,
                    ctime_ns=node.ctime_ns, rdev=rdev, generation=node.generation)

    def _listdir(self, ino):
        entries = []
        for name, child, file_type in self._named_entries(ino):
            kind = self._child_type(ino, child, ENTRY_TYPES.get(file_type, 0))
            if kind is not None:
                entries.append((name, child, kind))
        return entries

    def _named_entries(self, ino):
        """(name, inode, file_type) of directory ``ino``'s entries that may
        be shown by name, at most MAX_DIR_ENTRIES."""
        node = self._file(ino)
        if node.type != stat.S_IFDIR:
            raise FsDamaged(f"ext: inode {ino} is not a directory")
        if node.flags & ENCRYPT_FL:
            raise Unsupported(f"ext: directory {ino} is encrypted")
        count = 0
        for name, child, file_type in self._dir_entries(node):
            if name in (b".", b"..") or not name or b"/" in name or b"\0" in name:
                continue
            count += 1
            if count > MAX_DIR_ENTRIES:
                raise FsDamaged(f"ext: directory {ino} has over {MAX_DIR_ENTRIES} entries")
            yield name, child, file_type

    def _child_type(self, ino, child, entry_type):
        """The type of a directory's entry, from its inode (the entry's own
        file_type may lie), or None if the entry must not be shown: a
        directory that is not this one's child (a loop, or a second way in)."""
        try:
            kind = self._file(child).type
        except BudgetExceeded:
            raise
        except FsDamaged:
            # Its stat will fail on its own; the rest of the directory stays.
            return entry_type
        if kind == stat.S_IFDIR and (child in (ino, ROOT_INO) or self._parent(child) not in (ino, -1)):
            return None
        return kind

    def _parent(self, ino):
        """The ``..`` of a directory: 0 if it has none, -1 if it cannot be
        read (then neither can the directory be listed, and a walk stops
        there by itself)."""
        parent = self._parents.get(ino)
        if parent is None:
            parent = 0
            try:
                node = self._file(ino)
                if node.flags & INLINE_DATA_FL:
                    parent = struct.unpack_from("<I", self._inline_bytes(node), 0)[0]
                else:
                    for name, child, _type in self._dir_entries(node, first_block_only=True):
                        if name == b"..":
                            parent = child
                            break
            except BudgetExceeded:
                raise
            except (FsDamaged, struct.error):
                parent = -1
            self._parents.put(ino, parent)
        return parent

    def _dir_entries(self, node, first_block_only=False):
        """(name, inode, file_type) of every entry in use, . and .. too."""
        if node.flags & INLINE_DATA_FL:
            data = self._inline_bytes(node)
            yield from self._block_entries(node.ino, data, INLINE_DOTDOT_SIZE, len(data))
            return
        bs = self.block_size
        for start, length in self._byte_runs(node, []):
            if start is None:
                continue            # a hole in a directory: the kernel skips it too
            for offset in range(0, length, READ_CHUNK):
                chunk = self._read(start + offset, min(READ_CHUNK, length - offset))
                for at in range(0, len(chunk), bs):
                    yield from self._block_entries(node.ino, chunk, at, min(at + bs, len(chunk)))
                    if first_block_only:
                        return

    def _block_entries(self, ino, buf, offset, end):
        """The entries of one directory block (``__ext4_check_dir_entry``
        on each: a bad one makes the directory damaged)."""
        filetype = self.incompat & INCOMPAT_FILETYPE
        while offset < end:
            if end - offset < MIN_REC_LEN:
                raise FsDamaged(f"ext: directory {ino} has a truncated entry")
            child, rec_len, name_len, file_type = struct.unpack_from("<IHBB", buf, offset)
            if not filetype:
                name_len, file_type = name_len | file_type << 8, 0
            if (rec_len < MIN_REC_LEN or rec_len % 4 or offset + rec_len > end
                    or rec_len < DIR_ENTRY_HEADER + name_len):
                raise FsDamaged(f"ext: directory {ino} has a bad entry (rec_len {rec_len}, "
                                f"name_len {name_len})")
            if child > self.inodes_count:
                raise FsDamaged(f"ext: directory {ino} names inode {child}")
            if child:
                name = bytes(buf[offset + DIR_ENTRY_HEADER:offset + DIR_ENTRY_HEADER + name_len])
                yield name, child, file_type
            offset += rec_len

    def _readlink(self, ino):
        node = self._file(ino)
        if node.type != stat.S_IFLNK:
            raise FsDamaged(f"ext: inode {ino} is not a symlink")
        if node.flags & ENCRYPT_FL:
            raise Unsupported(f"ext: symlink {ino} is encrypted")
        if not 0 < node.size <= MAX_LINK_BYTES:
            raise FsDamaged(f"ext: symlink {ino} is {node.size} bytes long")
        inline = self._inline(node)
        if inline is not None:
            return inline
        if node.size >= self.block_size:
            raise FsDamaged(f"ext: symlink {ino} is longer than a block")
        return self.read_file(self._byte_runs(node, []), 0, node.size)

    def _xattrs(self, ino):
        node = self._file(ino)
        out = {}
        for index, name, value in self._xattr_entries(node):
            if index in XATTR_ACLS:
                out[XATTR_ACLS[index]] = _acl_to_xattr(ino, value)
            elif index in XATTR_PREFIXES:
                out[XATTR_PREFIXES[index] + name] = value
        return out

    def _inline_data(self, ino):
        return self._inline(self._file(ino))

    def _inline(self, node):
        if node.flags & INLINE_DATA_FL:
            # Past its inline bytes a file reads as zeros (the kernel's
            # ext4_read_inline_folio zeroes the rest of the page, and any
            # page after it), as mkfs leaves a sparse file of 61 bytes.
            if node.size > MAX_INLINE_FILE:
                raise FsDamaged(f"ext: inode {node.ino} has inline data and {node.size} bytes")
            data = self._inline_bytes(node)[:node.size]
            return data + bytes(node.size - len(data))
        if node.type == stat.S_IFLNK and self._is_fast_symlink(node):
            if not 0 < node.size < FAST_SYMLINK_MAX:
                raise FsDamaged(f"ext: fast symlink {node.ino} is {node.size} bytes long")
            return node.block[:node.size]
        if node.type in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            return b""
        return None

    def _is_fast_symlink(self, node):
        """As the kernel's ext4_inode_is_fast_symlink: no blocks but its
        attribute block's."""
        if node.flags & EA_INODE_FL:
            return 0 < node.size < FAST_SYMLINK_MAX
        ea_blocks = self.block_size >> 9 if node.file_acl else 0
        return node.blocks - ea_blocks == 0

    def _inline_bytes(self, node):
        """i_block, then the "system.data" attribute's value (ext4 inline data)."""
        more = b""
        for index, name, value in self._xattr_entries(node, body_only=True):
            if index == INLINE_DATA_INDEX and name == INLINE_DATA_NAME:
                more = value
                break
        return node.block + more

    def _runs(self, ino):
        node = self._file(ino)
        if node.flags & ENCRYPT_FL and node.type == stat.S_IFREG:
            raise Unsupported(f"ext: file {ino} is encrypted")
        if self._inline(node) is not None:
            return None
        return self._byte_runs(node, [])

    def _metadata_ranges(self, ino):
        return self._ranges(self._file(ino), want_runs=False)[0]

    # -- for snapfs diff -----------------------------------------------------

    def layout(self, ino):
        """(type bits, ``metadata_ranges``, ``runs``) in one request, the
        map walked once: what ``snapfs diff`` asks of every inode."""
        return self._bounded(self._layout, ino)

    def _layout(self, ino):
        node = self._file(ino)
        if node.flags & ENCRYPT_FL and node.type == stat.S_IFREG:
            raise Unsupported(f"ext: file {ino} is encrypted")
        ranges, runs = self._ranges(node, want_runs=True)
        return node.type, ranges, runs

    def _ranges(self, node, want_runs):
        """(every byte range the inode's record, attributes and maps live
        in, its runs or None if inline or not wanted).  The ranges: the
        record (with the in-inode attributes, an inline file's bytes and an
        extent root or the block pointers), the attribute block, the extent
        tree's index and leaf blocks or the indirect blocks down to the end
        of the file, and for each value kept in an inode of its own
        (ea_inode), that inode's ranges and data."""
        bs = self.block_size
        ranges, runs = [self._record_range(node.ino)], None
        if node.file_acl:
            ranges.append((node.file_acl * bs, bs))
        if (want_runs or self._has_map_blocks(node)) and self._inline(node) is None:
            maps = []
            runs = self._byte_runs(node, maps)
            ranges.extend((block * bs, bs) for block in maps)
        if self.incompat & INCOMPAT_EA_INODE:
            for value_ino in self._xattr_value_inodes(node):
                holder = self._inode(value_ino)
                held, data = self._ranges(holder, want_runs=True)
                ranges += held
                ranges.extend((start, length) for start, length in data or () if start is not None)
        return ranges, runs if want_runs else None

    def _record_range(self, ino):
        group, index = divmod(ino - 1, self.inodes_per_group)
        return self._inode_table(group) * self.block_size + index * self.inode_size, self.inode_size

    def _has_map_blocks(self, node):
        """Whether the map reaches past the record: an extent tree deeper
        than its root, or a file longer than the 12 direct pointers."""
        if node.flags & EXTENTS_FL:
            return struct.unpack_from("<H", node.block, 6)[0] > 0
        return node.size > 12 * self.block_size

    def _xattr_value_inodes(self, node):
        """The inode numbers of the attribute values kept in inodes of their
        own, from the entry headers (the values are not read)."""
        areas, found = [], []
        body = node.ibody
        if len(body) >= 4 and struct.unpack_from("<I", body, 0)[0] == XATTR_MAGIC:
            areas.append((body, 4))
        if node.file_acl:
            areas.append((self._read_blocks(node.file_acl, 1, f"the attribute block of inode "
                                                               f"{node.ino}"), 32))
        for buf, offset in areas:
            while offset + 16 <= len(buf) and struct.unpack_from("<I", buf, offset)[0]:
                name_len, _index, _offs, value_inum = struct.unpack_from("<BBHI", buf, offset)
                if value_inum:
                    found.append(value_inum)
                offset = (offset + 16 + name_len + 3) & ~3
        return found

    def listdir_known(self, ino, known_type=None):
        """``listdir``, where ``known_type(child)`` may give a child's type
        (S_IFMT bits, or None) so that its inode is not read: ``snapfs
        diff`` knows it for the inodes whose record is the same bytes as in
        a version it listed before.  It must be the inode's own type; a
        child it says is a directory is checked as ``listdir`` checks it.
        The answer is the one ``listdir`` gives; the inodes it does read
        are read a block of the inode table at a time."""
        return self._bounded(self._listdir_known, ino, known_type)

    def _listdir_known(self, ino, known_type):
        found = []
        for name, child, file_type in self._named_entries(ino):
            kind = known_type(child) if known_type else None
            found.append((name, child, file_type, None if kind == stat.S_IFDIR else kind))
        self._load_inodes(child for _, child, _, kind in found if kind is None)
        entries = []
        for name, child, file_type, kind in found:
            if kind is None:
                kind = self._child_type(ino, child, ENTRY_TYPES.get(file_type, 0))
                if kind is None:
                    continue
            entries.append((name, child, kind))
        return entries

    def _load_inodes(self, inos):
        """Decode these inodes into the cache, reading the blocks of the
        inode tables they are in once, neighbouring blocks in one read (a
        directory's files are mostly numbered in a row).  One that cannot
        be read is left out: reading it alone will say why."""
        bs, blocks = self.block_size, {}
        for ino in inos:
            if self._inodes.get(ino) is not None or not 1 <= ino <= self.inodes_count:
                continue
            group, index = divmod(ino - 1, self.inodes_per_group)
            try:
                offset = self._inode_table(group) * bs + index * self.inode_size
            except BudgetExceeded:
                raise
            except FsDamaged:
                continue
            blocks.setdefault(offset // bs, []).append((ino, offset % bs))
        for first, last in _spans(sorted(blocks), LOAD_GAP_BLOCKS, LOAD_SPAN_BYTES // bs):
            raw = self.reader(first * bs, (last + 1 - first) * bs)
            for block in range(first, last + 1):
                for ino, at in blocks.get(block, ()):
                    at += (block - first) * bs
                    if at + self.inode_size <= len(raw):
                        try:
                            self._inodes.put(ino, self._decode_inode(
                                ino, raw[at:at + self.inode_size]))
                        except FsDamaged:
                            pass

    # -- block maps ----------------------------------------------------------

    def _byte_runs(self, node, maps):
        """The file's bytes as [(view offset or None, length)], exactly its
        size, capped at MAX_RUNS while they are built.  The blocks of the
        map itself (extent tree nodes, indirect blocks) go to ``maps``."""
        bs, size = self.block_size, node.size
        nblocks = -(-size // bs)
        if node.flags & EXTENTS_FL:
            chunks = self._extent_chunks(node, nblocks, maps)
        else:
            chunks = self._indirect_chunks(node, nblocks, maps)
        runs, pos = [], 0
        for start, count in chunks:
            if pos >= size:
                break
            length = min(count * bs, size - pos)
            offset = None
            if start is not None:
                self._check_blocks(start, count, f"a block of inode {node.ino}")
                offset = start * bs
            pos += length
            if runs:
                last_start, last_len = runs[-1]
                if (offset is None and last_start is None) or (
                        offset is not None and last_start is not None
                        and last_start + last_len == offset):
                    runs[-1] = (last_start, last_len + length)
                    continue
            runs.append((offset, length))
            if len(runs) > MAX_RUNS:
                raise FsDamaged(f"ext: inode {node.ino} has over {MAX_RUNS} extents")
        if pos < size:
            if runs and runs[-1][0] is None:
                runs[-1] = (None, runs[-1][1] + size - pos)
            else:
                runs.append((None, size - pos))     # a hole at the end
        return runs

    def _extent_chunks(self, node, nblocks, maps):
        """(block or None, count) from block 0 on, holes included, until
        ``nblocks``; extents are checked as ext4_valid_extent_entries does."""
        at = 0
        for lblock, start, count in self._extent_leaves(node.ino, node.block, None,
                                                        (FAST_SYMLINK_MAX - 12) // 12, maps):
            if lblock < at:
                raise FsDamaged(f"ext: inode {node.ino} has overlapping extents")
            if lblock >= nblocks:
                return                  # past the end of the file (fallocated, kept size)
            if lblock > at:
                yield None, lblock - at
            yield start, count
            at = lblock + count

    def _extent_leaves(self, ino, buf, depth_wanted, max_entries, maps):
        """(logical block, block or None if unwritten, count) of each leaf
        extent under one tree node.  Each node's depth must be its parent's
        less one, so an index that points at itself or up the tree ends."""
        magic, entries, most, depth = struct.unpack_from("<HHHH", buf, 0)
        if (magic != EXTENT_MAGIC or most > max_entries or entries > most
                or depth > MAX_EXTENT_DEPTH or depth_wanted not in (None, depth)):
            raise FsDamaged(f"ext: inode {ino} has a bad extent tree node "
                            f"(magic {magic:#x}, {entries}/{most} entries, depth {depth})")
        per_block = (self.block_size - 12) // 12
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                lblock, length, hi, lo = struct.unpack_from("<IHHI", buf, at)
                start = hi << 32 | lo
                if length > UNWRITTEN:
                    length, start = length - UNWRITTEN, None    # reads as zeros
                if length == 0 or lblock + length > 1 << 32:
                    raise FsDamaged(f"ext: inode {ino} has an extent of {length} blocks "
                                    f"at {lblock}")
                yield lblock, start, length
            else:
                lblock, lo, hi = struct.unpack_from("<IIH", buf, at)
                child = hi << 32 | lo
                maps.append(child)
                block = self._read_blocks(child, 1, f"an extent tree node of inode {ino}")
                yield from self._extent_leaves(ino, block, depth - 1, per_block, maps)

    def _indirect_chunks(self, node, nblocks, maps):
        """(block or None, count) of an ext2/ext3 block map, holes (zero
        pointers) as whole runs, never as a list of every block."""
        pointers = struct.unpack("<15I", node.block)
        pos = 0
        for pointer in pointers[:12]:
            if pos >= nblocks:
                return
            yield pointer or None, 1
            pos += 1
        per_block = self.block_size // 4
        for level, pointer in ((1, pointers[12]), (2, pointers[13]), (3, pointers[14])):
            take = min(per_block ** level, nblocks - pos)
            if take <= 0:
                return
            yield from self._indirect(node.ino, pointer, level, take, maps)
            pos += take
        if pos < nblocks:
            raise FsDamaged(f"ext: inode {node.ino} is larger than a block map can hold")

    def _indirect(self, ino, pointer, level, take, maps):
        if pointer == 0:
            yield None, take
            return
        maps.append(pointer)
        per_block = self.block_size // 4
        block = self._read_blocks(pointer, 1, f"an indirect block of inode {ino}")
        pointers = struct.unpack(f"<{per_block}I", block)
        if level == 1:
            for child in pointers[:take]:
                yield child or None, 1
            return
        span = per_block ** (level - 1)
        for child in pointers[:-(-take // span)]:
            n = min(span, take)
            yield from self._indirect(ino, child, level - 1, n, maps)
            take -= n

    # -- extended attributes ---------------------------------------------------

    def _xattr_entries(self, node, body_only=False):
        """(name index, name, value) of the inode's attributes: those in the
        inode's body, then those in its attribute block."""
        total = [0]
        body = node.ibody
        if len(body) >= 4 and struct.unpack_from("<I", body, 0)[0] == XATTR_MAGIC:
            yield from self._xattr_list(node.ino, body, 4, 4, total)
        if body_only or not node.file_acl:
            return
        block = self._read_blocks(node.file_acl, 1, f"the attribute block of inode {node.ino}")
        magic, _refcount, blocks = struct.unpack_from("<III", block, 0)
        if magic != XATTR_MAGIC or blocks != 1:
            raise FsDamaged(f"ext: inode {node.ino} has a bad attribute block")
        yield from self._xattr_list(node.ino, block, 32, 0, total)

    def _xattr_list(self, ino, buf, offset, value_base, total):
        end = len(buf)
        while True:
            if offset + 4 > end:
                raise FsDamaged(f"ext: the attributes of inode {ino} run past their area")
            if struct.unpack_from("<I", buf, offset)[0] == 0:
                return
            if offset + 16 > end:
                raise FsDamaged(f"ext: the attributes of inode {ino} run past their area")
            name_len, index, value_offs, value_inum, value_size = struct.unpack_from(
                "<BBHII", buf, offset)
            name_end = offset + 16 + name_len
            if name_end > end:
                raise FsDamaged(f"ext: an attribute name of inode {ino} runs past its area")
            name = bytes(buf[offset + 16:name_end])
            total[0] += name_len + value_size
            if total[0] > MAX_XATTR_BYTES:
                raise FsDamaged(f"ext: inode {ino} has over {MAX_XATTR_BYTES} bytes of attributes")
            if value_inum:
                value = self._xattr_inode_value(ino, value_inum, value_size)
            else:
                start = value_base + value_offs
                if start + value_size > end:
                    raise FsDamaged(f"ext: an attribute value of inode {ino} runs past its area")
                value = bytes(buf[start:start + value_size])
            yield index, name, value
            offset = (name_end + 3) & ~3

    def _xattr_inode_value(self, ino, value_inum, value_size):
        """A large value kept in an inode of its own (ea_inode)."""
        if not self.incompat & INCOMPAT_EA_INODE:
            raise FsDamaged(f"ext: inode {ino} has an attribute in inode {value_inum}, "
                            f"without ea_inode")
        holder = self._inode(value_inum)
        if not holder.flags & EA_INODE_FL or holder.size != value_size or holder.nlink == 0:
            raise FsDamaged(f"ext: inode {ino} has a bad attribute inode {value_inum}")
        inline = self._inline(holder)
        if inline is not None:
            return inline
        return self.read_file(self._byte_runs(holder, []), 0, value_size)


def _spans(numbers, gap, most):
    """(first, last) of runs of sorted ``numbers`` where each is at most
    ``gap`` after the one before, each run at most ``most`` long."""
    first = last = None
    for n in numbers:
        if first is not None and n - last <= gap and n - first < most:
            last = n
            continue
        if first is not None:
            yield first, last
        first = last = n
    if first is not None:
        yield first, last

def _extra_ns(extra):
    """What an i_*time_extra adds: two epoch bits and the nanoseconds."""
    return ((extra & 3) << 32) * 1_000_000_000 + (extra >> 2)


def _device(i_block):
    """The device number of a device inode, old or new encoding (as the
    kernel's ext4_set_inode_flags/old_decode_dev/new_decode_dev)."""
    old, new = struct.unpack_from("<II", bytes(i_block))
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def _acl_to_xattr(ino, disk):
    """A POSIX ACL as ext4 stores it (version 1, short entries for the
    owner, group, mask and other) in the form getxattr gives (version 2,
    8-byte entries), as the kernel's ext4_acl_from_disk and
    posix_acl_to_xattr do."""
    if len(disk) < 4 or struct.unpack_from("<I", disk, 0)[0] != 1:
        raise FsDamaged(f"ext: inode {ino} has a bad ACL")
    out, at = [struct.pack("<I", 2)], 4
    while at < len(disk):
        if at + 4 > len(disk):
            raise FsDamaged(f"ext: inode {ino} has a bad ACL")
        tag, perm = struct.unpack_from("<HH", disk, at)
        if tag not in ACL_VALID_TAGS:
            raise FsDamaged(f"ext: inode {ino} has a bad ACL tag {tag:#x}")
        if tag in ACL_TAGS_WITH_ID:
            if at + 8 > len(disk):
                raise FsDamaged(f"ext: inode {ino} has a bad ACL")
            ident, at = struct.unpack_from("<I", disk, at + 4)[0], at + 8
        else:
            ident, at = 0xFFFFFFFF, at + 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)
