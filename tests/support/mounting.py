"""Real mounts for tests: a context manager that always unmounts."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

SNAPFS = [sys.executable, "-m", "snapfs.cli"]


def snapfs(*args, check=True):
    """Run the snapfs CLI as a user would; returns CompletedProcess."""
    result = subprocess.run(SNAPFS + [str(a) for a in args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snapfs {' '.join(map(str, args))} failed "
                             f"({result.returncode}):\n{result.stderr}")
    return result


def wait_for(predicate, timeout=10):
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass;
    returns its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def expect_errno(code, fn, *args, **kw):
    """``fn(*args, **kw)`` must fail with OSError ``code``."""
    import pytest
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    assert e.value.errno == code, f"{getattr(fn, '__name__', fn)}{args}: " \
                                  f"{os.strerror(e.value.errno)}, wanted {os.strerror(code)}"


def mountinfo_fields(mountpoint):
    """The /proc/self/mountinfo fields of the mount at ``mountpoint``, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return fields
    return None


def snapfs_mounts():
    """Mount points of every snapfs mount on the machine."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " fuse.snapfs " in line]


def force_unmount(mountpoint):
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@contextlib.contextmanager
def mounted(store, mountpoint, *options):
    """Mount ``store`` at ``mountpoint`` in the background; always unmount."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    snapfs("mount", store, mountpoint, *options)
    try:
        yield mountpoint
    finally:
        result = snapfs("umount", mountpoint, check=False)
        if result.returncode != 0:
            # Something (a loop device, a shell) still holds it: detach lazily
            # so that no mount outlives the test.
            force_unmount(mountpoint)
            time.sleep(0.2)
        assert str(mountpoint) not in snapfs_mounts()


@contextlib.contextmanager
def loop_mounted(image, mountpoint, offset=None, readonly=True):
    """Mount an image file (a FUSE view) through a loop device, read-only
    unless asked; always unmount and detach, even on failure."""
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    loop = subprocess.run(["losetup", "-f", "--show"] + (["-r"] if readonly else [])
                          + (["--offset", str(offset)] if offset else []) + [str(image)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro" if readonly else "rw", loop, str(mountpoint)],
                       check=True, capture_output=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, capture_output=True)


def read_tree(root):
    """{relative path: bytes} of the regular files under ``root``."""
    root = Path(root)
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] == "lost+found":
            continue
        if path.is_file() and not path.is_symlink():
            tree[str(rel)] = path.read_bytes()
    return tree


def control(vm, command, text="\n"):
    """Like ``echo TEXT > VM/control/COMMAND``: one write."""
    with open(vm / "control" / command, "w") as f:
        f.write(text)
