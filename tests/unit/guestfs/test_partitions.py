"""snapfs.guestfs.partitions against tables written, and read back, by real tools.

Images are small sparse files; sfdisk writes MBR tables, sgdisk writes GPTs,
and ``sfdisk --json`` (util-linux's independent parser) is the reference for
partition numbers, starts and sizes.
"""

import json
import os
import re
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.guestfs.partitions import Partition, find_partitions

MiB = 1 << 20
SECTOR = 512
EXTENDED = {"5", "f", "85"}

# Well-known GPT type GUIDs (UEFI spec / sgdisk type codes), written out by hand.
LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"      # sgdisk 8300
EFI_SYSTEM = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"    # sgdisk ef00
LINUX_SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"    # sgdisk 8200
LINUX_LVM = "e6d6d379-f507-44c2-a23c-238f2a3df928"     # sgdisk 8e00

MBR_LOGICALS = """label: dos
size=8MiB, type=83
size=8MiB, type=82
type=5
size=8MiB, type=83
size=8MiB, type=83
type=83
"""


def run(*args, input=None):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, input=input)


def blank_image(path, size=64 * MiB):
    run("truncate", "-s", str(size), str(path))
    return path


def sfdisk_image(path, script, size=64 * MiB):
    blank_image(path, size)
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), input=script)
    return path


def sgdisk_image(path, *args, size=64 * MiB):
    blank_image(path, size)
    run("sgdisk", *args, str(path))
    return path


def scan(path):
    """find_partitions on an image file, reading it with pread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return find_partitions(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def reference(path):
    """Partitions as sfdisk --json reports them: {number: (start, length, type)}."""
    table = json.loads(run("sfdisk", "--json", str(path)).stdout)["partitiontable"]
    assert table["sectorsize"] == SECTOR
    parts = {}
    for p in table["partitions"]:
        if table["label"] == "dos" and p["type"] in EXTENDED:
            continue   # the container: Linux shows only a 1 KiB stub
        number = int(re.search(r"(\d+)$", p["node"]).group(1))
        parts[number] = (p["start"] * SECTOR, p["size"] * SECTOR, p["type"].lower())
    return parts


def as_reference(parts, scheme):
    assert all(p.scheme == scheme for p in parts)
    # sfdisk prints MBR types as bare hex ("83"); ours are "0x83".
    return {p.number: (p.start, p.length, p.type.removeprefix("0x")) for p in parts}


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def mbr_entry(type_, lba_start, sectors, status=0):
    return struct.pack("<B3sB3sII", status, bytes(3), type_, bytes(3), lba_start, sectors)


# --- MBR --------------------------------------------------------------------

def test_mbr_primaries_extended_and_logicals(tmp_path):
    image = sfdisk_image(tmp_path / "disk.img", MBR_LOGICALS)
    parts = scan(image)
    assert as_reference(parts, "mbr") == reference(image)
    assert [p.number for p in parts] == [1, 2, 5, 6, 7]
    assert [p.type for p in parts] == ["0x83", "0x82", "0x83", "0x83", "0x83"]
    assert parts[0] == Partition(1, 1 * MiB, 8 * MiB, "mbr", "0x83")


def test_mbr_empty_slot_keeps_numbers(tmp_path):
    image = sfdisk_image(tmp_path / "disk.img", "label: dos\nsize=8MiB\nsize=8MiB\nsize=8MiB\n")
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--delete", str(image), "2")
    parts = scan(image)
    assert [p.number for p in parts] == [1, 3]
    assert as_reference(parts, "mbr") == reference(image)


def test_mbr_partition_table_types_are_hex(tmp_path):
    image = sfdisk_image(tmp_path / "disk.img", "label: dos\nsize=8MiB, type=8e\nsize=8MiB, type=c\n")
    assert [p.type for p in scan(image)] == ["0x8e", "0x0c"]


def ebr_chain(path):
    """Byte offsets of the EBRs, following the link entries by hand (struct)."""
    table = json.loads(run("sfdisk", "--json", str(path)).stdout)["partitiontable"]
    ext = next(p["start"] * SECTOR for p in table["partitions"] if p["type"] == "5")
    chain, ebr = [], ext
    with open(path, "rb") as f:
        while True:
            chain.append(ebr)
            f.seek(ebr + 446 + 16)   # second entry: link to the next EBR
            _, _, type_, _, rel_lba, _ = struct.unpack("<B3sB3sII", f.read(16))
            if type_ != 0x05:
                return ext, chain
            ebr = ext + rel_lba * SECTOR   # relative to the extended partition


@pytest.mark.parametrize("loop_from, expected", [(0, [1, 2, 5]), (2, [1, 2, 5, 6, 7])])
def test_ebr_loop_terminates(tmp_path, loop_from, expected):
    """An EBR linking to itself, or the last EBR linking back to the first, ends the chain."""
    image = sfdisk_image(tmp_path / "disk.img", MBR_LOGICALS)
    ext, chain = ebr_chain(image)
    assert len(chain) == 3 and chain[0] == ext
    # Link LBA 0 = the start of the extended partition = the first EBR.
    patch(image, chain[loop_from] + 446 + 16, mbr_entry(0x05, 0, 4096))
    assert [p.number for p in scan(image)] == expected


def test_fat_like_boot_sector_is_not_a_table(tmp_path):
    image = sfdisk_image(tmp_path / "disk.img", MBR_LOGICALS)
    patch(image, 446, b"\x29")   # boot indicator must be 0x00 or 0x80
    assert scan(image) == []


def test_no_signature_or_tiny_disk(tmp_path):
    assert scan(blank_image(tmp_path / "blank.img")) == []
    assert find_partitions(lambda off, n: b"", 0) == []
    assert find_partitions(lambda off, n: b"\x55\xaa"[:n], 100) == []


# --- GPT --------------------------------------------------------------------

GPT_ARGS = ("-n", "1:0:+8M", "-t", "1:8300", "-n", "3:0:+8M", "-t", "3:ef00",
            "-n", "4:0:+4M", "-t", "4:8200", "-n", "6:0:0", "-t", "6:8e00")


@pytest.fixture
def gpt_image(tmp_path):
    return sgdisk_image(tmp_path / "disk.img", *GPT_ARGS)


def test_gpt_matches_sfdisk(gpt_image):
    parts = scan(gpt_image)
    assert as_reference(parts, "gpt") == reference(gpt_image)
    assert [p.number for p in parts] == [1, 3, 4, 6]
    assert [p.type for p in parts] == [LINUX_FS, EFI_SYSTEM, LINUX_SWAP, LINUX_LVM]
    assert parts[0] == Partition(1, 1 * MiB, 8 * MiB, "gpt", LINUX_FS)
    # "-n 6:0:0" ends at the last usable LBA; the backup GPT (32 sectors of
    # entries + header) fills the last 33 sectors.
    assert parts[-1].start + parts[-1].length == 64 * MiB - 33 * SECTOR


def test_gpt_bad_primary_header_uses_backup(gpt_image):
    expected = scan(gpt_image)
    patch(gpt_image, SECTOR + 56, b"\xff" * 16)   # disk GUID: header CRC now wrong
    assert scan(gpt_image) == expected
    patch(gpt_image, SECTOR, bytes(SECTOR))       # primary header gone entirely
    assert scan(gpt_image) == expected


def test_gpt_bad_primary_entries_uses_backup(gpt_image):
    expected = scan(gpt_image)
    patch(gpt_image, 2 * SECTOR + 56, b"X")       # name of entry 1: array CRC wrong
    assert scan(gpt_image) == expected


def test_gpt_bad_entries_and_bad_backup_is_empty(gpt_image):
    patch(gpt_image, 2 * SECTOR + 56, b"X")
    patch(gpt_image, 64 * MiB - SECTOR + 56, b"\xff" * 16)  # backup header CRC wrong
    # Alone, either copy would do (see the two tests above); both bad: nothing.
    assert scan(gpt_image) == []


def test_protective_mbr_without_gpt_is_empty(gpt_image):
    patch(gpt_image, SECTOR, bytes(SECTOR))
    patch(gpt_image, 64 * MiB - SECTOR, bytes(SECTOR))
    assert scan(gpt_image) == []


def test_gpt_huge_entry_array_is_refused(gpt_image):
    """A header asking for a 128 MiB entry array (CRC valid) is rejected unread."""
    with open(gpt_image, "rb") as f:
        header = bytearray(f.read(2 * SECTOR)[SECTOR:SECTOR + 92])
    header[80:84] = struct.pack("<I", 1 << 20)     # num_entries
    header[16:20] = bytes(4)
    header[16:20] = struct.pack("<I", zlib.crc32(header))
    patch(gpt_image, SECTOR, header)
    patch(gpt_image, 64 * MiB - SECTOR, bytes(SECTOR))
    fd = os.open(gpt_image, os.O_RDONLY)
    read_sizes = []

    def read(off, n):
        read_sizes.append(n)
        return os.pread(fd, n, off)

    try:
        assert find_partitions(read, 64 * MiB) == []
    finally:
        os.close(fd)
    assert sum(read_sizes) <= 4 * SECTOR


# --- clipping -----------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["mbr", "gpt"])
def test_partition_past_disk_end_is_clipped(tmp_path, scheme):
    path = tmp_path / "disk.img"
    if scheme == "mbr":
        sfdisk_image(path, "label: dos\nsize=16MiB\nsize=16MiB\nsize=16MiB\n")
    else:
        sgdisk_image(path, "-n", "1:0:+16M", "-n", "2:0:+16M", "-n", "3:0:+16M")
    run("truncate", "-s", str(24 * MiB), str(path))   # disk shrunk under the table
    parts = scan(path)
    assert [(p.number, p.start, p.length) for p in parts] == [
        (1, 1 * MiB, 16 * MiB),
        (2, 17 * MiB, 7 * MiB),    # clipped at the new end; 3 starts past it
    ]


# --- untrusted input ----------------------------------------------------------

def check_sane(data: bytes, disk_size: int):
    read_total = 0

    def read(off, n):
        nonlocal read_total
        read_total += n
        return data[off:off + n]

    parts = find_partitions(read, disk_size)
    numbers = [p.number for p in parts]
    assert len(set(numbers)) == len(numbers)
    for p in parts:
        assert 1 <= p.number <= 255 and p.scheme in ("mbr", "gpt")
        assert 0 <= p.start < disk_size and p.length > 0
        assert p.start + p.length <= disk_size
    assert read_total <= 4 * MiB


def with_header_bits(data, mbr_sig, protective, gpt):
    """Plant the magic numbers and CRCs that random bytes would almost never hit."""
    data = bytearray(data)
    if len(data) < SECTOR:
        return bytes(data)
    if mbr_sig:
        data[510:512] = b"\x55\xaa"
        for slot in range(4):
            data[446 + 16 * slot] &= 0x80   # valid boot indicators
    if protective:
        data[446 + 4] = 0xEE
    if gpt and len(data) >= 3 * SECTOR:
        # Valid header at LBA 1 over random entries at LBA 2: exercises the
        # entry parsing and clipping with random LBAs.
        count = data[600] % ((len(data) - 2 * SECTOR) // 128 + 1)
        for entry in range(2 * SECTOR, 2 * SECTOR + 128 * count, 128):
            for lba in (entry + 32, entry + 40):   # first/last LBA < 32: mostly on disk
                data[lba:lba + 8] = bytes([data[lba] & 31]) + bytes(7)
        struct.pack_into("<8sIII", data, SECTOR, b"EFI PART", 0x10000, 92, 0)
        struct.pack_into("<Q", data, SECTOR + 24, 1)            # my_lba
        struct.pack_into("<QIII", data, SECTOR + 72, 2, count, 128,
                         zlib.crc32(data[2 * SECTOR:2 * SECTOR + 128 * count]))
        struct.pack_into("<I", data, SECTOR + 16, zlib.crc32(data[SECTOR:SECTOR + 92]))
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=16 * SECTOR), mbr_sig=st.booleans(),
       protective=st.booleans(), gpt=st.booleans(),
       size_delta=st.integers(min_value=-1024, max_value=1 << 40))
def test_random_bytes_never_raise(data, mbr_sig, protective, gpt, size_delta):
    data = with_header_bits(data, mbr_sig, protective, gpt)
    check_sane(data, len(data))
    check_sane(data, max(0, len(data) + size_delta))   # size disagreeing with data


@pytest.fixture(scope="module")
def tool_images(tmp_path_factory):
    """Bytes of a small sfdisk MBR image (with logicals) and a small sgdisk GPT image."""
    base = tmp_path_factory.mktemp("fuzz")
    mbr = sfdisk_image(base / "mbr.img", "label: dos\nsize=64KiB\ntype=5\nsize=64KiB\nsize=64KiB\n",
                       size=2 * MiB)
    gpt = sgdisk_image(base / "gpt.img", "-a", "1", "-n", "1:34:+64K", "-n", "3:0:+64K",
                       size=1 * MiB)
    return [path.read_bytes() for path in (mbr, gpt)]


EDITS = st.lists(st.tuples(st.booleans(), st.integers(0, 70 * SECTOR),
                           st.binary(min_size=1, max_size=16)), max_size=8)


# The module-scoped fixture is built once and never mutated, so sharing it is safe.
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), edits=EDITS)
def test_corrupted_real_tables_never_raise(tool_images, which, edits):
    """Real sfdisk/sgdisk tables with random bytes overwritten in their metadata."""
    data = bytearray(tool_images[which])
    size = len(data)
    for from_end, offset, chunk in edits:
        # Hit the start (MBR, GPT, EBRs) or the end (backup GPT) of the disk.
        offset = size - len(chunk) - offset if from_end else offset
        data[offset:offset + len(chunk)] = chunk
    check_sane(bytes(data), size)
