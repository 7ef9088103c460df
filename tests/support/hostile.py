"""A corpus of hostile qcow2 images for snapfs security tests.

Every case starts from a valid image made by qemu-img/qemu-io and is then
damaged with ``struct`` according to docs/interop/qcow2.txt.  Each case lives
in its own directory ``<root>/<name>/img/`` (the image directory snapfs
imports from) next to ``<root>/<name>/host/`` (files outside the image
directory that a malicious name may point at).  Where a name points at a host
file, that file holds the case's ``secret`` marker, which must never show up
in any snapfs view.

``expect``:
  "refuse"        - the import must fail (header-level problem or bad backing).
  "refuse_or_eio" - refused at import, or imported with reads giving EIO.
  "accept"        - only from build_accept_cases(): odd but legal images.
"""

from __future__ import annotations

import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

REFUSE = "refuse"
REFUSE_OR_EIO = "refuse_or_eio"
ACCEPT = "accept"

MAX_CHAIN_DEPTH = 64
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of L1/L2 entries
PAST_EOF = 1 << 40  # cluster aligned, far beyond any file made here
KIB = 1024
MIB = 1024 * KIB

# qcow2 header: field -> (offset, struct format); all big-endian.
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}


@dataclass(frozen=True)
class HostileCase:
    name: str  # short id, used as pytest id
    top: Path  # image to import (the chain top)
    expect: str  # REFUSE, REFUSE_OR_EIO (or ACCEPT, see build_accept_cases)
    reason: str  # human explanation
    secret: bytes | None  # marker planted in a host file; must never be served


# ---------------------------------------------------------------- low level

def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, cwd=cwd)


def _create_luks(path: Path, attempts: int = 5) -> None:
    """A LUKS-encrypted qcow2 made by qemu-img.  qemu times its PBKDF with
    the thread's CPU clock before it writes anything, and fails with
    "Unable to get accurate CPU usage" when that clock did not move (seen
    here in about one run in ten): only that failure is tried again."""
    for attempt in range(attempts):
        try:
            run("qemu-img", "create", "-q", "-f", "qcow2",
                "--object", "secret,id=sec0,data=snapfs-luks-key",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
                      "cluster_size=65536", path, "1M")
            return
        except subprocess.CalledProcessError as e:
            if b"Unable to get accurate CPU usage" not in e.stderr or attempt == attempts - 1:
                raise
            path.unlink(missing_ok=True)


def read_header(path: Path) -> dict[str, int]:
    raw = path.read_bytes()[:112].ljust(112, b"\0")
    return {k: struct.unpack_from(f, raw, off)[0] for k, (off, f) in FIELDS.items()}


def patch_header(path: Path, **values: int) -> None:
    with open(path, "r+b") as f:
        for key, value in values.items():
            off, fmt = FIELDS[key]
            f.seek(off)
            f.write(struct.pack(fmt, value))


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_extensions(path: Path) -> list[tuple[int, bytes]]:
    """The (type, data) header extensions, without the end marker."""
    h = read_header(path)
    buf = path.read_bytes()[: 1 << h["cluster_bits"]]
    pos = h["header_length"] if h["version"] >= 3 else 72
    exts = []
    while pos + 8 <= len(buf):
        etype, length = struct.unpack_from(">II", buf, pos)
        if etype == 0:
            break
        exts.append((etype, buf[pos + 8: pos + 8 + length]))
        pos += 8 + (length + 7) // 8 * 8
    return exts


def set_tail(path: Path, backing: bytes | None, backing_fmt: bytes | None = b"qcow2",
             extra: tuple[tuple[int, bytes], ...] = ()) -> None:
    """Rewrite everything after the fixed header in cluster 0: the header
    extensions (backing format / data file replaced) and the backing name,
    stored verbatim (may hold NUL, newline, ...), then fix the header."""
    h = read_header(path)
    drop = {EXT_BACKING_FORMAT} | {t for t, _ in extra}
    exts = [e for e in header_extensions(path) if e[0] not in drop]
    if backing is not None and backing_fmt is not None:
        exts.insert(0, (EXT_BACKING_FORMAT, backing_fmt))
    exts[0:0] = list(extra)
    tail = b"".join(struct.pack(">II", t, len(d)) + d.ljust((len(d) + 7) // 8 * 8, b"\0")
                    for t, d in exts) + bytes(8)
    start, cluster = h["header_length"], 1 << h["cluster_bits"]
    name_off = start + len(tail)
    assert name_off + len(backing or b"") <= cluster, "tail does not fit in cluster 0"
    write_at(path, start, (tail + (backing or b"")).ljust(cluster - start, b"\0"))
    patch_header(path, backing_file_offset=name_off if backing is not None else 0,
                 backing_file_size=len(backing or b""))


def make_qcow2(path: Path, size: str = "1M", cluster: int = 64 * KIB, data: bool = True,
               opts: str = "") -> Path:
    """A valid image; with data, two clusters are written so L1/L2 exist."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}{opts}",
        path, size)
    if data:
        run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 64k",
            "-c", "write -q -P 0xa5 512k 64k", path)
    return path


def l2_table_offset(path: Path) -> int:
    return read_u64(path, read_header(path)["l1_table_offset"]) & OFFSET_MASK


def _dirs(root: Path, name: str) -> tuple[Path, Path]:
    img, host = root / name / "img", root / name / "host"
    img.mkdir(parents=True)
    host.mkdir()
    return img, host


def _plant(host: Path, name: str) -> bytes:
    secret = f"SNAPFS-HOST-SECRET-{name}".encode()
    (host / "secret.txt").write_bytes(secret)
    return secret


# ------------------------------------------------------------ backing names

def _backing_cases(root: Path) -> list[HostileCase]:
    out = []

    def overlay(name: str, reason: str, backing, fmt=b"qcow2", plant=True, base=None):
        img, host = _dirs(root, name)
        secret = _plant(host, name) if plant else None
        if base is not None:
            make_qcow2(img / base)
        top = make_qcow2(img / "top.qcow2", data=False)
        set_tail(top, backing(img, host) if callable(backing) else backing, fmt)
        out.append(HostileCase(name, top, REFUSE, reason, secret))
        return img, host

    overlay("backing_absolute", "backing file name is absolute (raw host file; qemu follows it)",
            lambda img, host: str(host / "secret.txt").encode(), b"raw")
    overlay("backing_dotdot", "backing file name '../host/secret.txt' escapes the image dir "
            "(raw; qemu follows it)", b"../host/secret.txt", b"raw")
    img, host = overlay("backing_symlink_escape", "backing 'link.qcow2' is a symlink to "
                        "../host/secret.qcow2 outside the image dir (qemu follows it)",
                        b"link.qcow2")
    make_qcow2(host / "secret.qcow2", data=False)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -s secret.txt 0 1M", "secret.qcow2", cwd=host)
    (img / "link.qcow2").symlink_to("../host/secret.qcow2")

    img, _ = _dirs(root, "backing_loop_pair")
    for me, other in (("a", "b"), ("b", "a")):
        make_qcow2(img / f"{me}.qcow2", data=False)
        set_tail(img / f"{me}.qcow2", f"{other}.qcow2".encode())
    out.append(HostileCase("backing_loop_pair", img / "a.qcow2", REFUSE,
                           "backing loop a.qcow2 -> b.qcow2 -> a.qcow2", None))
    img, _ = _dirs(root, "backing_loop_self")
    make_qcow2(img / "a.qcow2", data=False)
    set_tail(img / "a.qcow2", b"a.qcow2")
    out.append(HostileCase("backing_loop_self", img / "a.qcow2", REFUSE,
                           "a.qcow2 names itself as its backing file", None))

    img, _ = _dirs(root, "chain_too_deep")
    depth = MAX_CHAIN_DEPTH + 6
    make_qcow2(img / "l00.qcow2")
    template = make_qcow2(img / "template.qcow2", data=False)
    set_tail(template, b"l00.qcow2")
    blob = template.read_bytes()
    template.unlink()
    for i in range(1, depth + 1):  # same-length names: patch in place, no qemu call per layer
        below = f"l{i - 1:02d}.qcow2".encode()
        (img / f"l{i:02d}.qcow2").write_bytes(blob.replace(b"l00.qcow2", below))
    out.append(HostileCase("chain_too_deep", img / f"l{depth:02d}.qcow2", REFUSE,
                           f"backing chain of {depth + 1} images exceeds {MAX_CHAIN_DEPTH} layers",
                           None))

    overlay("backing_name_nul", "backing name b'base.qcow2\\0junk' holds a NUL byte: refuse "
            "(qemu truncates at the NUL and follows base.qcow2)", b"base.qcow2\0junk",
            plant=False, base="base.qcow2")
    overlay("backing_name_newline", "backing name 'base\\n.qcow2' holds a newline: refuse "
            "(qemu follows the existing file of that name)", b"base\n.qcow2",
            plant=False, base="base\n.qcow2")
    overlay("backing_missing", "backing file 'missing.qcow2' does not exist",
            b"missing.qcow2", plant=False)
    return out


# ---------------------------------------------------- header / table damage

def _l1_offset(path: Path) -> int:
    return read_header(path)["l1_table_offset"]


# name -> (expect, reason, header fields or callable(path) doing the damage).
# qemu-img's reaction to every case is recorded in tests/unit/test_hostile_corpus.py.
_HEADER_DAMAGE = {
    "bad_magic": (REFUSE, "magic is 'QFI\\xfa' not 'QFI\\xfb'", {"magic": 0x514649FA}),
    "version_4": (REFUSE, "unsupported qcow2 version 4", {"version": 4}),
    "incompat_bit10": (REFUSE, "unknown incompatible feature bit 10",
                       {"incompatible_features": 1 << 10}),
    "crypt_aes": (REFUSE, "crypt_method=1 (legacy AES encryption)", {"crypt_method": 1}),
    "crypt_method_7": (REFUSE, "crypt_method=7 (unknown encryption)", {"crypt_method": 7}),
    "compression_type_7": (REFUSE, "compression type 7 (unknown) with incompatible bit 3 set",
                           {"compression_type": 7, "incompatible_features": 1 << 3}),
    "l1_size_huge": (REFUSE, "l1_size 0x7fffffff: L1 table far larger than the file",
                     {"l1_size": 0x7FFFFFFF}),
    "cluster_bits_8": (REFUSE, "cluster_bits 8 (< 9)", {"cluster_bits": 8}),
    "cluster_bits_22": (REFUSE, "cluster_bits 22 (> 21)", {"cluster_bits": 22}),
    "cluster_bits_63": (REFUSE, "cluster_bits 63 (shift overflow)", {"cluster_bits": 63}),
    "size_2p63": (REFUSE, "virtual size 2^63 - 512 (absurd)", {"size": (1 << 63) - 512}),
    "size_exceeds_l1": (REFUSE, "virtual size 1 TiB but l1_size 1 maps only 512 MiB",
                        {"size": 1 << 40}),
    "backing_offset_past_cluster": (REFUSE, "backing_file_offset beyond the first cluster",
                                    {"backing_file_offset": 64 * KIB + 8, "backing_file_size": 8}),
    "backing_offset_past_eof": (REFUSE, "backing_file_offset far past EOF",
                                {"backing_file_offset": PAST_EOF, "backing_file_size": 8}),
    "backing_size_1024": (REFUSE, "backing_file_size 1024 (> 1023 allowed)", lambda p: set_tail(
        p, b"b" * 1024)),
    "l1_offset_unaligned": (REFUSE, "l1_table_offset not cluster aligned",
                            lambda p: patch_header(p, l1_table_offset=_l1_offset(p) + 8)),
    "l1_offset_past_eof": (REFUSE, "l1_table_offset past EOF", {"l1_table_offset": PAST_EOF}),
    "refcount_table_past_eof": (REFUSE, "refcount_table_offset past EOF (detectable from the "
                                "header; a read-only reader never needs refcounts, so no EIO "
                                "would ever occur: must be refused)",
                                {"refcount_table_offset": PAST_EOF}),
    "header_length_short": (REFUSE, "v3 header_length 96 (< 104)", {"header_length": 96}),
    "header_length_huge": (REFUSE, "header_length 0x10008 exceeds the 64 KiB cluster",
                           {"header_length": 64 * KIB + 8}),
    "snapshots_past_eof": (REFUSE, "snapshot table (nb_snapshots=1) past EOF",
                           {"nb_snapshots": 1, "snapshots_offset": PAST_EOF}),
    "snapshots_count_huge": (REFUSE, "nb_snapshots 0x7fffffff", {"nb_snapshots": 0x7FFFFFFF}),
    "l1_entry_past_eof": (REFUSE_OR_EIO, "L1[0] points at an L2 table past EOF", lambda p: write_at(
        p, _l1_offset(p), struct.pack(">Q", COPIED | PAST_EOF))),
    "l2_entry_past_eof": (REFUSE_OR_EIO, "L2[0] points at a data cluster past EOF",
                          lambda p: write_at(p, l2_table_offset(p),
                                             struct.pack(">Q", COPIED | PAST_EOF))),
    "l2_entry_unaligned": (REFUSE_OR_EIO, "L2[0] host offset not cluster aligned",
                           lambda p: write_at(p, l2_table_offset(p), struct.pack(
                               ">Q", read_u64(p, l2_table_offset(p)) + 512))),
}


def _header_cases(root: Path) -> list[HostileCase]:
    out = []
    for name, (expect, reason, damage) in _HEADER_DAMAGE.items():
        img, host = _dirs(root, name)
        top = make_qcow2(img / "top.qcow2")
        damage(top) if callable(damage) else patch_header(top, **damage)
        out.append(HostileCase(name, top, expect, reason, None))

    img, host = _dirs(root, "data_file_external")
    top = make_qcow2(img / "top.qcow2", data=False)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 512", top)
    patch_header(top, incompatible_features=INCOMPAT_DATA_FILE, autoclear_features=1 << 1)
    set_tail(top, None, extra=((EXT_DATA_FILE, b"../host/secret.txt"),))
    write_at(top, l2_table_offset(top), struct.pack(">Q", COPIED))  # guest 0 -> data file offset 0
    out.append(HostileCase("data_file_external", top, REFUSE, "external data file "
                           "'../host/secret.txt' (incompatible bit 2 + data file extension, "
                           "raw bit; qemu serves the host file as the disk)",
                           _plant(host, "data_file_external")))

    img, _ = _dirs(root, "crypt_luks")
    _create_luks(img / "top.qcow2")
    out.append(HostileCase("crypt_luks", img / "top.qcow2", REFUSE,
                           "real LUKS-encrypted qcow2 (crypt_method=2)", None))
    return out


def _compressed_cases(root: Path) -> list[HostileCase]:
    out = []
    for name, reason in (("compressed_past_eof", "compressed cluster descriptor points past EOF"),
                         ("compressed_garbage", "compressed cluster bytes are not valid deflate")):
        img, _ = _dirs(root, name)
        top = make_qcow2(img / "top.qcow2", data=False)
        run("qemu-io", "-f", "qcow2", "-c", "write -q -c -P 0x33 0 64k", top)
        l2 = l2_table_offset(top)
        entry = read_u64(top, l2)
        assert entry & COMPRESSED, "qemu-io did not write a compressed cluster"
        x = 62 - (read_header(top)["cluster_bits"] - 8)  # offset bits 0..x-1, sector count above
        host_off, sectors = entry & ((1 << x) - 1), (entry >> x) & ((1 << (62 - x)) - 1)
        if name == "compressed_past_eof":
            write_at(top, l2, struct.pack(">Q", COMPRESSED | (sectors << x) | PAST_EOF))
        else:  # 0xff: BFINAL=1, BTYPE=11 (reserved) -> every deflate decoder rejects it
            length = min((sectors + 1) * 512 - host_off % 512, top.stat().st_size - host_off)
            write_at(top, host_off, b"\xff" * length)
        out.append(HostileCase(name, top, REFUSE_OR_EIO, reason, None))
    return out


# The first ten seeds (of 0..20) whose damage makes qemu-img refuse to open the
# image.  The other seeds only hit the refcount table or padding, which is
# harmless to a reader: such an image is neither refused nor EIO.
RANDOM_SEEDS = (3, 6, 7, 9, 10, 12, 15, 16, 17, 20)
RANDOM_CLUSTER = 512  # small clusters: the first 2 clusters are header + refcount table
RANDOM_BYTES = 8


def _random_cases(root: Path) -> list[HostileCase]:
    out = []
    pristine = None
    for seed in RANDOM_SEEDS:
        name = f"random_{seed:02d}"
        img, _ = _dirs(root, name)
        top = img / "top.qcow2"
        if pristine is None:
            pristine = make_qcow2(top, cluster=RANDOM_CLUSTER).read_bytes()
        rng = random.Random(seed)
        buf = bytearray(pristine)
        for pos in rng.sample(range(2 * RANDOM_CLUSTER), RANDOM_BYTES):
            buf[pos] ^= rng.randrange(1, 256)  # xor with nonzero: always a real change
        top.write_bytes(bytes(buf))
        out.append(HostileCase(name, top, REFUSE_OR_EIO, f"{RANDOM_BYTES} random bytes in the "
                               f"first 2 clusters changed (random.Random({seed})); qemu-img "
                               "refuses to open it", None))
    return out


def _file_cases(root: Path) -> list[HostileCase]:
    out = []
    img, _ = _dirs(root, "truncated_50")
    top = img / "top.qcow2"
    top.write_bytes(make_qcow2(top).read_bytes()[:50])
    out.append(HostileCase("truncated_50", top, REFUSE, "file truncated to 50 bytes", None))
    img, _ = _dirs(root, "empty_file")
    (img / "top.qcow2").write_bytes(b"")
    out.append(HostileCase("empty_file", img / "top.qcow2", REFUSE, "empty file", None))
    img, _ = _dirs(root, "top_dangling_symlink")
    (img / "top.qcow2").symlink_to("missing.qcow2")
    out.append(HostileCase("top_dangling_symlink", img / "top.qcow2", REFUSE,
                           "the image itself is a dangling symlink", None))
    return out


def build_corpus(directory: Path) -> list[HostileCase]:
    """Build every hostile case under ``directory``; each must be refused or read as EIO."""
    root = Path(directory)
    return [case for build in (_backing_cases, _header_cases, _compressed_cases,
                               _random_cases, _file_cases) for case in build(root)]


def build_accept_cases(directory: Path) -> list[HostileCase]:
    """Odd but legal images that snapfs must import and serve normally."""
    root = Path(directory)
    img, _ = _dirs(root, "backing_name_empty")
    top = make_qcow2(img / "top.qcow2")
    set_tail(top, b"", None)  # offset set, size 0
    assert read_header(top)["backing_file_offset"] != 0
    return [HostileCase("backing_name_empty", top, ACCEPT,
                        "backing_file_offset set but backing_file_size 0: an empty name means "
                        "'no backing file' (as in qemu); import and serve the image's own data",
                        None)]
