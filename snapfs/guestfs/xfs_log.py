"""Whether an XFS log was left clean, as the kernel decides at mount.

XFS has no "clean" flag: a mount finds the head of the circular log (the
block where the cycle numbers stamped on every 512-byte block drop) and
looks at the last record before it.  If that record is an unmount record
the filesystem was unmounted cleanly; otherwise the log holds
transactions a mount would replay, which snapfs does not do, so the
metadata on disk may be inconsistent.

This follows the kernel's xlog_find_head / xlog_check_unmount_rec, but
where the kernel would have to look further (torn writes near the head,
a record it cannot place) it answers "not clean": refusing a tree is
better than showing a half-written one.
"""

from __future__ import annotations

import struct

BB = 512                        # the log's basic block
MAGIC = 0xFEEDBABE              # XLOG_HEADER_MAGIC_NUM
VERSION_2 = 0x2                 # XLOG_VERSION_2: headers may span blocks
HEADER_CYCLE_SIZE = 32 * 1024   # XLOG_HEADER_CYCLE_SIZE
UNMOUNT_TRANS = 0x20            # XLOG_UNMOUNT_TRANS in an op header's flags
# How far before the head the kernel looks for in-flight writes: all
# in-core logs of the biggest size (XLOG_MAX_ICLOGS << XLOG_MAX_RECORD_BSHIFT).
SCAN_BBS = (8 << 18) // BB


def log_is_clean(read, log_offset, log_bbs) -> tuple[bool, str]:
    """(clean?, why) for the internal log at byte ``log_offset`` of
    ``log_bbs`` basic blocks."""
    if log_bbs < 2:
        return False, "the log is too small"

    def cycles(first, count):
        data = read(log_offset + first * BB, count * BB)
        if len(data) != count * BB:
            raise EOFError("the log ends past the end of the filesystem")
        return [_cycle(data, i * BB) for i in range(count)]

    def cycle(block):
        return cycles(block, 1)[0][0]

    first_cycle, last_cycle = cycle(0), cycle(log_bbs - 1)
    if first_cycle == 0:
        return True, "the log was never written"
    if last_cycle == 0:
        # The first pass over the log: the head is the first unwritten block.
        head = _first_block(lambda b: cycle(b) == 0, 0, log_bbs - 1)
        head_cycle = first_cycle
    elif last_cycle == first_cycle:
        head, head_cycle = 0, first_cycle + 1        # wrapped just at the end
    elif last_cycle == first_cycle - 1:
        head = _first_block(lambda b: cycle(b) == last_cycle, 0, log_bbs - 1)
        head_cycle = first_cycle
    else:
        return False, "the log's cycle numbers do not follow each other"

    # Every block just before the head must carry the head's cycle (the
    # one before it where the log wraps): anything else is a write that
    # was in flight, which only the kernel's torn-write handling sorts out.
    window = min(SCAN_BBS, log_bbs)
    start = head - window
    if start >= 0:
        seen = cycles(start, window)
    else:               # the window wraps to the end of the log
        seen = cycles(log_bbs + start, -start) + (cycles(0, head) if head else [])
    before = [((start + i) % log_bbs, c) for i, c in enumerate(seen)][::-1]
    header = None
    for block, (block_cycle, is_header) in before:
        expected = head_cycle if block < head else head_cycle - 1
        if block_cycle != expected:
            return False, "writes to the log were in flight"
        if is_header:
            header = block
            break
    if header is None:
        return False, "no log record near the head of the log"

    rec = read(log_offset + header * BB, BB)
    _magic, _cycle_, version, length, _lsn, _tail, _crc, _prev, num_ops = \
        struct.unpack_from(">IIIIQQIII", rec, 0)
    hblks = 1
    if version & VERSION_2:
        h_size = struct.unpack_from(">I", rec, 320)[0]
        if h_size > HEADER_CYCLE_SIZE:
            hblks = -(-h_size // HEADER_CYCLE_SIZE)
    after = (header + hblks + -(-length // BB)) % log_bbs
    if after != head % log_bbs or num_ops != 1:
        return False, "the last log record is not an unmount record"
    op = read(log_offset + ((header + hblks) % log_bbs) * BB, 12)
    if len(op) != 12 or not op[9] & UNMOUNT_TRANS:
        return False, "the last log record is not an unmount record"
    return True, "the log ends with an unmount record"


def _cycle(data, at):
    """(cycle, is a record header) of the basic block at ``at``: a record
    header holds its cycle after the magic, every other block is stamped
    with it in its first word (as the kernel's xlog_get_cycle)."""
    first, second = struct.unpack_from(">II", data, at)
    return (second, True) if first == MAGIC else (first, False)


def _first_block(is_after, lo, hi):
    """The first block in [lo, hi] for which ``is_after`` holds (it holds
    for ``hi``), by bisection: the log is written in order."""
    while lo < hi:
        mid = (lo + hi) // 2
        if is_after(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
