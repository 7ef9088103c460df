"""Crash-consistent ext4 images: copied while mounted read-write, so the
superblock says ``needs_recovery`` and the kernel must replay the journal
before it mounts them (what a live snapshot without a freeze holds)."""

import contextlib
import random
import subprocess
from pathlib import Path

FS_SIZE = 48 << 20
PART_START = 1 << 20


def _run(*argv):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def _tree(seed):
    rnd = random.Random(seed)
    files = {}
    for d in range(4):
        for f in range(6):
            files[f"dir{d}/file{f}.bin"] = rnd.randbytes(rnd.randrange(100, 200_000))
    files["etc/hostname"] = b"crashed\n"
    return files


@contextlib.contextmanager
def _loop(image, partitioned, fs_size=FS_SIZE):
    # An offset, not losetup -P: some kernels have no partitions on loops.
    where = ["--offset", PART_START, "--sizelimit", fs_size] if partitioned else []
    loop = _run("losetup", "-f", "--show", *where, image).strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def build_dirty_ext4(image, workdir, partitioned=False, seed=1, *, files=None,
                     mkfs=("mkfs.ext4",), mount_options=(), then=None, fs_size=FS_SIZE):
    """Write a disk image at ``image``: ext4, whole disk or in MBR
    partition 1, captured mid-flight.  Returns {path: bytes} of its files.

    ``files`` ({path: bytes}, by default a tree from ``seed``) are written
    and synced: their home blocks are written, and the journal holds them
    too.  ``then(mountpoint)``, if given, changes the tree further after
    the sync and commits its changes with fsync alone, which writes the
    journal and not the home blocks: then the journal holds the only
    copy of that metadata.  ``mkfs`` (argv) and ``mount_options`` choose
    the flavor (ext3, block size, data=journal, ...)."""
    image, workdir = Path(image), Path(workdir)
    live = workdir / f"live-{image.name}"
    mnt = workdir / f"mnt-{image.name}"
    mnt.mkdir(parents=True)
    size = fs_size + (PART_START if partitioned else 0)
    with open(live, "wb") as f:
        f.truncate(size)
    if partitioned:
        subprocess.run(["sfdisk", "--quiet", str(live)], input=f"start={PART_START // 512}, type=83\n",
                       text=True, check=True, capture_output=True)
    files = _tree(seed) if files is None else files
    with _loop(live, partitioned, fs_size) as device:
        _run(*mkfs, "-q", "-F", device)
        _run("mount", *(["-o", ",".join(mount_options)] if mount_options else []), device, mnt)
        try:
            for rel, data in files.items():
                path = mnt / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            # The journal holds the commit; copy the device before the
            # unmount checkpoints it and clears needs_recovery.  syncfs of
            # this filesystem alone (sync(2) would wait on every other
            # filesystem of the machine, stuck ones included).
            _run("sync", "-f", mnt)
            if then is not None:
                then(mnt)
            _run("cp", "--sparse=always", live, image)
        finally:
            _run("umount", mnt)
    live.unlink()
    return files


def needs_recovery(image, offset=0):
    """Whether the ext4 at ``offset`` of ``image`` (a file or a view) has
    a journal to replay: INCOMPAT_RECOVER in its superblock."""
    with open(image, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(1024)
    assert sb[0x38:0x3A] == b"\x53\xef", "no ext4 superblock"
    return bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)
