"""The internal snapshot table (``qemu-img snapshot -c``).

``snapfs inspect`` lists internal snapshots, and ``snapfs vm add`` turns
each into a snapfs snapshot (snapfs/ops/internal_snapshots.py; reading a
snapshot's tables: states.py).  Entries are bounded by the table's position
in the file and by QEMU's limits on names and extra data.
"""

import os
from dataclasses import dataclass
from datetime import datetime, timezone

from construct import ConstructError

from ..errors import CorruptImage
from . import structs as S

MAX_TABLE_BYTES = 64 << 20   # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
MAX_EXTRA_DATA = 1024        # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA


@dataclass(frozen=True)
class InternalSnapshot:
    id: str
    name: str
    date: datetime
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    l1_table_offset: int
    l1_size: int
    date_nsec: int = 0
    # The name as stored: ``name`` shows bytes that are not UTF-8 as U+FFFD,
    # which is fine for a listing but not for naming a snapshot after it.
    raw_name: bytes = b""


def read_snapshot_table(fd, hdr):
    """Parse the snapshot table.  Raises CorruptImage if it leaves the file."""
    if not hdr.nb_snapshots:
        return []
    end = min(hdr.file_size, hdr.snapshots_offset + MAX_TABLE_BYTES)
    raw = os.pread(fd, end - hdr.snapshots_offset, hdr.snapshots_offset)
    pos = 0
    result = []
    for _ in range(hdr.nb_snapshots):
        fixed = raw[pos:pos + S.SNAPSHOT_FIXED_LENGTH]
        if len(fixed) < S.SNAPSHOT_FIXED_LENGTH:
            raise CorruptImage(hdr.path, "snapshot table runs past the end of the file")
        try:
            entry = S.SnapshotEntry.parse(raw[pos:])
        except ConstructError:
            raise CorruptImage(hdr.path, "snapshot table entry runs past the end of the file") from None
        if entry.extra_data_size > MAX_EXTRA_DATA:
            raise CorruptImage(hdr.path, "snapshot extra data too large")
        length = (S.SNAPSHOT_FIXED_LENGTH + entry.extra_data_size
                  + entry.id_str_size + entry.name_size)
        pos += length + (-length % 8)
        if entry.l1_table_offset % hdr.cluster_size or entry.l1_size * 8 > (32 << 20) \
                or entry.l1_table_offset + entry.l1_size * 8 > hdr.file_size:
            raise CorruptImage(hdr.path, "snapshot L1 table lies outside the file")
        extra = entry.extra_data
        disk_size = None
        if len(extra) >= 16:
            disk_size = int.from_bytes(extra[8:16], "big")
        result.append(InternalSnapshot(
            id=entry.id_str.decode("utf-8", "replace"),
            name=entry.name.decode("utf-8", "replace"),
            date=datetime.fromtimestamp(entry.date_sec, timezone.utc),
            vm_clock_nsec=entry.vm_clock_nsec,
            vm_state_size=entry.vm_state_size,
            disk_size=disk_size,
            l1_table_offset=entry.l1_table_offset,
            l1_size=entry.l1_size,
            date_nsec=entry.date_nsec,
            raw_name=bytes(entry.name),
        ))
    return result
