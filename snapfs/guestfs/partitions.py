"""Find the partitions of a raw disk view (MBR or GPT), numbered like Linux.

snapfs shows each partition of a VM disk beside the disk as
``<disk>-part<N>.raw``; ``N`` must match what the guest's kernel calls
``/dev/vdaN`` so users find what they expect.  Numbering follows
``block/partitions/msdos.c`` and ``efi.c``:

* MBR: primaries keep their slot number 1-4 (empty slots are skipped, the
  numbers are kept); logical partitions in the extended partition are
  5, 6, 7... in EBR chain order.  The extended container takes its slot
  number but is not returned (Linux only exposes it as a 1 KiB stub).
* GPT (chosen when the MBR holds a protective 0xEE entry): entry index + 1,
  empty entries (all-zero type GUID) skipped, numbers kept.  A primary
  header that fails its CRCs falls back to the backup header at the last LBA.

The input is untrusted (any imported image): garbage yields ``[]`` or fewer
partitions, never an exception; partitions starting past the disk end are
dropped and ones running past it are clipped.

Limitations:

* 512-byte logical sectors only (4Kn disks are not recognised).
* No hybrid MBR handling: any 0xEE entry means GPT, as for Linux.
* Linux quirks not reproduced: an EBR chain that loops stops at the first
  revisited EBR (Linux repeats it up to its 255-partition limit); GPT
  partitions running past the disk end are clipped (Linux drops them); the
  GPT "usable LBA" range is not checked, so a shrunk disk still shows its
  (clipped) partitions; MBR type-0 entries with a size are reported, as Linux
  does.  No BSD/Solaris/AIX/Disk Manager sub-tables.
* Partition numbers above 255 are dropped (Linux's DISK_MAX_PARTS limit).
* At most about 2.2 MiB is read: MBR, 256 EBRs, two GPT headers and two
  entry arrays of at most 1 MiB each.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

from construct import (Array, Bytes, Const, ConstructError, Int8ul, Int32ul,
                       Int64ul, Padding, Struct)

SECTOR = 512
MAX_PARTITION_NUMBER = 255   # Linux DISK_MAX_PARTS (256) minus the whole disk
MAX_EBRS = 256               # logical partition chain length we follow
MAX_GPT_ENTRIES = 1024
MAX_GPT_ENTRY_SIZE = 4096
MAX_GPT_ARRAY_BYTES = 1 << 20
EXTENDED_TYPES = {0x05, 0x0F, 0x85}   # DOS, Win98 LBA, Linux extended
GPT_PROTECTIVE_TYPE = 0xEE
EMPTY_GUID = bytes(16)

MBR_ENTRY = (
    "MBR/EBR partition entry, 16 bytes; lba_start and sectors count 512-byte sectors."
) * Struct(
    "status" / Int8ul,         # 0x80 bootable, 0x00 not; other values: not a table
    "chs_first" / Bytes(3),    # legacy CHS address, ignored
    "type" / Int8ul,           # partition type id, e.g. 0x83 Linux, 0x05 extended
    "chs_last" / Bytes(3),     # legacy CHS address, ignored
    "lba_start" / Int32ul,     # sectors; MBR: from disk start, EBR: see _logicals
    "sectors" / Int32ul,       # length in sectors; 0 = unused entry
)

MBR = (
    "Master boot record: sector 0, 512 bytes; 4 entries at byte 446, then 55 AA."
) * Struct(
    Padding(446),              # boot code and disk signature, unused here
    "entries" / Array(4, MBR_ENTRY),
    "signature" / Const(b"\x55\xaa"),
)

EBR = (
    "Extended boot record: one 512-byte sector per logical partition, MBR layout."
) * Struct(
    Padding(446),              # normally zero
    "entries" / Array(4, MBR_ENTRY),  # usually [data partition, link to next EBR]
    "signature" / Const(b"\x55\xaa"),
)

GPT_HEADER = (
    "GPT header: 92 bytes at LBA 1 (backup at the last LBA); LBAs are 512-byte sectors."
) * Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,       # bytes covered by header_crc32 (92..512)
    "header_crc32" / Int32ul,      # CRC32 of the header with this field zeroed
    "reserved" / Int32ul,
    "my_lba" / Int64ul,            # LBA of this header copy
    "alternate_lba" / Int64ul,     # LBA of the other copy
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),       # mixed-endian GUID
    "entries_lba" / Int64ul,       # LBA of the entry array
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,        # bytes per entry, 128 * 2**n
    "entries_crc32" / Int32ul,     # CRC32 of num_entries * entry_size bytes
)

GPT_ENTRY = (
    "GPT partition entry: first 128 bytes of each entry_size slot; LBAs are 512-byte sectors."
) * Struct(
    "type_guid" / Bytes(16),       # mixed-endian GUID; all zero = unused entry
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,          # inclusive
    "attributes" / Int64ul,
    "name" / Bytes(72),            # UTF-16LE
)


class TableEntry(NamedTuple):
    """One MBR_ENTRY, parsed with ``struct``: a mount lists every snapshot's
    partitions, and construct takes ~20x longer per sector."""
    status: int
    chs_first: bytes
    type: int
    chs_last: bytes
    lba_start: int
    sectors: int


_TABLE_ENTRIES = struct.Struct("<" + "B3sB3sII" * 4)   # MBR.entries / EBR.entries
_SIGNATURE_AT = 510
assert _TABLE_ENTRIES.size == 4 * MBR_ENTRY.sizeof() and MBR.sizeof() == EBR.sizeof() == SECTOR


def _table_entries(sector: bytes | None) -> list[TableEntry] | None:
    """The four entries of an MBR or EBR sector (the MBR / EBR layout above),
    or None unless the sector is whole and ends in 55 AA."""
    if sector is None or len(sector) != SECTOR or sector[_SIGNATURE_AT:] != b"\x55\xaa":
        return None
    fields = _TABLE_ENTRIES.unpack_from(sector, 446)
    return [TableEntry(*fields[i:i + 6]) for i in range(0, 24, 6)]


@dataclass(frozen=True)
class Partition:
    number: int      # Linux partition number
    start: int       # byte offset in the disk
    length: int      # bytes
    scheme: str      # "mbr" or "gpt"
    type: str        # MBR: "0x83" style hex string; GPT: lower-case type GUID string


Reader = Callable[[int, int], bytes]


def find_partitions(read: Reader, disk_size: int) -> list[Partition]:
    """read(offset, length) returns bytes of the disk view (short at the end of the disk)."""
    mbr = _table_entries(_read(read, disk_size, 0, SECTOR))
    if mbr is None:
        return []
    if any(e.type == GPT_PROTECTIVE_TYPE for e in mbr):
        return _gpt_partitions(read, disk_size)
    return _mbr_partitions(read, disk_size, mbr)


def _read(read: Reader, disk_size: int, offset: int, length: int) -> bytes | None:
    """The bytes [offset, offset+length), or None unless they all lie on the disk."""
    if offset < 0 or offset + length > disk_size:
        return None
    data = bytes(read(offset, length))
    return data if len(data) == length else None


def _parse(layout: Struct, data: bytes | None):
    if data is None:
        return None
    try:
        return layout.parse(data)
    except ConstructError:   # bad signature
        return None


def _make(number: int, start: int, length: int, scheme: str, type_: str,
          disk_size: int) -> Partition | None:
    """Build a Partition clipped to the disk, or None if nothing of it is on the disk."""
    if number > MAX_PARTITION_NUMBER or start >= disk_size or length <= 0:
        return None
    return Partition(number, start, min(length, disk_size - start), scheme, type_)


def _mbr_partitions(read: Reader, disk_size: int, mbr: list[TableEntry]) -> list[Partition]:
    # A FAT/NTFS boot sector also ends in 55 AA; Linux tells it apart from a
    # partition table by the boot indicators, which must all be 0x00 or 0x80.
    if any(e.status not in (0x00, 0x80) for e in mbr):
        return []
    found: list[Partition | None] = []
    next_logical = 5
    for slot, entry in enumerate(mbr, start=1):
        if entry.sectors == 0:
            continue
        start, length = entry.lba_start * SECTOR, entry.sectors * SECTOR
        if entry.type in EXTENDED_TYPES:
            logicals = _logicals(read, disk_size, start, length, next_logical)
            next_logical += len(logicals)
            found.extend(logicals)
        else:
            found.append(_make(slot, start, length, "mbr", f"0x{entry.type:02x}", disk_size))
    return sorted((p for p in found if p is not None), key=lambda p: p.number)


def _logicals(read: Reader, disk_size: int, ext_start: int, ext_length: int,
              number: int) -> list[Partition | None]:
    """Walk the EBR chain of one extended partition, as Linux's parse_extended().

    Data entries are relative to their own EBR; link entries are relative to
    the start of the extended partition.  Returns one item per number used
    (None where the partition lies off the disk) so numbering stays right.
    """
    found: list[Partition | None] = []
    ebr_start, ebr_span = ext_start, ext_length
    seen: set[int] = set()
    while len(seen) < MAX_EBRS and ebr_start not in seen:
        seen.add(ebr_start)
        ebr = _table_entries(_read(read, disk_size, ebr_start, SECTOR))
        if ebr is None:
            break
        for i, entry in enumerate(ebr):
            if entry.sectors == 0 or entry.type in EXTENDED_TYPES:
                continue
            offset, length = entry.lba_start * SECTOR, entry.sectors * SECTOR
            start = ebr_start + offset
            # Entries 3 and 4 often hold garbage: Linux only trusts them
            # when they fit inside this EBR's span and the extended partition.
            if i >= 2 and (offset + length > ebr_span or start < ext_start
                           or start + length > ext_start + ext_length):
                continue
            if number + len(found) > MAX_PARTITION_NUMBER:
                return found
            found.append(_make(number + len(found), start, length, "mbr",
                               f"0x{entry.type:02x}", disk_size))
        link = next((e for e in ebr if e.sectors and e.type in EXTENDED_TYPES), None)
        if link is None:
            break
        ebr_start, ebr_span = ext_start + link.lba_start * SECTOR, link.sectors * SECTOR
    return found


def _gpt_partitions(read: Reader, disk_size: int) -> list[Partition]:
    last_lba = disk_size // SECTOR - 1
    table = _gpt_table(read, disk_size, 1)
    if table is None and last_lba > 1:
        table = _gpt_table(read, disk_size, last_lba)   # backup header
    if table is None:
        return []
    header, array = table
    found = []
    for index in range(header.num_entries):
        raw = array[index * header.entry_size:][:GPT_ENTRY.sizeof()]
        if raw[:16] == EMPTY_GUID:   # unused entry; skip the (slow) parse
            continue
        entry = GPT_ENTRY.parse(raw)
        if entry.last_lba < entry.first_lba:
            continue
        part = _make(index + 1, entry.first_lba * SECTOR,
                     (entry.last_lba - entry.first_lba + 1) * SECTOR, "gpt",
                     str(uuid.UUID(bytes_le=entry.type_guid)), disk_size)
        if part is not None:
            found.append(part)
    return found


def _gpt_table(read: Reader, disk_size: int, lba: int):
    """(header, entry array bytes) of the GPT header at lba, or None if it fails a check."""
    sector = _read(read, disk_size, lba * SECTOR, SECTOR)
    header = _parse(GPT_HEADER, sector[:GPT_HEADER.sizeof()] if sector else None)
    if header is None or not GPT_HEADER.sizeof() <= header.header_size <= SECTOR:
        return None
    covered = bytearray(sector[:header.header_size])
    covered[16:20] = bytes(4)   # the CRC is computed with its own field zeroed
    if zlib.crc32(covered) != header.header_crc32 or header.my_lba != lba:
        return None
    size, count = header.entry_size, header.num_entries
    # Bound what an untrusted header can make us read; 128 * 2**n is the spec.
    if (size < GPT_ENTRY.sizeof() or size > MAX_GPT_ENTRY_SIZE or size & (size - 1)
            or count > MAX_GPT_ENTRIES or size * count > MAX_GPT_ARRAY_BYTES):
        return None
    array = _read(read, disk_size, header.entries_lba * SECTOR, size * count)
    if array is None or zlib.crc32(array) != header.entries_crc32:
        return None
    return header, array
