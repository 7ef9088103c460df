"""Fixtures and the oracle of the ``snapfs diff`` tests.

``overlay`` makes a qcow2 layer over a base image that holds exactly the
clusters an edited copy changed (written with qemu-io, as a guest would
have written them), so a chain of two versions is built in a second.

``kernel_diff`` is the oracle: both images loop-mounted read-only, both
trees walked and read in full through the kernel, files matched by inode
number and generation (from debugfs: the kernel offers no call for a
symlink's), and ``zfs diff``'s rules applied as the snapfs docstrings
state them (snapfs/guestfs/treediff.py).  No shortcut: every file's
content is read on both sides.
"""

import contextlib
import os
import re
import stat
import subprocess
from pathlib import Path

CLUSTER = 64 << 10


def run(*cmd, **kw):
    """Run a command; fail with its stderr."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, **kw)
    if result.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): "
                             f"{result.stderr!r}")
    return result


def differing_ranges(path_a, path_b, chunk=CLUSTER):
    """[(offset, length)] of the chunks where two equal-sized files differ."""
    out = []
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        offset = 0
        while True:
            da, db = a.read(chunk), b.read(chunk)
            if not da and not db:
                break
            if da != db:
                if out and out[-1][0] + out[-1][1] == offset:
                    out[-1] = (out[-1][0], out[-1][1] + len(db))
                else:
                    out.append((offset, len(db)))
            offset += max(len(da), len(db))
    return out


def overlay(base, base_format, edited, out, work):
    """qcow2 ``out`` over ``base`` that reads as ``edited``: only the
    clusters that differ are written into it.  Checked by qemu-img compare."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", Path(base).name, "-F", base_format,
        out)
    commands = []
    with open(edited, "rb") as f:
        for i, (offset, length) in enumerate(differing_ranges(base_raw_of(base, work), edited)):
            f.seek(offset)
            piece = Path(work) / f"piece{i}"
            piece.write_bytes(f.read(length))
            commands += ["-c", f"write -q -s {piece} {offset} {length}"]
    for start in range(0, len(commands), 400):
        run("qemu-io", "-f", "qcow2", *commands[start:start + 400], out)
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", out, edited)


def base_raw_of(image, work):
    """``image`` as raw bytes (itself if raw)."""
    fmt = run("qemu-img", "info", "--output=json", image).stdout
    if b'"format": "raw"' in fmt:
        return image
    raw = Path(work) / (Path(image).name + ".raw")
    run("qemu-img", "convert", "-O", "raw", image, raw)
    return raw


@contextlib.contextmanager
def loop_mounted_ro(image, mountpoint):
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    loop = run("losetup", "-f", "--show", "-r", image, text=True).stdout.strip()
    try:
        run("mount", "-o", "ro", loop, mountpoint)
        try:
            yield mountpoint
        finally:
            run("umount", mountpoint)
    finally:
        run("losetup", "-d", loop)


def generations(image, inos):
    """{ino: i_generation} as debugfs reads them."""
    inos = sorted(inos)
    script = "".join(f"stat <{i}>\n" for i in inos)
    out = subprocess.run(["debugfs", "-f", "-", str(image)], input=script, text=True,
                         capture_output=True, check=True,
                         env=dict(os.environ, DEBUGFS_PAGER="__none__", PAGER="cat")).stdout
    found = {}
    for block in re.split(r"(?m)^Inode: ", out)[1:]:
        ino = int(block.split()[0])
        found[ino] = int(re.search(r"Generation: (\d+)", block).group(1))
    assert set(found) == set(inos), "debugfs did not stat every inode"
    return found


class KernelTree:
    """Everything about one tree that the rules look at, read through the
    kernel: names, inodes, attributes, link targets, xattrs, content."""

    def __init__(self, root):
        root = Path(root)
        self.root_ino = os.lstat(root).st_ino
        self.names = {}             # ino -> [(parent ino, name bytes)]
        self.paths = {self.root_ino: b"/"}
        self.info = {self.root_ino: self._info(root)}
        todo = [(root, self.root_ino)]
        while todo:
            directory, dino = todo.pop()
            for entry in os.scandir(os.fsencode(directory)):
                st = entry.stat(follow_symlinks=False)
                self.names.setdefault(st.st_ino, []).append((dino, entry.name))
                self.info.setdefault(st.st_ino, self._info(entry.path))
                if stat.S_ISDIR(st.st_mode):
                    self.paths[st.st_ino] = _child(self.paths[dino], entry.name)
                    todo.append((entry.path, st.st_ino))

    @staticmethod
    def _info(path):
        st = os.lstat(path)
        attrs = {n: os.getxattr(path, n, follow_symlinks=False)
                 for n in os.listxattr(path, follow_symlinks=False)}
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        content = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = f.read()
        return dict(st=st, attrs=attrs, target=target, content=content)


def _child(directory, name):
    return (directory if directory.endswith(b"/") else directory + b"/") + name


def kernel_diff(image_a, image_b, work):
    """[(path, change, new_path)] sorted, by the rules, from the kernel."""
    work = Path(work)
    with loop_mounted_ro(image_a, work / "oracle-a") as ma, \
            loop_mounted_ro(image_b, work / "oracle-b") as mb:
        a, b = KernelTree(ma), KernelTree(mb)
    gen_a = generations(image_a, set(a.info))
    gen_b = generations(image_b, set(b.info))

    def same(ino):
        if ino not in a.info or ino not in b.info:
            return False
        return (gen_a[ino] == gen_b[ino]
                and stat.S_IFMT(a.info[ino]["st"].st_mode) == stat.S_IFMT(b.info[ino]["st"].st_mode))

    def modified(ino):
        ia, ib = a.info[ino], b.info[ino]
        sa, sb = ia["st"], ib["st"]
        key = lambda s: (s.st_mode, s.st_uid, s.st_gid, s.st_size, s.st_mtime_ns, s.st_rdev)
        return (key(sa) != key(sb) or ia["attrs"] != ib["attrs"] or ia["target"] != ib["target"]
                or ia["content"] != ib["content"])

    def path(tree, name_of):
        return _child(tree.paths[name_of[0]], name_of[1])

    out = []
    for ino in set(a.names) | set(b.names):
        in_a, in_b = a.names.get(ino, []), b.names.get(ino, [])
        if not (in_a and in_b and same(ino)):
            out += [(path(a, n), "-", None) for n in in_a]
            out += [(path(b, n), "+", None) for n in in_b]
            continue
        common = [n for n in in_a if n in in_b and same(n[0])]
        gone = sorted(n for n in in_a if n not in common)
        new = sorted(n for n in in_b if n not in common)
        out += [(path(a, o), "R", path(b, n)) for o, n in zip(gone, new)]
        out += [(path(a, n), "-", None) for n in gone[len(new):]]
        out += [(path(b, n), "+", None) for n in new[len(gone):]]
        if common and modified(ino):
            out += [(path(b, n), "M", None) for n in common]
    if same(a.root_ino) and modified(a.root_ino):
        out.append((b"/", "M", None))
    return sorted(out)
