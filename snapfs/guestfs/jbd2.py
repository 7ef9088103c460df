"""In-memory replay of an ext3/ext4 journal (jbd2).

A snapshot of a running VM taken without a freeze holds an ext4 whose
superblock says needs_recovery: committed transactions sit in the journal
and were not yet written to their home blocks.  Read without them the tree
is torn.  ``replay_journal`` does what the kernel's recovery does when it
mounts such a filesystem (fs/jbd2/recovery.c), in its three passes:

SCAN    from the journal superblock's s_start and s_sequence, transaction
        by transaction (descriptor, revoke and commit blocks, wrapping from
        the end of the log back to s_first), up to the first block that is
        not the next one expected; checks the descriptor, revoke and commit
        checksums, and so finds the first transaction not to replay.
REVOKE  gathers the revoke records of the transactions to replay.
REPLAY  maps every block they tag to its journal copy, unless a revoke of
        the same or a later transaction cancels it, checking each copy's
        checksum.

The view is never written.  The result is an overlay: filesystem block ->
the offset in the view of the journal block holding its newest copy (and
whether its first four bytes were escaped), not the bytes themselves (a
journal may be a gigabyte); and the ext superblock with needs_recovery
cleared (its checksum recomputed), as the kernel leaves it after a mount.

Where the kernel's recovery fails (so the mount fails) this raises
FsDamaged; what it does not handle raises Unsupported: an external journal
device, and fast commits (the jbd2 fast_commit feature) when the fast-commit
area holds a commit to apply after the full ones, or the log wraps (kernels
differ on where such a log wraps).

Limits: ext4 also processes the orphan list after recovery (inodes unlinked
while open are freed, interrupted truncates finished); that is not done
here, so a file caught mid-truncate shows its size before the truncate.
The superblock's error fields, which ext4 restores from its in-memory copy
after replaying, are the journal copy's.  The commit header is 64 bytes as
on 64-bit kernels (the "partial commit block" checksum covers it).
"""

from __future__ import annotations

import bisect
import stat
import struct
import zlib
from dataclasses import dataclass, field

from dissect.extfs import ExtFS
from dissect.extfs.c_ext import c_ext
from dissect.extfs.c_jdb2 import c_jdb2
from dissect.util.hash import crc32c

from .base import FsDamaged, Reader, ReaderFile, Unsupported

# -- the ext superblock -------------------------------------------------------

SUPERBLOCK = 1024                   # its offset in the filesystem, and its size
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_RECOVER = 0x4
EXT_RO_COMPAT_METADATA_CSUM = 0x400
EXT_INCOMPAT_OFFSET = 0x60          # s_feature_incompat
EXT_CHECKSUM_OFFSET = 0x3FC         # s_checksum: crc32c of the bytes before it

# -- the journal --------------------------------------------------------------

MAGIC = c_jdb2.JBD2_MAGIC_NUMBER
MAGIC_BYTES = struct.pack(">I", MAGIC)
HEADER_BYTES = 12                   # journal_header: magic, block type, sequence
REVOKE_HEADER_BYTES = 16            # journal_header and r_count (bytes used)
TAIL_BYTES = 4                      # jbd2_journal_block_tail, with checksums v2/v3
UUID_BYTES = 16                     # after a tag without FLAG_SAME_UUID
COMMIT_HEADER_BYTES = 64            # sizeof(struct commit_header) on a 64-bit kernel
COMMIT_CHECKSUM_OFFSET = 16         # h_chksum[0]
NUM_FC_BLOCKS_OFFSET = 0x54         # s_num_fc_blks, in what dissect calls s_padding
DEFAULT_FC_BLOCKS = 256             # JBD2_DEFAULT_FAST_COMMIT_BLOCKS
MIN_JOURNAL_BLOCKS = 1024           # the kernel refuses a shorter journal
INCOMPAT_FAST_COMMIT = 0x20         # not in dissect's c_jdb2
KNOWN_INCOMPAT = (c_jdb2.JBD2_FEATURE_INCOMPAT_REVOKE | c_jdb2.JBD2_FEATURE_INCOMPAT_64BIT
                  | c_jdb2.JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT | c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V2
                  | c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT)
KNOWN_COMPAT = c_jdb2.JBD2_FEATURE_COMPAT_CHECKSUM
FC_TAG_HEAD = 0x9                   # EXT4_FC_TAG_HEAD, first tag of a fast commit
EXTENT_MAGIC = 0xF30A
EXTENT_MAX_DEPTH = 5
UNWRITTEN = 0x8000                  # ee_len above this: an unwritten extent
SCAN, REVOKE, REPLAY = range(3)


def replay_journal(read: Reader, size: int) -> Reader:
    """A reader of the filesystem in ``read`` (``size`` bytes) as the
    kernel shows it after journal recovery.  Raises FsDamaged where the
    kernel's recovery would fail, Unsupported for an external journal or
    pending fast commits.  The returned reader tells what was done in
    ``transactions``, ``replayed`` and ``revoked``."""
    journal = Journal.open(read, size)
    recovery = Recovery(journal)
    recovery.run()
    return ReplayedView(read, size, journal.block_size, recovery)


# -- checksums ------------------------------------------------------------------

def _crc32c(seed, data):
    """The kernel's crc32c(): the bare register, not inverted on the way in
    or out (dissect's, like zlib's crc32, inverts both)."""
    return crc32c.crc32c(data, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


_BITREV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _rev32(value):
    return int(f"{value:032b}"[::-1], 2)


def crc32_be(seed, data):
    """The kernel's crc32_be() (journal checksum v1): the MSB-first CRC-32,
    bare register.  The LSB-first CRC of bit-reversed bytes is the
    bit-reversed MSB-first CRC, so zlib does the work."""
    return _rev32(zlib.crc32(data.translate(_BITREV8), _rev32(seed) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF)


def _tid_gt(a, b):
    """Transaction ids wrap at 2**32; compare as the kernel's tid_gt."""
    return 0 < (a - b) & 0xFFFFFFFF < 0x80000000


def _tid_geq(a, b):
    return a == b or _tid_gt(a, b)


# -- the journal: where it is, what it is -----------------------------------------

@dataclass(frozen=True, slots=True)
class Tag:
    block: int          # the filesystem block the copy is for
    flags: int
    checksum: int       # 16 bits (v2) or 32 bits (v3) of the copy's crc32c


class Journal:
    """The journal's geometry and features, from its superblock, and its
    blocks in the view, through the journal inode's block map."""

    def __init__(self, read, size, block_size, extents, total):
        self._read, self.size, self.block_size = read, size, block_size
        self._extents = extents                 # [(logical, count, physical)], sorted
        self._starts = [e[0] for e in extents]
        self.total = total                      # blocks the journal inode holds
        sb_raw = self.block(0)[:1024]
        sb = c_jdb2.journal_superblock(sb_raw)
        if sb.s_header.h_magic != MAGIC or sb.s_blocksize != block_size:
            raise FsDamaged("ext: no valid journal superblock (magic or block size)")
        if sb.s_header.h_blocktype == c_jdb2.JBD2_SUPERBLOCK_V2:
            self.compat, self.incompat = sb.s_feature_compat, sb.s_feature_incompat
            ro_compat = sb.s_feature_ro_compat
        elif sb.s_header.h_blocktype == c_jdb2.JBD2_SUPERBLOCK_V1:
            self.compat = self.incompat = ro_compat = 0
        else:
            raise FsDamaged(f"ext: journal superblock of unknown type {sb.s_header.h_blocktype}")
        if self.incompat & ~KNOWN_INCOMPAT or self.compat & ~KNOWN_COMPAT or ro_compat:
            raise Unsupported(f"ext: journal features unknown (compat {self.compat:#x}, "
                              f"incompat {self.incompat:#x}, ro_compat {ro_compat:#x})")
        if sb.s_maxlen > total:
            raise FsDamaged(f"ext: the journal is {total} blocks, its superblock says {sb.s_maxlen}")
        self.maxlen, self.first = sb.s_maxlen, sb.s_first
        if not 0 < self.first < self.maxlen or self.maxlen - self.first + 1 < MIN_JOURNAL_BLOCKS:
            raise FsDamaged(f"ext: journal log blocks {self.first}-{self.maxlen} are not a log")
        self.sequence, self.start = sb.s_sequence, sb.s_start
        self.csum_v2 = bool(self.incompat & c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V2)
        self.csum_v3 = bool(self.incompat & c_jdb2.JBD2_FEATURE_INCOMPAT_CSUM_V3)
        self.csum = self.csum_v2 or self.csum_v3
        self.csum_v1 = bool(self.compat & c_jdb2.JBD2_FEATURE_COMPAT_CHECKSUM)
        self.is_64bit = bool(self.incompat & c_jdb2.JBD2_FEATURE_INCOMPAT_64BIT)
        self.async_commit = bool(self.incompat & c_jdb2.JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT)
        self.fast_commit = bool(self.incompat & INCOMPAT_FAST_COMMIT)
        if self.csum_v2 and self.csum_v3 or self.csum and self.csum_v1:
            raise FsDamaged("ext: the journal claims two kinds of checksums at once")
        if self.csum:
            if sb.s_checksum_type != c_jdb2.JBD2_CRC32C_CHKSUM:
                raise FsDamaged(f"ext: journal checksum type {sb.s_checksum_type} unknown")
            blank = sb_raw[:0xFC] + bytes(4) + sb_raw[0x100:]
            if _crc32c(0xFFFFFFFF, blank) != sb.s_checksum:
                raise FsDamaged("ext: the journal superblock's checksum is wrong")
            self.seed = _crc32c(0xFFFFFFFF, bytes(sb.s_uuid))
        self.last = self.maxlen                 # where the log wraps to s_first
        if self.fast_commit:
            fc_blocks = struct.unpack_from(">I", sb_raw, NUM_FC_BLOCKS_OFFSET)[0] or DEFAULT_FC_BLOCKS
            if self.maxlen - fc_blocks - self.first < MIN_JOURNAL_BLOCKS:
                raise FsDamaged("ext: the journal's fast-commit area leaves no log")
            self.last = self.maxlen - fc_blocks
        if self.start and not self.first <= self.start < self.last:
            raise FsDamaged(f"ext: the journal's log starts at {self.start}, outside the log")
        if self.csum_v3:
            self.tag_bytes = 16
        else:
            self.tag_bytes = (12 if self.is_64bit else 8) + (2 if self.csum_v2 else 0)
        self.tail_bytes = TAIL_BYTES if self.csum else 0

    @classmethod
    def open(cls, read, size):
        """The journal of the ext filesystem in ``read``."""
        try:
            fs = ExtFS(ReaderFile(read, size))
        except NotImplementedError as e:
            raise Unsupported(f"ext: {e}") from None
        except Exception as e:
            raise FsDamaged(f"ext: the superblock cannot be read: {e}") from None
        sb = fs.sb
        if not sb.s_feature_compat & EXT_COMPAT_HAS_JOURNAL:
            raise FsDamaged("ext: the superblock asks for journal recovery but has no journal")
        if sb.s_journal_inum == 0:
            raise Unsupported("ext: the journal is on an external device; it cannot be replayed")
        if sb.s_journal_dev:
            raise FsDamaged("ext: the superblock names both a journal inode and a journal device")
        block_size = fs.block_size
        try:
            inode = fs.get_inode(sb.s_journal_inum).inode
        except Exception as e:
            raise FsDamaged(f"ext: the journal inode cannot be read: {e}") from None
        if not stat.S_ISREG(inode.i_mode):
            raise FsDamaged("ext: the journal inode is not a regular file")
        total = min((inode.i_size_lo | inode.i_size_high << 32) // block_size, size // block_size)
        if inode.i_flags & c_ext.EXT4_EXTENTS_FL:
            extents = _extent_map(read, size, block_size, bytes(inode.i_block), total)
        else:
            extents = _indirect_map(read, size, block_size, bytes(inode.i_block), total)
        return cls(read, size, block_size, extents, total)

    def offset(self, n):
        """The offset in the view of journal block ``n``."""
        if not 0 <= n < self.total:
            raise FsDamaged(f"ext: journal block {n} is past the end of the journal")
        i = bisect.bisect_right(self._starts, n) - 1
        if i >= 0:
            logical, count, physical = self._extents[i]
            if n < logical + count:
                where = (physical + n - logical) * self.block_size
                if where + self.block_size > self.size:
                    raise FsDamaged(f"ext: journal block {n} lies outside the filesystem")
                return where
        raise FsDamaged(f"ext: journal block {n} is a hole in the journal inode")

    def block(self, n):
        data = self._read(self.offset(n), self.block_size)
        if len(data) != self.block_size:
            raise FsDamaged(f"ext: journal block {n} cannot be read whole")
        return data

    def wrap(self, n):
        """As the kernel's wrap(): one lap back from the end of the log."""
        if n >= self.last:
            if self.fast_commit:
                raise Unsupported("ext: the journal has fast commits and its log wraps; "
                                  "kernels differ on where, so it is not replayed")
            n -= self.last - self.first
        return n

    def tags(self, block):
        """The tags of a descriptor block, read as the kernel reads them
        (the flags as 16 bits, even in a v3 tag's 32-bit field)."""
        pos, end = HEADER_BYTES, self.block_size - self.tail_bytes
        while pos + self.tag_bytes <= end:
            raw = block[pos:pos + self.tag_bytes]
            if self.csum_v3:
                tag = c_jdb2.journal_block_tag3(raw)
                checksum, flags = tag.t_checksum, tag.t_flags & 0xFFFF
            else:
                tag = c_jdb2.journal_block_tag(raw.ljust(12, b"\0"))
                checksum, flags = tag.t_checksum, tag.t_flags
            number = tag.t_blocknr | (tag.t_blocknr_high << 32 if self.is_64bit else 0)
            yield Tag(number, flags, checksum)
            pos += self.tag_bytes + (0 if flags & c_jdb2.JBD2_FLAG_SAME_UUID else UUID_BYTES)
            if flags & c_jdb2.JBD2_FLAG_LAST_TAG:
                break

    # -- checksums v2/v3 (crc32c seeded with the journal's UUID) --

    def tail_ok(self, block):
        """A descriptor or revoke block's checksum, in its last 4 bytes."""
        if not self.csum:
            return True
        provided = struct.unpack_from(">I", block, self.block_size - TAIL_BYTES)[0]
        return _crc32c(self.seed, block[:-TAIL_BYTES] + bytes(TAIL_BYTES)) == provided

    def commit_ok(self, block):
        """A commit block's checksum: over the whole block, or (a commit
        block written whole but only its header meant) over the header and
        zeros, which the kernel also accepts."""
        if not self.csum:
            return True
        at, end = COMMIT_CHECKSUM_OFFSET, COMMIT_CHECKSUM_OFFSET + 4
        provided = struct.unpack_from(">I", block, at)[0]
        blank = block[:at] + bytes(4) + block[end:]
        if _crc32c(self.seed, blank) == provided:
            return True
        partial = blank[:COMMIT_HEADER_BYTES].ljust(self.block_size, b"\0")
        return _crc32c(self.seed, partial) == provided

    def copy_ok(self, tag, data, sequence):
        """A tagged block's checksum: crc32c of the sequence and the copy
        as it lies in the journal (escaped)."""
        if not self.csum:
            return True
        csum = _crc32c(_crc32c(self.seed, struct.pack(">I", sequence)), data)
        return tag.checksum == (csum if self.csum_v3 else csum & 0xFFFF)


def _extent_map(read, size, block_size, i_block, total):
    """[(logical, count, physical)] of an extent-mapped inode, sorted.
    Unwritten extents are left out: the kernel cannot map them either."""
    extents, budget = [], [total // 8 + 16]     # index blocks this tree may make us read

    def walk(buf, depth):
        header = c_ext.ext4_extent_header(buf[:12])
        if header.eh_magic != EXTENT_MAGIC or header.eh_depth > EXTENT_MAX_DEPTH \
                or depth is not None and header.eh_depth != depth:
            raise FsDamaged("ext: the journal inode's extent tree is damaged")
        for i in range(min(header.eh_entries, (len(buf) - 12) // 12)):
            entry = buf[12 + 12 * i:24 + 12 * i]
            if header.eh_depth == 0:
                ext = c_ext.ext4_extent(entry)
                if ext.ee_len <= UNWRITTEN:
                    extents.append((ext.ee_block, ext.ee_len, ext.ee_start_lo | ext.ee_start_hi << 32))
                continue
            idx = c_ext.ext4_extent_idx(entry)
            child = idx.ei_leaf_lo | idx.ei_leaf_hi << 32
            budget[0] -= 1
            if budget[0] < 0 or (child + 1) * block_size > size:
                raise FsDamaged("ext: the journal inode's extent tree is damaged")
            walk(read(child * block_size, block_size), header.eh_depth - 1)

    walk(i_block, None)
    extents.sort()
    for (a, n, _), (b, _, _) in zip(extents, extents[1:]):
        if a + n > b:
            raise FsDamaged("ext: the journal inode's extents overlap")
    return extents


def _indirect_map(read, size, block_size, i_block, total):
    """[(logical, count, physical)] of an inode mapped by (ext2/3)
    indirect blocks, runs of contiguous blocks merged; holes left out."""
    per = block_size // 4
    pointers = struct.unpack("<15I", i_block)

    def expand(pointer, level, want):
        """Up to ``want`` data block numbers under an indirect block."""
        if level == 0:
            yield pointer
            return
        if pointer == 0:
            yield from [0] * min(want, per ** level)
            return
        if (pointer + 1) * block_size > size:
            raise FsDamaged("ext: the journal inode's indirect block is outside the filesystem")
        children = struct.unpack(f"<{per}I", read(pointer * block_size, block_size))
        for child in children:
            if want <= 0:
                return
            n = min(want, per ** (level - 1))
            yield from expand(child, level - 1, n)
            want -= n

    def numbers():
        want = total
        for level, pointer in [(0, p) for p in pointers[:12]] + [(1, pointers[12]), (2, pointers[13]),
                                                                (3, pointers[14])]:
            if want <= 0:
                return
            n = min(want, per ** level)
            yield from expand(pointer, level, n)
            want -= n

    runs = []
    for logical, physical in enumerate(numbers()):
        if not physical:
            continue
        if runs and runs[-1][0] + runs[-1][1] == logical and runs[-1][2] + runs[-1][1] == physical:
            runs[-1][1] += 1
        else:
            runs.append([logical, 1, physical])
    return [tuple(r) for r in runs]


# -- the three passes -----------------------------------------------------------

@dataclass
class Recovery:
    """The state the kernel's recovery_info and revoke table carry between
    the passes, and the overlay the replay builds."""
    journal: Journal
    end: int | None = None          # the first transaction not replayed
    tagged: set = field(default_factory=set)       # blocks some tag names
    revokes: dict = field(default_factory=dict)    # block -> newest revoking tid
    overlay: dict = field(default_factory=dict)    # block -> (offset in view, escaped)
    revoked: int = 0                # tagged copies a revoke cancelled
    failed_commit: int | None = None    # a transaction whose commit checksum is wrong

    @property
    def transactions(self):
        return 0 if self.end is None else (self.end - self.journal.sequence) & 0xFFFFFFFF

    def run(self):
        if not self.journal.start:
            return                  # s_start 0: a clean journal, nothing to replay
        for kind in (SCAN, REVOKE, REPLAY):
            self.one_pass(kind)
            if kind == SCAN and self.failed_commit is not None:
                # The kernel replays up to it, then refuses the mount.
                raise FsDamaged(f"ext: the journal's transaction {self.failed_commit} is corrupt "
                                "(its commit checksum is wrong); the kernel refuses to mount it")
            if kind == SCAN and self.journal.fast_commit and self._fast_commit_pending():
                raise Unsupported("ext: the journal holds fast-commit blocks to replay after "
                                  "its transactions; fast commits are not replayed")

    def one_pass(self, kind):
        """The kernel's do_one_pass.  Where it ``break``s out of its switch
        it goes on with the next block of the same transaction; so does this
        (``continue``).  Its ``goto done`` is a ``break`` here."""
        j = self.journal
        tid, where = j.sequence, j.start
        crc_sum, need_check_commit_time, last_commit_time = 0xFFFFFFFF, False, 0
        # One lap of the log and the block that ends it: a log that runs
        # longer goes round in circles (a crafted one can).
        budget = j.last - j.first + 1

        def spend(n):
            nonlocal budget
            budget -= n
            if budget < 0:
                raise FsDamaged("ext: the journal's log is longer than the journal; damaged?")

        while True:
            if kind != SCAN and _tid_geq(tid, self.end):
                break
            spend(1)
            block = j.block(where)
            here, where = where, j.wrap(where + 1)
            magic, blocktype, sequence = struct.unpack_from(">III", block)
            if magic != MAGIC or sequence != tid:
                break
            if blocktype == c_jdb2.JBD2_DESCRIPTOR_BLOCK:
                if not j.tail_ok(block):
                    if kind != SCAN:
                        raise FsDamaged(f"ext: journal descriptor block {here} has a bad checksum")
                    need_check_commit_time = True   # stale, or damage: the commit will tell
                tags = list(j.tags(block))
                spend(len(tags))
                if kind == SCAN:
                    self.tagged.update(t.block for t in tags)
                    if j.csum_v1 and not need_check_commit_time and self.end is None:
                        crc_sum = crc32_be(crc_sum, block)
                        for _ in tags:
                            try:
                                crc_sum = crc32_be(crc_sum, j.block(where))
                            except FsDamaged:
                                break       # the kernel ends the transaction's sums here
                            finally:
                                where = j.wrap(where + 1)
                        continue
                if kind != REPLAY:
                    where = j.wrap(where + len(tags))
                    continue
                for tag in tags:
                    copy, where = where, j.wrap(where + 1)
                    self._replay(tag, copy, tid)
                continue
            if blocktype == c_jdb2.JBD2_COMMIT_BLOCK:
                if kind != SCAN:
                    tid = (tid + 1) & 0xFFFFFFFF
                    continue
                commit = c_jdb2.commit_header(block[:COMMIT_HEADER_BYTES])
                commit_time = commit.h_commit_sec
                if need_check_commit_time:
                    if commit_time >= last_commit_time:
                        raise FsDamaged(f"ext: the journal's transaction {tid} has a bad checksum")
                    break           # an older journal's leftovers: the log ends here
                if j.csum_v1:
                    if self.end is not None:
                        self.failed_commit = self.end
                        continue
                    found = struct.unpack_from(">I", block, COMMIT_CHECKSUM_OFFSET)[0]
                    good = (crc_sum == found and commit.h_chksum_type == c_jdb2.JBD2_CRC32_CHKSUM
                            and commit.h_chksum_size == c_jdb2.JBD2_CRC32_CHKSUM_SIZE) \
                        or (commit.h_chksum_type == 0 and commit.h_chksum_size == 0 and found == 0)
                    if good:
                        crc_sum = 0xFFFFFFFF
                else:
                    good = j.commit_ok(block)
                if not good:
                    if commit_time < last_commit_time:
                        break       # older leftovers again
                    self.end = tid  # an interrupted commit: replay up to here
                    if not j.async_commit:
                        self.failed_commit = tid
                        continue
                last_commit_time = commit_time
                tid = (tid + 1) & 0xFFFFFFFF
                continue
            if blocktype == c_jdb2.JBD2_REVOKE_BLOCK:
                if kind == SCAN and not j.tail_ok(block):
                    need_check_commit_time = True
                if kind == REVOKE:
                    self._revoke(block, tid)
                continue
            break                   # a block type the kernel does not know: the end
        if kind == SCAN:
            if self.end is None:
                self.end = tid
        elif self.end != tid:
            raise FsDamaged(f"ext: journal recovery pass {kind} ended at transaction {tid}, "
                            f"not {self.end}")

    def _revoke(self, block, tid):
        j = self.journal
        used = struct.unpack_from(">I", block, HEADER_BYTES)[0]
        if used > j.block_size - j.tail_bytes:
            raise FsDamaged("ext: a journal revoke block claims more than a block")
        fmt, width = (">Q", 8) if j.is_64bit else (">I", 4)
        for at in range(REVOKE_HEADER_BYTES, used - width + 1, width):
            number = struct.unpack_from(fmt, block, at)[0]
            # Only blocks some transaction copies can be revoked to effect;
            # keeping just those bounds the table by the log's length.
            if number in self.tagged:
                known = self.revokes.get(number)
                if known is None or _tid_gt(tid, known):
                    self.revokes[number] = tid

    def _replay(self, tag, copy, tid):
        j = self.journal
        where = j.offset(copy)
        known = self.revokes.get(tag.block)
        if known is not None and not _tid_gt(tid, known):
            self.revoked += 1
            return
        if j.csum and not j.copy_ok(tag, j.block(copy), tid):
            raise FsDamaged(f"ext: the journal's copy of block {tag.block} has a bad checksum")
        if (tag.block + 1) * j.block_size > j.size:
            raise FsDamaged(f"ext: the journal replays block {tag.block}, past the filesystem")
        self.overlay[tag.block] = (where, bool(tag.flags & c_jdb2.JBD2_FLAG_ESCAPE))

    def _fast_commit_pending(self):
        """Whether ext4 would replay fast commits after the transactions:
        the fast-commit area (after the log, past one spare block) starts
        with a head tag naming the first transaction not replayed."""
        j = self.journal
        block = j.block(j.last + 1)
        tag, length = struct.unpack_from("<HH", block)
        if tag != FC_TAG_HEAD or length < 8:
            return False
        return struct.unpack_from("<I", block, 8)[0] == self.end


# -- the replayed view ------------------------------------------------------------

class ReplayedView:
    """``read(offset, length)`` of the filesystem after recovery: blocks of
    the overlay from their journal copies, the ext superblock with
    needs_recovery cleared, the rest from the view."""

    def __init__(self, read, size, block_size, recovery):
        self._read, self.size, self.block_size = read, size, block_size
        self._overlay = recovery.overlay
        self._blocks = sorted(recovery.overlay)
        self.transactions = recovery.transactions
        self.replayed = len(recovery.overlay)
        self.revoked = recovery.revoked
        self.escaped = sum(escaped for _, escaped in recovery.overlay.values())
        self._superblock = None
        self._superblock = self._recovered_superblock()

    def _recovered_superblock(self):
        sb = bytearray(self(SUPERBLOCK, SUPERBLOCK))
        if len(sb) != SUPERBLOCK:
            raise FsDamaged("ext: the superblock cannot be read after replay")
        incompat = struct.unpack_from("<I", sb, EXT_INCOMPAT_OFFSET)[0]
        struct.pack_into("<I", sb, EXT_INCOMPAT_OFFSET, incompat & ~EXT_INCOMPAT_RECOVER)
        if struct.unpack_from("<I", sb, 0x64)[0] & EXT_RO_COMPAT_METADATA_CSUM:
            checksum = _crc32c(0xFFFFFFFF, bytes(sb[:EXT_CHECKSUM_OFFSET]))
            struct.pack_into("<I", sb, EXT_CHECKSUM_OFFSET, checksum)
        return bytes(sb)

    def __call__(self, offset, length):
        if offset < 0:
            raise FsDamaged("a read before the start of the filesystem")
        end = min(offset + max(length, 0), self.size)
        bs, pieces, pos = self.block_size, [], offset
        i = bisect.bisect_left(self._blocks, offset // bs)
        while pos < end:
            if i < len(self._blocks) and self._blocks[i] * bs < end:
                block = self._blocks[i]
                start = block * bs
                i += 1
            else:
                block, start = None, end
            if pos < start:
                piece = self._read(pos, start - pos)
                pieces.append(piece)
                if len(piece) != start - pos:
                    break           # the view ended early: so does this read
                pos = start
            if block is not None:
                stop = min(end, start + bs)
                pieces.append(self._copy(block, pos - start, stop - pos))
                pos = stop
        data = b"".join(pieces)
        sb = self._superblock
        lo, hi = max(offset, SUPERBLOCK), min(offset + len(data), 2 * SUPERBLOCK)
        if sb is not None and lo < hi:
            data = data[:lo - offset] + sb[lo - SUPERBLOCK:hi - SUPERBLOCK] + data[hi - offset:]
        return data

    def _copy(self, block, skip, length):
        where, escaped = self._overlay[block]
        data = self._read(where + skip, length)
        if len(data) != length:
            raise FsDamaged(f"ext: the journal's copy of block {block} cannot be read")
        if escaped and skip < 4:
            # The copy's first 4 bytes were the journal's magic, zeroed so
            # that a scan would not take it for a journal block.
            head = MAGIC_BYTES[skip:min(4, skip + length)]
            data = head + data[len(head):]
        return data
