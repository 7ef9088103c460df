"""Trees of files for the file-tree tests: random ones written to a
directory (for ``mkfs.ext4 -d``), and a walk that records everything a
user sees of a tree, to compare snapfs's trees with the kernel's mounts."""

import os
import stat

from hypothesis import strategies as st

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12) \
    .filter(lambda n: n not in (".", ".."))


@st.composite
def random_trees(draw, max_files=25):
    """{relative path: spec}: spec is ("file", bytes, mode), ("dir", mode),
    ("link", target), ("hard", existing file path), ("fifo",)."""
    tree = {}
    dirs = [""]
    for _ in range(draw(st.integers(1, max_files))):
        parent = draw(st.sampled_from(dirs))
        path = os.path.join(parent, draw(NAME))
        if path in tree or any(p.startswith(path + "/") for p in tree):
            continue
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "link", "hard", "fifo"]))
        files = [p for p, s in tree.items() if s[0] == "file"]
        if kind == "file":
            size = draw(st.sampled_from([0, 1, 59, 4095, 4096, 70_000, 300_000]))
            data = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
            data = (data * (size // max(len(data), 1) + 1))[:size] if data else bytes(size)
            tree[path] = ("file", data, draw(st.sampled_from([0o644, 0o600, 0o755, 0o640])))
        elif kind == "dir":
            tree[path] = ("dir", draw(st.sampled_from([0o755, 0o700, 0o750])))
            dirs.append(path)
        elif kind == "link":
            tree[path] = ("link", draw(st.sampled_from(["a", "../x", "/etc/passwd", "l" * 100])))
        elif kind == "hard" and files:
            tree[path] = ("hard", draw(st.sampled_from(files)))
        elif kind == "fifo":
            tree[path] = ("fifo",)
    return tree


def write_tree(root, tree, owners=None):
    """Write ``tree`` under ``root``; ``owners`` {path: (uid, gid)}."""
    os.makedirs(root, exist_ok=True)
    # Directories before what is in them, hard links after what they name.
    for path, spec in sorted(tree.items(), key=lambda kv: (kv[1][0] == "hard", kv[0].count("/"))):
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if spec[0] == "file":
            with open(full, "wb") as f:
                f.write(spec[1])
            os.chmod(full, spec[2])
        elif spec[0] == "dir":
            os.makedirs(full, exist_ok=True)
            os.chmod(full, spec[1])
        elif spec[0] == "link":
            os.symlink(spec[1], full)
        elif spec[0] == "hard":
            os.link(os.path.join(root, spec[1]), full)
        elif spec[0] == "fifo":
            os.mkfifo(full)
    for path, (uid, gid) in (owners or {}).items():
        os.lchown(os.path.join(root, path), uid, gid)


def snapshot_tree(root, skip=("lost+found",)):
    """{path: what a user sees of it}: type and mode, owner, size, links,
    mtime, device, link target, attributes, bytes; and which paths are one
    inode (hard links), as sets of paths."""
    seen, by_inode = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st_ = os.lstat(full)
            item = dict(mode=st_.st_mode, uid=st_.st_uid, gid=st_.st_gid, nlink=st_.st_nlink,
                        mtime_ns=st_.st_mtime_ns, rdev=st_.st_rdev,
                        xattrs=_xattrs(full))
            if not stat.S_ISDIR(st_.st_mode):
                item["size"] = st_.st_size
            if stat.S_ISLNK(st_.st_mode):
                item["target"] = os.readlink(full)
            elif stat.S_ISREG(st_.st_mode):
                with open(full, "rb") as f:
                    item["data"] = f.read()
            seen[rel] = item
            by_inode.setdefault(st_.st_ino, set()).add(rel)
    links = sorted(sorted(paths) for paths in by_inode.values() if len(paths) > 1)
    return seen, links


def _xattrs(path):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
            if n.startswith("user.")}
