"""The ext reader against the kernel: what it shows of an ext2/3/4 image is
what ``mount -o loop,ro`` of the same image shows.

Trees are drawn by hypothesis (regular, sparse and large files, deep and
large directories, odd and long names, symlinks fast and slow, hard
links, fifos, devices past 255, user attributes) and put into images by
``mkfs.ext* -d``.  What mkfs cannot write is then written by the kernel
itself on a read-write loop mount: fallocated (unwritten) extents, and
timestamps with nanoseconds, before 1970 and after 2038 and 2106.
"""

import os
import random
import stat
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.guestfs.ext_images import (guest_file_bytes, guest_tree, kernel_tree,
                                           loop_mounted, mkfs, opened, run)

SECOND = 10 ** 9
# (mkfs, block size, options): every combination the brief asks for at least once.
CONFIGS = {
    "ext2-1k": ("ext2", 1024, ["-I", "128"]),
    "ext3-4k": ("ext3", 4096, ["-I", "256"]),
    "ext4-4k-64bit-csum-inline": ("ext4", 4096, ["-I", "256", "-O", "64bit,metadata_csum,inline_data"]),
    "ext4-1k-no64bit-nocsum": ("ext4", 1024, ["-I", "256", "-O", "^64bit,^metadata_csum"]),
    "ext4-4k-128-byte-inodes": ("ext4", 4096, ["-I", "128", "-O", "^metadata_csum"]),
}

plain_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=16).map(str.encode)
odd_names = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"/", b"\xff").replace(b"\0", b"\xfe"))
long_names = st.integers(250, 255).map(lambda n: b"L" * n)
names = st.one_of(plain_names, plain_names, odd_names, long_names, st.just(b"\xff\xfe")).filter(
    lambda n: n not in (b".", b".."))
# From 1901 (signed 32-bit seconds) to past 2038 and 2106 (epoch bits).
mtimes = st.integers(-(1 << 31) * SECOND, (1 << 33) * SECOND + 999_999_999)
owners = st.integers(0, (1 << 32) - 2)
perms = st.integers(0, 0o7777)
sizes = st.one_of(st.sampled_from([0, 1, 59, 60, 61, 1023, 1024, 4095, 4096, 4097]),
                  st.integers(0, 200_000), st.integers(1 << 20, (1 << 20) + 70_000))
xattr_sets = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=10).map(lambda s: b"user." + s.encode()),
    st.binary(max_size=1500), max_size=3)


# A POSIX ACL as getxattr gives it: version 2, then (tag, perm, id) for the
# owner, user 1000, the group, group 2000, the mask and others.
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in [
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x08, 5, 2000),
    (0x10, 7, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)])


@st.composite
def nodes(draw, block_size):
    kind = draw(st.sampled_from(["reg", "reg", "sparse", "symlink", "hardlink", "fifo", "dev"]))
    node = {"kind": kind, "mtime": draw(mtimes), "uid": draw(owners), "gid": draw(owners),
            "perm": draw(perms), "xattrs": {}}
    if kind == "reg":
        node["size"] = draw(sizes)
        node["xattrs"] = draw(xattr_sets)
    elif kind == "sparse":
        node["size"] = draw(st.integers(1, 3 << 20))
        node["writes"] = draw(st.lists(st.tuples(st.integers(0, 3 << 20), st.integers(1, 9000)),
                                       max_size=4))
    elif kind == "symlink":
        # mkfs refuses a target of a block or more (so does the kernel).
        node["target"] = draw(st.one_of(st.binary(min_size=1, max_size=59),
                                        st.binary(min_size=60, max_size=block_size - 1)).map(
            lambda b: b.replace(b"\0", b"x")))
    elif kind == "dev":
        node["dev"] = (draw(st.sampled_from([stat.S_IFCHR, stat.S_IFBLK])),
                       draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
    return node


@st.composite
def trees(draw, block_size):
    """A directory tree: a deep chain, a large directory (an htree), a few
    more directories, and files spread over them."""
    depth = draw(st.integers(1, 40))
    dirs = [b""] + [b"/".join([b"deep"] * (i + 1)) for i in range(depth)]
    dirs += [b"big"] + [b"sub%d" % i for i in range(draw(st.integers(0, 3)))]
    files = draw(st.lists(st.tuples(st.integers(0, len(dirs) - 1), names, nodes(block_size)),
                          max_size=25, unique_by=lambda t: (t[0], t[1])))
    return {"dirs": dirs, "big": draw(st.integers(1000, 1100)), "files": files,
            "dir_mtimes": [draw(mtimes) for _ in dirs], "seed": draw(st.integers(0, 1 << 30)),
            "fallocated": draw(st.lists(st.tuples(st.integers(1, 300_000), st.integers(0, 9000),
                                                  st.booleans()), max_size=3))}


def build(tree, source):
    rng = random.Random(tree["seed"])
    for d in tree["dirs"]:
        os.makedirs(os.path.join(source, os.fsdecode(d)), exist_ok=True)
    for i in range(tree["big"]):
        open(os.path.join(source, "big", f"entry-{i:05d}-{'x' * (i % 40)}"), "w").close()
    regular = []
    for where, name, node in tree["files"]:
        path = os.path.join(os.fsencode(source), tree["dirs"][where], name)
        kind = node["kind"]
        if kind == "hardlink":
            if not regular:
                continue
            os.link(rng.choice(regular), path)
            continue
        if kind == "reg":
            with open(path, "wb") as f:
                f.write(rng.randbytes(node["size"]))
            regular.append(path)
        elif kind == "sparse":
            with open(path, "wb") as f:
                f.truncate(node["size"])
                for offset, length in node["writes"]:
                    f.seek(min(offset, node["size"] - 1))
                    f.write(rng.randbytes(length))
            regular.append(path)
        elif kind == "symlink":
            os.symlink(node["target"], path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev":
            kind_bits, major, minor = node["dev"]
            os.mknod(path, kind_bits | 0o600, os.makedev(major, minor))
        for key, value in node["xattrs"].items():
            os.setxattr(path, key, value)
        os.chown(path, node["uid"], node["gid"], follow_symlinks=False)
        if kind != "symlink":
            os.chmod(path, node["perm"])
        os.utime(path, ns=(node["mtime"], node["mtime"]), follow_symlinks=False)
    # Directories last, deepest first: their children changed their times.
    for d, mtime in sorted(zip(tree["dirs"], tree["dir_mtimes"]), key=lambda t: -len(t[0])):
        path = os.path.join(os.fsencode(source), d)
        os.utime(path, ns=(mtime, mtime))


def kernel_pass(image, tree, mountpoint, fallocate=True):
    """What mkfs -d cannot write, written by the kernel on a read-write loop
    mount: unwritten extents (fallocated files, some with a few bytes
    written in the middle, some kept at a smaller size), and timestamps
    with nanoseconds and epoch bits (mkfs 1.47.0 keeps neither)."""
    rng = random.Random(tree["seed"])
    with loop_mounted(image, mountpoint, read_only=False):
        root = os.fsencode(mountpoint)
        for i, (length, written, keep_size) in enumerate(tree["fallocated"] if fallocate else []):
            path = os.path.join(mountpoint, f"fallocated-{i}")
            open(path, "wb").close()
            run("fallocate", *(["-n"] if keep_size else []), "-l", length, path)
            if written:
                with open(path, "r+b") as f:
                    f.seek(rng.randrange(length))
                    f.write(rng.randbytes(written))
        for where, name, node in tree.get("files", []):
            path = os.path.join(root, tree["dirs"][where], name)
            if os.path.lexists(path) and rng.random() < 0.5:
                os.utime(path, ns=(node["mtime"], node["mtime"]), follow_symlinks=False)
        for d, mtime in sorted(zip(tree.get("dirs", []), tree.get("dir_mtimes", [])),
                               key=lambda t: -len(t[0])):
            os.utime(os.path.join(root, d), ns=(mtime, mtime))


def compare_with_kernel(image, mountpoint):
    with opened(image) as fs, loop_mounted(image, mountpoint):
        expected = kernel_tree(mountpoint)
        found = guest_tree(fs)
        assert sorted(found) == sorted(expected)
        root = os.fsencode(mountpoint)
        for path, st_k in expected.items():
            ino, kind = found[path]
            st_g = fs.stat(ino)
            assert (ino, kind) == (st_k.st_ino, stat.S_IFMT(st_k.st_mode)), path
            assert (st_g.mode, st_g.uid, st_g.gid, st_g.size, st_g.nlink, st_g.mtime_ns) == (
                st_k.st_mode, st_k.st_uid, st_k.st_gid, st_k.st_size, st_k.st_nlink,
                st_k.st_mtime_ns), path
            if stat.S_ISCHR(st_k.st_mode) or stat.S_ISBLK(st_k.st_mode):
                assert st_g.rdev == st_k.st_rdev, path
            full = root + path
            if stat.S_ISLNK(st_k.st_mode):
                assert fs.readlink(ino) == os.readlink(full), path
            else:
                names = [os.fsencode(n) for n in os.listxattr(full, follow_symlinks=False)]
                kernel_xattrs = {n: os.getxattr(full, n, follow_symlinks=False) for n in names
                                 if n.startswith((b"user.", b"security."))}
                guest_xattrs = {n: v for n, v in fs.xattrs(ino).items()
                                if n.startswith((b"user.", b"security."))}
                assert guest_xattrs == kernel_xattrs, path
            if stat.S_ISREG(st_k.st_mode):
                with open(full, "rb") as f:
                    assert guest_file_bytes(fs, ino) == f.read(), path
        return found


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_kernel(config, tmp_path):
    fstype, block_size, options = CONFIGS[config]

    @settings(max_examples=int(os.environ.get("EXT_READER_EXAMPLES", "8")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(tree=trees(block_size))
    def check(tree):
        work = tempfile.mkdtemp(dir=tmp_path)
        source, image, mnt = (os.path.join(work, n) for n in ("src", "fs.img", "mnt"))
        os.mkdir(source)
        build(tree, source)
        mkfs(image, source, fstype, block_size, options)
        kernel_pass(image, tree, mnt, fallocate=fstype == "ext4")
        compare_with_kernel(image, mnt)

    check()


def test_features_are_exercised(tmp_path):
    """The generated images do hold what the comparison is meant to cover:
    an htree directory, inline data, unwritten extents, an attribute block,
    a slow symlink, and times past 2038 in the extra fields."""
    source, image = tmp_path / "src", tmp_path / "fs.img"
    (source / "big").mkdir(parents=True)
    for i in range(1000):
        (source / "big" / f"entry-{i:05d}").touch()
    (source / "small").write_bytes(b"inline")
    (source / "attrs").write_bytes(b"x")
    os.setxattr(source / "attrs", b"user.big", b"v" * 1500)
    os.symlink("t" * 3000, source / "slow")
    os.setxattr(source / "attrs", "system.posix_acl_access", ACL)
    mkfs(image, source, "ext4", 4096, ["-I", "256", "-O", "inline_data"])
    late = 5_000_000_000 * SECOND + 7
    tree = {"seed": 1, "fallocated": [(100_000, 10, False)], "dirs": [b"", b"big"],
            "dir_mtimes": [late, -5 * SECOND - 1]}
    kernel_pass(image, tree, tmp_path / "mnt")
    stats = {}
    for name in ("big", "small", "attrs", "slow", "fallocated-0"):
        stats[name] = run("debugfs", "-R", f"stat /{name}", image).stdout.decode()
    assert "Flags: 0x1000" in stats["big"] or "INDEX_FL" in stats["big"] or \
        "Flags: 0x81000" in stats["big"]
    assert "Size of inline data" in stats["small"]
    assert "File ACL: 0" not in stats["attrs"]
    assert "EXTENTS" in stats["slow"] and "Fast link dest" not in stats["slow"]
    assert "Uninit" in run("debugfs", "-R", "ex /fallocated-0", image).stdout.decode()
    found = compare_with_kernel(image, tmp_path / "mnt")
    with opened(image) as fs:
        assert fs.stat(fs.root).mtime_ns == late
        acl = os.getxattr(tmp_path / "src" / "attrs", "system.posix_acl_access")
        assert fs.xattrs(found[b"/attrs"][0])[b"system.posix_acl_access"] == acl == ACL
        assert fs.stat(found[b"/big"][0]).mtime_ns == -5 * SECOND - 1
