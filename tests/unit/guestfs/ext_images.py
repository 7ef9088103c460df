"""Shared by the ext reader's tests: images built by mkfs from a directory,
loop mounts by the kernel (the oracle), and walks through ``GuestFs``."""

import os
import stat
import subprocess
from contextlib import contextmanager

from snapfs.guestfs.ext import ExtGuestFs

MiB = 1 << 20


def run(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True)


def mkfs(image, source, fstype="ext4", block_size=4096, options=(), size=64 * MiB):
    """``mkfs.<fstype> -d source``; dir_index'ed by e2fsck -D, so that
    large directories get their htree, as a kernel would have given them."""
    with open(image, "wb") as f:
        f.truncate(size)
    run(f"mkfs.{fstype}", "-q", "-F", "-b", block_size, *options, "-d", source, image)
    fsck = subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True)
    assert fsck.returncode in (0, 1), fsck.stderr      # 1: "errors corrected" (the reindex)
    return image


@contextmanager
def loop_mounted(image, mountpoint, read_only=True):
    """The kernel's view of an image; always unmounted (mount -o loop
    detaches the loop device with it)."""
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", "-o", "loop,ro" if read_only else "loop", image, mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint)


@contextmanager
def opened(image):
    fd = os.open(image, os.O_RDONLY)
    try:
        yield ExtGuestFs(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def guest_tree(fs):
    """{path: (ino, type)} of every entry under the root, by listdir alone."""
    out, todo = {}, [(b"", fs.root)]
    while todo:
        path, ino = todo.pop()
        for name, child, kind in fs.listdir(ino):
            out[path + b"/" + name] = (child, kind)
            if kind == stat.S_IFDIR:
                todo.append((path + b"/" + name, child))
    return out


def guest_file_bytes(fs, ino):
    inline = fs.inline_data(ino)
    if inline is not None:
        return inline
    runs = fs.runs(ino)
    return fs.read_file(runs, 0, sum(length for _, length in runs))


def kernel_tree(mountpoint):
    """{path: os.lstat} of every entry under a mount point, as bytes paths."""
    out, root = {}, os.fsencode(mountpoint)
    todo = [b""]
    while todo:
        path = todo.pop()
        with os.scandir(root + path) as it:
            for entry in it:
                rel = path + b"/" + entry.name
                st = entry.stat(follow_symlinks=False)
                out[rel] = st
                if stat.S_ISDIR(st.st_mode):
                    todo.append(rel)
    return out
