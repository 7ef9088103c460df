"""The XFS reader against the kernel's own XFS: images made by mkfs.xfs,
filled through a loop mount, then read both ways."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from snapfs.guestfs.base import FsDamaged, Unsupported
from snapfs.guestfs.probe import open_guest_fs
from snapfs.guestfs.xfs import XfsGuestFs

from .guest_oracle import compare_with_mount, exercise_everything, image_reader, mounted, walk_guest

pytestmark = pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="needs xfsprogs")

IMAGE_SIZE = 320 << 20      # mkfs.xfs's smallest


def make_xfs(image, *mkfs_args, small_log=False):
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    env = dict(os.environ)
    if small_log:
        # mkfs.xfs refuses logs under 64 MiB except for fstests, which
        # these variables tell it it is serving.
        env.update(TEST_DIR="/tmp", TEST_DEV=str(image), QA_CHECK_FS="1")
        mkfs_args += ("-l", "size=1368b")
    subprocess.run(["mkfs.xfs", "-q", "-f", *mkfs_args, str(image)], check=True, env=env)


def fill_everything(mnt):
    """Every kind of file and directory format the reader must handle."""
    j = lambda *p: os.path.join(mnt, *p)
    for name, count in (("btree", 2500), ("leaf", 400), ("block", 20)):
        os.mkdir(j(name))
        for i in range(count):
            with open(j(name, f"entry-with-a-longish-name-{i:05d}"), "w") as f:
                f.write(str(i) if i % 50 == 0 else "")
    os.mkdir(j("short"))                          # fits in the inode
    os.mkdir(j("short", "sub"))
    os.symlink("target", j("short", "link"))
    os.mkfifo(j("short", "fifo"))
    os.chmod(j("short", "fifo"), 0o4751)
    os.mkdir(j("empty"))
    os.mkdir(j("special"))
    long_name = "L" * 255
    with open(j("special", long_name), "wb") as f:
        f.write(b"long name\n")
    os.symlink("x" * 300, j("special", "link300"))    # in the inode (512-byte inodes)
    os.symlink("y/" * 500, j("special", "link1000"))  # in a block (1024 at most)
    os.link(j("special", long_name), j("special", "hard"))
    os.link(j("special", long_name), j("short", "hard"))
    os.mknod(j("special", "chr"), 0o620 | 0o020000, os.makedev(4, 5))
    os.mknod(j("special", "blk"), 0o660 | 0o060000, os.makedev(259, 70000))
    os.chown(j("special", "chr"), 1234, 5678)
    with open(j("sparse"), "wb") as f:
        f.truncate(40 << 20)
        f.seek(17 << 20)
        f.write(os.urandom(12345))
    with open(j("fragmented"), "wb") as f:        # every other block: a B+tree of extents
        data = os.urandom(4096)
        for block in range(0, 800, 2):
            f.seek(block * 4096)
            f.write(data[block % 7:] + data[:block % 7])
            f.flush()
            os.fsync(f.fileno())
    with open(j("prealloc"), "wb") as f:          # unwritten extents read as zeros
        os.posix_fallocate(f.fileno(), 0, 3 << 20)
        f.seek(1 << 20)
        f.write(b"written in the middle")
    with open(j("past_eof"), "wb") as f:          # extents past the end of the file
        f.write(b"z" * 5000)
    subprocess.run(["fallocate", "-n", "-o", "0", "-l", "8M", j("past_eof")], check=True)
    with open(j("big"), "wb") as f:
        f.write(os.urandom(3 << 20) + b"tail")
    os.utime(j("special", "link300"), ns=(-300_000_000_123, -299_000_000_456), follow_symlinks=False)
    os.utime(j("big"), ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))


@pytest.fixture(scope="module", params=[[], ["-n", "size=16384"], ["-m", "bigtime=0"]],
                ids=["default", "dirblock16k", "legacy_times"])
def xfs_image(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xfs")
    image = tmp / "xfs.img"
    make_xfs(image, *request.param)
    with mounted(image, tmp / "fill", options="loop"):
        fill_everything(tmp / "fill")
    return image


def test_every_file_matches_the_kernel(xfs_image, tmp_path):
    read, size = image_reader(xfs_image)
    gfs = XfsGuestFs(read, size)
    with mounted(xfs_image, tmp_path / "mnt"):
        # dissect.xfs does not parse extended attributes, so none are shown.
        count = compare_with_mount(gfs, tmp_path / "mnt", xattrs=False)
    assert count > 2670


def test_directory_formats_are_all_there(xfs_image):
    """The test tree holds every directory format XFS has (so the
    comparison above covers each)."""
    read, size = image_reader(xfs_image)
    gfs = XfsGuestFs(read, size)
    formats = {}
    for path, (ino, st) in walk_guest(gfs).items():
        if st.is_dir:
            node = gfs.fs.get_inode(ino)
            formats[path] = (node.inode.di_format, node.inode.di_size)
    assert formats[b"short"][0] == 1
    # 2,500 entries: a node directory, its extents in a B+tree when the
    # directory blocks are small.
    assert formats[b"btree"][1] > formats[b"leaf"][1]
    assert formats[b"btree"][0] == (3 if gfs.dir_block_size == gfs.block_size else 2)
    # block: one directory block; leaf: data blocks and a leaf.
    assert formats[b"block"][0] == 2 and formats[b"leaf"][1] > formats[b"block"][1]
    fragmented = gfs.fs.get_inode(dict(
        (p, i) for p, (i, _s) in walk_guest(gfs).items())[b"fragmented"])
    assert fragmented.inode.di_format == 3


def test_probe_opens_xfs(xfs_image):
    read, size = image_reader(xfs_image)
    gfs, why = open_guest_fs(read, size)
    assert why is None and isinstance(gfs, XfsGuestFs)


def test_metadata_ranges_are_the_record_and_the_map_blocks(xfs_image):
    """The record first; for a B+tree data fork, then every block of the
    tree, as xfs_db counts them (the fragmented file's and the big
    directory's)."""
    read, size = image_reader(xfs_image)
    gfs = XfsGuestFs(read, size)
    inodes = walk_guest(gfs)
    for path, (ino, _st) in list(inodes.items())[:50] + [
            (p, inodes[p]) for p in (b"fragmented", b"btree")]:
        (offset, length), *maps = gfs.metadata_ranges(ino)
        record = read(offset, length)
        assert record[:2] == b"IN" and length == gfs.inode_size
        if gfs.fs._has_crc:     # v5 inodes name themselves
            assert int.from_bytes(record[152:160], "big") == ino
        if gfs.fs.get_inode(ino).inode.di_format != 3:
            assert maps == [], path
            continue
        assert maps and all(read(o, 4) in (b"BMAP", b"BMA3") and n == gfs.block_size
                            for o, n in maps), path
        assert len(maps) == _bmbt_blocks_by_xfs_db(xfs_image, ino), path


def _bmbt_blocks_by_xfs_db(image, ino):
    """How many blocks the data fork's B+tree has, from xfs_db: the
    root's pointers, then each level's blocks' pointers down to the leaves."""
    def run_db(*commands):
        args = ["xfs_db", "-r"]
        for c in commands:
            args += ["-c", c]
        return subprocess.run(args + [str(image)], check=True, capture_output=True,
                              text=True).stdout

    def ptrs(text):
        found = re.search(r"ptrs\[[^]]*\] = (.*)", text)
        # "ptrs[1] = 127", or "ptrs[1-2] = 1:127 2:130"
        return [int(p.split(":")[-1]) for p in found.group(1).split()] if found else []

    total, todo = 0, ptrs(run_db(f"inode {ino}", "print u3.bmbt"))
    while todo:
        ptr = todo.pop()
        total += 1
        text = run_db(f"fsblock {ptr}", "type bmapbtd", "print")
        if int(re.search(r"level = (\d+)", text).group(1)) > 0:
            todo += ptrs(text)
    return total


def _logprint_state(image):
    out = subprocess.run(["xfs_logprint", "-t", str(image)], capture_output=True,
                         text=True).stdout
    return "CLEAN" if "<CLEAN>" in out else "DIRTY" if "<DIRTY>" in out else out


def test_a_copy_of_a_mounted_xfs_needs_recovery_and_is_refused(tmp_path):
    image, copy = tmp_path / "xfs.img", tmp_path / "copy.img"
    make_xfs(image)
    with mounted(image, tmp_path / "mnt", options="loop"):
        os.mkdir(tmp_path / "mnt" / "d")
        for i in range(100):
            (tmp_path / "mnt" / "d" / f"f{i}").write_text("x")
        subprocess.run(["sync", "-f", str(tmp_path / "mnt")], check=True)
        shutil.copyfile(image, copy)
    assert (_logprint_state(copy), _logprint_state(image)) == ("DIRTY", "CLEAN")
    with pytest.raises(Unsupported, match="log needs recovery"):
        XfsGuestFs(*image_reader(copy))
    # A filesystem snapfs reads but cannot show is an error, not "no filesystem".
    with pytest.raises(Unsupported, match="log needs recovery"):
        open_guest_fs(*image_reader(copy))
    XfsGuestFs(*image_reader(image))        # the cleanly unmounted one opens


def test_a_log_that_wrapped_is_read_as_the_kernel_does(tmp_path):
    """A small log written round more than once: clean after unmount,
    dirty in a copy taken while mounted (xfs_logprint agrees)."""
    image, copy = tmp_path / "xfs.img", tmp_path / "copy.img"
    make_xfs(image, small_log=True)
    with mounted(image, tmp_path / "mnt", options="loop,logbsize=256k"):
        for round_ in range(12):
            d = tmp_path / "mnt" / f"d{round_}"
            d.mkdir()
            for i in range(1500):
                (d / f"file-{i}").write_text("x")
            subprocess.run(["sync", "-f", str(tmp_path / "mnt")], check=True)
            shutil.rmtree(d)
            subprocess.run(["sync", "-f", str(tmp_path / "mnt")], check=True)
        shutil.copyfile(image, copy)
    assert _logprint_state(image) == "CLEAN"
    gfs = XfsGuestFs(*image_reader(image))
    log_start = gfs._byte(gfs.fs.sb.sb_logstart)
    with open(image, "rb") as f:
        f.seek(log_start)
        block = f.read(8)
    # A record header holds its cycle after the magic; other blocks first.
    first_cycle = int.from_bytes(block[4:] if block[:4] == b"\xfe\xed\xba\xbe" else block[:4], "big")
    assert first_cycle >= 2, "the test's log did not wrap"
    assert _logprint_state(copy) == "DIRTY"
    with pytest.raises(Unsupported, match="log needs recovery"):
        XfsGuestFs(*image_reader(copy))


names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/"),
                min_size=1, max_size=40)
trees = st.dictionaries(names, st.one_of(st.binary(max_size=9000),
                                         st.dictionaries(names, st.binary(max_size=300),
                                                         max_size=40)),
                        max_size=25)


@settings(max_examples=4, deadline=None)
@given(tree=trees)
def test_random_trees(tree, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xfs_random")
    image = tmp / "xfs.img"
    make_xfs(image)
    with mounted(image, tmp / "fill", options="loop"):
        for name, content in tree.items():
            path = tmp / "fill" / name
            if isinstance(content, dict):
                path.mkdir()
                for child, data in content.items():
                    (path / child).write_bytes(data)
            else:
                path.write_bytes(content)
    gfs = XfsGuestFs(*image_reader(image))
    with mounted(image, tmp / "mnt"):
        compare_with_mount(gfs, tmp / "mnt", xattrs=False)


def test_damaged_images_fail_per_request(xfs_image, tmp_path):
    """Bytes flipped in the metadata: each request answers or fails with
    FsDamaged/Unsupported, quickly; opening fails only with those."""
    clean = xfs_image.read_bytes()
    rng = random.Random(1234)
    for trial in range(6):
        data = bytearray(clean)
        # The superblock and AG headers, the first inodes and directory
        # blocks: where a flip changes what is parsed.
        for _ in range(rng.choice((1, 8, 64))):
            at = rng.choice((rng.randrange(0, 4096), rng.randrange(0, 1 << 20),
                             rng.randrange(0, 8 << 20)))
            data[at] ^= 1 << rng.randrange(8)
        if trial % 4 == 3:
            data = data[:rng.randrange(1 << 20, len(data))]       # truncated
        damaged = tmp_path / "damaged.img"
        damaged.write_bytes(data)
        try:
            gfs = XfsGuestFs(*image_reader(damaged))
        except (FsDamaged, Unsupported):
            continue
        exercise_everything(gfs, seconds=20)
