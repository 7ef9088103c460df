"""The kernel as the oracle for the guest filesystem readers: an image is
mounted read-only and every path, its stat, link target and bytes are
compared with what the reader says."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time

from snapfs.guestfs.base import FsDamaged, Unsupported


def image_reader(path):
    """(read, size) over an image file, as a partition view gives them."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size

    def read(offset, length):
        return os.pread(fd, length, offset)
    return read, size


@contextlib.contextmanager
def mounted(image, mnt, *args, options="ro,loop", fstype=None):
    """``image`` mounted at ``mnt`` (loop); always unmounted (and the loop
    device, attached with autoclear, detached with it)."""
    os.makedirs(mnt, exist_ok=True)
    cmd = ["mount", "-o", options, *args]
    if fstype:
        cmd += ["-t", fstype]
    subprocess.run(cmd + [str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def walk_guest(gfs):
    """{path bytes: (ino, Stat)} of every file below the root."""
    out = {}

    def visit(ino, prefix):
        for name, child, ftype in gfs.listdir(ino):
            st = gfs.stat(child)
            assert ftype in (0, stat.S_IFMT(st.mode)), (prefix + name, ftype, st.mode)
            out[prefix + name] = (child, st)
            if st.is_dir:
                visit(child, prefix + name + b"/")
    visit(gfs.root, b"")
    return out


def walk_mount(mnt):
    """{path bytes: os.stat_result} of every file below the mount point."""
    out = {}
    root = os.fsencode(mnt)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def guest_bytes(gfs, ino):
    inline = gfs.inline_data(ino)
    if inline is not None:
        return inline
    return gfs.read_file(gfs.runs(ino), 0, gfs.stat(ino).size)


def compare_with_mount(gfs, mnt, *, xattrs=True, times=("mtime", "atime", "ctime"),
                       inode_numbers=True):
    """Assert the reader shows the tree the kernel shows at ``mnt``; the
    number of files compared."""
    guest, kernel = walk_guest(gfs), walk_mount(mnt)
    assert sorted(guest) == sorted(kernel)
    root = os.fsencode(mnt)
    for path, (ino, st) in guest.items():
        ks = kernel[path]
        where = path.decode(errors="replace")
        if inode_numbers:
            assert ino == ks.st_ino, where
        assert (st.mode, st.nlink, st.uid, st.gid) == \
            (ks.st_mode, ks.st_nlink, ks.st_uid, ks.st_gid), where
        if not stat.S_ISDIR(st.mode):
            assert st.size == ks.st_size, where
        for name in times:
            assert getattr(st, f"{name}_ns") == getattr(ks, f"st_{name}_ns"), (where, name)
        if stat.S_ISCHR(st.mode) or stat.S_ISBLK(st.mode):
            assert st.rdev == ks.st_rdev, where
        full = os.path.join(root, path)
        if stat.S_ISLNK(st.mode):
            assert gfs.readlink(ino) == os.readlink(full), where
        if stat.S_ISREG(st.mode):
            with open(full, "rb") as f:
                assert guest_bytes(gfs, ino) == f.read(), where
        if xattrs:
            names = os.listxattr(full, follow_symlinks=False)
            want = {os.fsencode(n): os.getxattr(full, n, follow_symlinks=False) for n in names}
            assert gfs.xattrs(ino) == want, where
    return len(guest)


def exercise_everything(gfs, seconds=20.0):
    """Call every public method on every inode reachable from the root;
    each must answer or raise FsDamaged/Unsupported, and all of it must
    end in ``seconds``.  The number of calls answered."""
    deadline = time.monotonic() + seconds
    answered, todo, seen = 0, [gfs.root], set()
    while todo:
        assert time.monotonic() < deadline, "a damaged filesystem took too long"
        ino = todo.pop()
        if ino in seen or len(seen) > 5000:
            continue
        seen.add(ino)
        inline = None
        for method in (gfs.stat, gfs.listdir, gfs.readlink, gfs.xattrs, gfs.inline_data,
                       gfs.runs, gfs.metadata_ranges):
            if method == gfs.runs and inline is not None:
                continue        # the interface: runs only of files without inline data
            try:
                result = method(ino)
            except (FsDamaged, Unsupported):
                continue
            answered += 1
            if method == gfs.inline_data:
                inline = result
            if method == gfs.listdir:
                todo.extend(child for _name, child, _type in result)
            if method == gfs.runs and result:
                try:
                    gfs.read_file(result, 0, 1 << 20)
                except (FsDamaged, Unsupported):
                    pass
    return answered
