"""Journal replay (snapfs/guestfs/jbd2.py) against the kernel.

Crash-consistent images (tests/support/dirty_ext4.py: copied while
mounted, after changes committed by fsync alone, so the journal holds the
only copy of their metadata) are read through ``ExtGuestFs``, which
replays the journal in memory, and compared with the kernel's own mount of
a copy (which replays it on disk): paths, types, modes, owners, sizes,
symlink targets and file bytes.  Journals with escaped blocks, revokes, an
uncommitted transaction and a log that wraps are built with debugfs's
journal_write and checked block by block against ``e2fsck -E
journal_only``, the same recovery code as the kernel's.  The image itself
is never changed.
"""

import contextlib
import hashlib
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.guestfs.base import FsDamaged, Unsupported
from snapfs.guestfs.ext import ExtGuestFs
from snapfs.guestfs.jbd2 import _crc32c, crc32_be, replay_journal
from tests.support.dirty_ext4 import build_dirty_ext4, needs_recovery

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")

MAGIC = bytes.fromhex("c03b3998")
FLAVORS = {
    # name: (mkfs argv, mount options)
    "ext4": (("mkfs.ext4",), ()),
    "ext4-4k-data=journal": (("mkfs.ext4", "-b", "4096"), ("data=journal",)),
    "ext4-32bit-nocsum": (("mkfs.ext4", "-O", "^64bit,^metadata_csum"), ("journal_checksum",)),
    "ext3": (("mkfs.ext3",), ()),
}


def _run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          **kw).stdout


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _reader(path):
    f = open(path, "rb")

    def read(offset, length):
        f.seek(offset)
        return f.read(length)
    return read, f


# -- the two sides: our replay, the kernel's mount --------------------------------

def guest_tree(gfs):
    """{path: (type, permissions, uid, gid, size, bytes or target)} of a GuestFs."""
    tree = {}

    def walk(ino, prefix):
        for name, child, _ in gfs.listdir(ino):
            path = prefix + name
            s = gfs.stat(child)
            if stat.S_ISREG(s.mode):
                inline = gfs.inline_data(child)
                body = inline if inline is not None else gfs.read_file(gfs.runs(child), 0, s.size)
            elif stat.S_ISLNK(s.mode):
                body = gfs.readlink(child)
            else:
                body = None
            tree[path] = (stat.S_IFMT(s.mode), stat.S_IMODE(s.mode), s.uid, s.gid, s.size, body)
            if stat.S_ISDIR(s.mode):
                walk(child, path + b"/")
    walk(gfs.root, b"")
    return tree


def kernel_tree(root):
    """The same, as the kernel shows a mounted tree."""
    tree = {}
    root = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            s = os.lstat(full)
            if stat.S_ISREG(s.st_mode):
                body = Path(os.fsdecode(full)).read_bytes()
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(full)
            else:
                body = None
            rel = os.path.relpath(full, root)
            tree[rel] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                         s.st_size, body)
    return tree


@contextlib.contextmanager
def kernel_mount(image, workdir):
    """The kernel's view of ``image`` after it replays the journal: a
    read-write loop mount of a copy (read-only, it would not replay)."""
    copy, mnt = Path(workdir) / "oracle.img", Path(workdir) / "oracle"
    shutil.copyfile(image, copy)
    mnt.mkdir()
    _run("mount", "-o", "loop", copy, mnt)      # autoclear: umount detaches the loop
    try:
        yield mnt
    finally:
        _run("umount", mnt)
        copy.unlink()
        mnt.rmdir()


def replayed_tree(image):
    read, f = _reader(image)
    with f:
        return guest_tree(ExtGuestFs(read, os.path.getsize(image)))


def unreplayed_tree(image):
    """The tree a reader that ignored the journal would show (None if it
    cannot even be read): needs_recovery cleared, nothing replayed."""
    read, f = _reader(image)

    def torn(offset, length):
        data = bytearray(read(offset, length))
        at = 1024 + 0x60 - offset
        if 0 <= at < len(data):
            data[at] &= ~0x4
        return bytes(data)
    with f:
        try:
            return guest_tree(ExtGuestFs(torn, os.path.getsize(image)))
        except FsDamaged:
            return None


# -- changes that only the journal holds ------------------------------------------

def apply_ops(mnt, ops):
    """Apply ``ops`` below ``mnt``, then commit them with fsync alone."""
    touched = []
    for op in ops:
        kind, a, b, payload = op
        p, q = mnt / f"d{a % 3}" / f"n{a}", mnt / f"d{b % 3}" / f"n{b}"
        p.parent.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            if kind == "file":
                p.write_bytes(payload)
                touched.append(p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "symlink":
                os.symlink(payload.hex() or "x", p)
            elif kind == "chmod" and not p.is_symlink():
                os.chmod(p, 0o600 + a % 0o100)
            elif kind == "chown":
                os.chown(p, 1000 + a, 2000 + b, follow_symlinks=False)
            elif kind == "unlink":
                p.unlink()
            elif kind == "rename":
                os.rename(p, q)
            elif kind == "truncate":
                os.truncate(p, len(payload))
                touched.append(p)
    # Each fsync commits the transaction running then (its data first):
    # several transactions, and later copies of the same blocks.
    for path in touched + [mnt / "commit"]:
        with contextlib.suppress(OSError):
            if not path.exists():
                path.write_bytes(b"last\n")
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


payloads = st.one_of(st.binary(max_size=40),
                     st.integers(0, 3 * 4096).map(lambda n: (MAGIC + bytes(range(256)) * 50)[:n]),
                     st.integers(0, 40000).map(lambda n: os.urandom(n)))
ops_strategy = st.lists(st.tuples(
    st.sampled_from(["file", "file", "dir", "symlink", "chmod", "chown", "unlink", "rename",
                     "truncate"]),
    st.integers(0, 12), st.integers(0, 12), payloads), min_size=1, max_size=25)
base_files = st.dictionaries(st.sampled_from([f"d{i}/n{j}" for i in range(3) for j in range(13)]),
                             st.binary(max_size=6000), max_size=10)


@settings(max_examples=8)
@given(flavor=st.sampled_from(sorted(FLAVORS)), files=base_files, ops=ops_strategy)
def test_replayed_tree_is_the_kernels(tmp_path_factory, flavor, files, ops):
    work = tmp_path_factory.mktemp("jbd2")
    image = work / "disk.img"
    mkfs, options = FLAVORS[flavor]
    build_dirty_ext4(image, work, files=files, mkfs=mkfs, mount_options=options,
                     then=lambda mnt: apply_ops(mnt, ops), fs_size=24 << 20)
    assert needs_recovery(image)
    before = _sha(image)
    ours = replayed_tree(image)
    with kernel_mount(image, work) as mnt:
        assert ours == kernel_tree(mnt)
    assert _sha(image) == before


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_replay_matters(tmp_path, flavor):
    """The journal holds the only copy of a new directory and file: without
    replay they are missing (or the tree is unreadable); with it they are
    there, as the kernel shows them."""
    image = tmp_path / "disk.img"
    mkfs, options = FLAVORS[flavor]

    def journal_only(mnt):
        # A directory committed, then removed: its freed block is revoked.
        (mnt / "gone").mkdir()
        for i in range(200):
            (mnt / "gone" / f"entry-with-a-long-name-{i:04}").write_bytes(b"")
        fd = os.open(mnt / "gone", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        shutil.rmtree(mnt / "gone")
        (mnt / "new").mkdir()
        (mnt / "new" / "file").write_bytes(MAGIC + b"escaped?" * 1000)
        os.symlink("t" * 100, mnt / "new" / "link")
        os.chmod(mnt / "etc" / "hostname", 0o640)
        fd = os.open(mnt / "new" / "file", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    build_dirty_ext4(image, tmp_path, mkfs=mkfs, mount_options=options, then=journal_only,
                     fs_size=24 << 20)
    before = _sha(image)
    ours = replayed_tree(image)
    with kernel_mount(image, tmp_path) as mnt:
        assert ours == kernel_tree(mnt)
    assert ours[b"new/file"][5] == MAGIC + b"escaped?" * 1000
    assert unreplayed_tree(image) != ours
    read, f = _reader(image)
    with f:
        view = replay_journal(read, os.path.getsize(image))
        assert view.transactions >= 2 and view.replayed > 0
        # The removed directory's blocks are revoked (in data=journal ext4
        # forgets them instead: ext4_forget).
        assert (view.revoked > 0) == ("data=journal" not in options)
        # Data goes through the journal in data=journal: the file's first
        # block starts with the journal's magic, so its copy is escaped.
        assert view.escaped == ("data=journal" in options)
        assert not view(1024 + 0x60, 4)[0] & 0x4        # needs_recovery, cleared
    assert _sha(image) == before


# -- journals built by debugfs, checked against e2fsck's recovery -----------------

JOURNALS = {
    # name: (mkfs -O features, debugfs journal_open options)
    "plain-32bit": ("^metadata_csum,^64bit", ""),
    "v1-crc32": ("^metadata_csum", "-c"),
    "v2-32bit": ("metadata_csum,^64bit", "-c -v 2"),
    "v3-64bit": ("metadata_csum", "-c -v 3"),
}
BLOCK = 1024


def _debugfs(image, *commands, workdir):
    script = Path(workdir) / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    out = subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], check=True,
                         capture_output=True, text=True)
    assert "rror" not in out.stdout + out.stderr, out.stdout + out.stderr


def _blocks(image, spec):
    out = _run("debugfs", "-R", f"blocks {spec}", image)
    return [int(b) for b in out.split()]


def _write_blocks(path, blocks, workdir):
    data = Path(workdir) / f"blocks-{len(list(Path(workdir).iterdir()))}"
    data.write_bytes(b"".join(blocks))
    return data


def build_journal(tmp_path, features, open_options, rotate=False):
    """An ext4 with file /f (16 blocks) and a journal of four
    transactions over its blocks b0..b3:
      1: b0 <- a block starting with the journal's magic (escaped), b1 <- A, b2 <- C
      2: b1 <- B (a later copy wins)
      3: revokes b2 (1's copy of it is not replayed)
      4: b3 <- Z, never committed (not replayed).
    (debugfs writes no commit block after a transaction with both blocks
    and revokes, hence 2 and 3 apart.)
    ``rotate`` moves the log round the journal so that it wraps from the
    end back to s_first.  Returns (image, the file's original bytes)."""
    src = tmp_path / "src"
    src.mkdir()
    original = os.urandom(16 * BLOCK)
    (src / "f").write_bytes(original)
    image = tmp_path / "disk.img"
    _run("mkfs.ext4", "-q", "-F", "-b", BLOCK, "-O", features, "-d", src, image, "16M")
    b = _blocks(image, "/f")
    escaped = MAGIC + b"escaped block " * 73
    tx = [_write_blocks(None, blocks, tmp_path) for blocks in
          ([escaped[:BLOCK], b"A" * BLOCK, b"C" * BLOCK], [b"B" * BLOCK], [b"Z" * BLOCK])]
    _debugfs(image, f"journal_open {open_options}",
             f"journal_write -b {b[0]},{b[1]},{b[2]} {tx[0]}",
             f"journal_write -b {b[1]} {tx[1]}",
             f"journal_write -r {b[2]} {tx[1]}",
             f"journal_write -b {b[3]} -c {tx[2]}",
             "journal_close", workdir=tmp_path)
    if rotate:
        _rotate_log(image)
    assert needs_recovery(image)
    return image, original, escaped[:BLOCK]


def _rotate_log(image):
    """Move every block of the log area [s_first, s_maxlen) of the journal
    forward by all but 3 of its blocks, and s_start with them: the
    transactions keep their order, and now wrap past the end.  Descriptor
    tags name filesystem blocks, never journal positions, and no checksum
    covers a position: only the journal superblock's is redone."""
    where = _blocks(image, "<8>")
    with open(image, "r+b") as f:
        f.seek(where[0] * BLOCK)
        jsb = bytearray(f.read(1024))
        maxlen, first = struct.unpack_from(">II", jsb, 16)
        length = maxlen - first
        shift = length - 3
        log = []
        for i in range(first, maxlen):
            f.seek(where[i] * BLOCK)
            log.append(f.read(BLOCK))
        for i, data in enumerate(log):
            f.seek(where[first + (i + shift) % length] * BLOCK)
            f.write(data)
        start = struct.unpack_from(">I", jsb, 28)[0]
        struct.pack_into(">I", jsb, 28, first + (start - first + shift) % length)
        if jsb[0x50] == 4:      # crc32c: the kernel's, over the block with its field zeroed
            struct.pack_into(">I", jsb, 0xFC, 0)
            struct.pack_into(">I", jsb, 0xFC, _crc32c(0xFFFFFFFF, bytes(jsb)))
        f.seek(where[0] * BLOCK)
        f.write(jsb)


def assert_same_as_e2fsck(image, view, workdir):
    """Every block of ``view`` is the block e2fsck's journal replay writes,
    but the journal's own (which e2fsck resets) and, in the superblock,
    the fields e2fsck stamps: its write time, kilobytes written, checksum,
    and the state (it marks errors when it found a corrupt transaction)."""
    copy = Path(workdir) / "e2fsck.img"
    shutil.copyfile(image, copy)
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copy)], check=True,
                   capture_output=True)
    journal = set(_blocks(image, "<8>"))
    stamped = [(0x30, 4), (0x3A, 2), (0x178, 8), (0x3FC, 4)]
    with open(copy, "rb") as f:
        for n in range(os.path.getsize(copy) // BLOCK):
            if n in journal:
                continue
            f.seek(n * BLOCK)
            want, got = bytearray(f.read(BLOCK)), bytearray(view(n * BLOCK, BLOCK))
            if n == 1:
                for at, size in stamped:
                    want[at:at + size] = got[at:at + size] = bytes(size)
            assert got == want, f"block {n} differs from e2fsck's replay"
    copy.unlink()


@pytest.mark.parametrize("rotate", [False, True], ids=["straight", "wrapped"])
@pytest.mark.parametrize("journal", sorted(set(JOURNALS) - {"v1-crc32"}))
def test_constructed_journal(tmp_path, journal, rotate):
    features, open_options = JOURNALS[journal]
    image, original, escaped = build_journal(tmp_path, features, open_options, rotate)
    before = _sha(image)
    read, f = _reader(image)
    with f:
        view = replay_journal(read, os.path.getsize(image))
        assert (view.transactions, view.revoked, view.escaped) == (3, 1, 1)
        assert_same_as_e2fsck(image, view, tmp_path)
        tree = guest_tree(ExtGuestFs(read, os.path.getsize(image)))
    # b0 escaped and restored, b1 the later copy, b2 revoked, b3 uncommitted.
    assert tree[b"f"][5] == escaped + b"B" * BLOCK + original[2 * BLOCK:]
    with kernel_mount(image, tmp_path) as mnt:
        assert kernel_tree(mnt) == tree
    assert _sha(image) == before


@pytest.mark.parametrize("rotate", [False, True], ids=["straight", "wrapped"])
def test_corrupt_commit_is_refused(tmp_path, rotate):
    """debugfs sums a revoke block into a v1 (crc32) commit checksum, which
    the kernel does not: to the kernel transaction 3 is corrupt, and it
    refuses the mount ("error loading journal").  So does the replay."""
    features, open_options = JOURNALS["v1-crc32"]
    image, _, _ = build_journal(tmp_path, features, open_options, rotate)
    before = _sha(image)
    read, f = _reader(image)
    with f, pytest.raises(FsDamaged, match="transaction 3 is corrupt"):
        replay_journal(read, os.path.getsize(image))
    copy, mnt = tmp_path / "oracle.img", tmp_path / "oracle"
    shutil.copyfile(image, copy)
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(copy), str(mnt)], capture_output=True)
    if mounted.returncode == 0:
        _run("umount", mnt)
    assert mounted.returncode != 0, "the kernel mounted a journal with a corrupt commit"
    assert _sha(image) == before


def test_crc32_be_is_the_msb_first_crc():
    # CRC-32/BZIP2 is the MSB-first CRC-32 with its register inverted in
    # and out; its check value on "123456789" is 0xFC891918.
    assert crc32_be(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xFC891918


@settings(max_examples=40)
@given(damage=st.lists(st.tuples(st.integers(0, 12 * BLOCK - 1), st.integers(0, 255)),
                       min_size=1, max_size=8))
def test_damaged_journal_fails_cleanly(tmp_path_factory, damage):
    """Bytes of the journal superblock and log overwritten at random: the
    replay either succeeds or raises FsDamaged or Unsupported, quickly."""
    work = tmp_path_factory.mktemp("damaged")
    image, _, _ = build_journal(work, *JOURNALS["v3-64bit"])
    disk = bytearray(image.read_bytes())
    journal = _blocks(image, "<8>")
    for at, value in damage:
        disk[journal[at // BLOCK] * BLOCK + at % BLOCK] = value
    try:
        view = replay_journal(lambda o, n: bytes(disk[o:o + n]), len(disk))
    except (FsDamaged, Unsupported):
        return
    assert view.transactions <= 4


def test_external_journal_is_unsupported(tmp_path):
    image, _, _ = build_journal(tmp_path, *JOURNALS["plain-32bit"])
    with open(image, "r+b") as f:
        f.seek(1024 + 0xE0)             # s_journal_inum: 0, the journal is elsewhere
        f.write(bytes(4))
    read, f = _reader(image)
    with f, pytest.raises(Unsupported, match="external"):
        replay_journal(read, os.path.getsize(image))
