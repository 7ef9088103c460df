#!/usr/bin/env python3
"""Build a partitioned ext4 VM disk as a qcow2 backing chain, one layer per version.

Layout (the same byte offsets for both tables; 1 MiB left free at each end of the disk):

    p1        ext4 "vmroot"  from 1 MiB, most of the disk   the versioned file tree
    p2        ext4 "data"    4 MiB                          DATA_TREE, same in every version
    p5 / p3   ext4 "logs"    4 MiB                          logs_tree(k), grows per version
              (MBR: logical p5 inside extended p3; GPT: plain p3)

Version 1 becomes ``base.qcow2``; version k > 1 becomes ``vK.qcow2``, an overlay on the
previous layer that holds only the clusters that changed.  Backing names are bare file
names, so the directory can be moved as a whole.

Usage: python3 scripts/ext4chain.py OUTDIR [--table mbr|gpt] [--size 64M] [--keep-raw]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

MiB = 1 << 20
SECTOR = 512
FAKE_TIME = 1700000000  # 2023-11-14, used for every timestamp in the filesystems
SMALL_PART = 4 * MiB  # size of the "data" and "logs" partitions
FS_UUIDS = {"vmroot": "5eed0001-0000-4000-8000-000000000001",
            "data": "5eed0001-0000-4000-8000-000000000002",
            "logs": "5eed0001-0000-4000-8000-000000000005"}
HASH_SEED = "5eed0001-0000-4000-8000-0000000000ff"
TOOLS = ("mkfs.ext4", "debugfs", "e2fsck", "sfdisk", "sgdisk", "qemu-img")


def _blob(size: int, seed: bytes) -> bytes:
    """Deterministic pseudo-random bytes."""
    return hashlib.shake_256(seed).digest(size)


_V1 = {"etc/hostname": b"web01\n",
       "etc/motd": b"Welcome to web01. Authorised access only.\n",
       "etc/fstab": b"LABEL=vmroot / ext4 defaults 0 1\nLABEL=data /data ext4 defaults 0 2\n",
       "var/www/index.html": b"<h1>v1</h1>\n",
       "home/admin/notes.txt": b"TODO: write the about page\n",
       "usr/lib/libweb.so.1": _blob(4 * MiB, b"libweb")}  # the bulk of the "OS", stays in base
_V2 = {**_V1, "var/www/index.html": b"<h1>v2</h1>\n<p>now with an about page</p>\n",
       "var/www/about.html": b"<h1>About web01</h1>\n"}
_V3 = {k: v for k, v in _V2.items() if k != "home/admin/notes.txt"}
_V3.update({"var/www/index.html": b"<h1>v3</h1>\n<p>download the release below</p>\n",
            "var/www/release.bin": _blob(MiB, b"release")})
#: Three versions of a small web server's root filesystem (relative path -> content).
DEFAULT_VERSIONS: list[dict[str, bytes]] = [_V1, _V2, _V3]
#: Contents of partition 2 ("data") in every version.
DATA_TREE: dict[str, bytes] = {"README.txt": b"This is the data partition.\n"}


def logs_tree(version: int) -> dict[str, bytes]:
    """Contents of the "logs" partition in version `version` (1-based): one boot line per version."""
    return {"var/log/syslog": "".join(f"boot of version {i}\n" for i in range(1, version + 1)).encode()}


class ChainBuildError(RuntimeError):
    """An external tool failed or the result did not verify."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a tool with check=True; turn failures into a ChainBuildError showing its stderr."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise ChainBuildError(f"tool not found: {cmd[0]} (is it installed and on PATH?)") from e
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or e.stdout or "").strip()
        raise ChainBuildError(f"command failed (exit {e.returncode}): {' '.join(cmd)}\n{detail}") from e


def partition1_offset(table: str = "mbr") -> int:
    """Byte offset of partition 1 (the versioned root filesystem); 1 MiB for both tables."""
    _check_table(table)
    return MiB


def partition_layout(table: str = "mbr", disk_size: int = 64 << 20) -> list[tuple[int, int, int, str]]:
    """Filesystem partitions as (number, byte offset, byte size, label), in disk order."""
    _check_table(table)
    root_size = disk_size - 2 * MiB - SMALL_PART - (MiB + SMALL_PART)
    if disk_size % MiB or root_size < 8 * MiB:
        raise ValueError(f"disk size must be a whole number of MiB and at least 19 MiB, got {disk_size}")
    data_off = MiB + root_size
    logs_off = data_off + SMALL_PART + MiB  # MBR: EBR lives in the MiB before the logical partition
    return [(1, MiB, root_size, "vmroot"), (2, data_off, SMALL_PART, "data"),
            (5 if table == "mbr" else 3, logs_off, SMALL_PART, "logs")]


def _check_table(table: str) -> None:
    if table not in ("mbr", "gpt"):
        raise ValueError(f"table must be 'mbr' or 'gpt', got {table!r}")


def _dirs_of(tree: dict[str, bytes]) -> set[str]:
    """All directories (relative, '/'-joined) that the files of `tree` live in."""
    return {"/".join(Path(rel).parts[:i]) for rel in tree for i in range(1, len(Path(rel).parts))}


def _debugfs(image: Path, commands: list[str]) -> None:
    """Run debugfs commands read-write on `image`; fail if any of them reports an error."""
    out = _run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands) + "\n",
               env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FAKE_TIME)})
    errors = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise ChainBuildError(f"debugfs on {image.name} failed:\n" + "\n".join(errors))


def _finish_ext4(image: Path, tree: dict[str, bytes]) -> None:
    """Pin every timestamp of `tree`'s files and dirs (mkfs/debugfs copy them from the host
    files) so unchanged inodes stay bit-identical, then check the filesystem."""
    paths = ["/"] + sorted("/" + p for p in _dirs_of(tree) | tree.keys())
    _debugfs(image, [f'sif "{p}" {field} {FAKE_TIME}' for p in paths for field in ("atime", "mtime", "ctime")])
    _run(["e2fsck", "-f", "-n", str(image)])


def _make_ext4(image: Path, size: int, label: str, tree: dict[str, bytes], work: Path) -> None:
    """Create a deterministic ext4 image file of `size` bytes populated with `tree`."""
    src = Path(tempfile.mkdtemp(prefix=f"tree-{label}-", dir=work))
    for rel, content in tree.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", "-d", str(src), "-L", label, "-U", FS_UUIDS[label], "-T", "small",
          "-E", f"root_owner=0:0,hash_seed={HASH_SEED}", str(image)],
         env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FAKE_TIME)})
    shutil.rmtree(src)
    _finish_ext4(image, tree)


def _edit_ext4(image: Path, old: dict[str, bytes], new: dict[str, bytes], work: Path) -> None:
    """Turn the filesystem holding `old` into one holding `new`, in place, the way a running VM
    would: unchanged files keep their blocks, so the next overlay stays small."""
    def at(rel: str, cmd: str, *args: str) -> list[str]:
        # cd to the parent first: debugfs rm/rmdir mishandle top-level absolute paths
        parent, name = os.path.split(rel)
        return [f'cd "/{parent}"', " ".join([cmd, *(f'"{a}"' for a in args), f'"{name}"'])]

    changed = sorted(rel for rel in new if old.get(rel) != new[rel])
    cmds = [c for rel in sorted(old) if rel not in new or rel in changed for c in at(rel, "rm")]
    cmds += [f'mkdir "/{d}"' for d in sorted(_dirs_of(new) - _dirs_of(old))]  # parents sort first
    for i, rel in enumerate(changed):
        (work / f"new-{i}").write_bytes(new[rel])
        cmds += at(rel, "write", str(work / f"new-{i}"))
    cmds += [c for d in sorted(_dirs_of(old) - _dirs_of(new), reverse=True) for c in at(d, "rmdir")]
    if cmds:
        _debugfs(image, cmds)
    for i in range(len(changed)):
        (work / f"new-{i}").unlink()
    _finish_ext4(image, new)


def _write_partition_table(disk: Path, table: str, layout: list[tuple[int, int, int, str]]) -> None:
    (_, r_off, r_size, _), (_, d_off, d_size, _), (_, l_off, l_size, _) = layout
    s = lambda n: n // SECTOR  # noqa: E731  (bytes -> sectors)
    if table == "mbr":
        script = (f"label: dos\nlabel-id: 0x5eed0001\nunit: sectors\n\n"
                  f"start={s(r_off)}, size={s(r_size)}, type=83\n"
                  f"start={s(d_off)}, size={s(d_size)}, type=83\n"
                  f"start={s(l_off - MiB)}, size={s(l_size + MiB)}, type=5\n"
                  f"start={s(l_off)}, size={s(l_size)}, type=83\n")
        _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)], input=script)
    else:
        cmd = ["sgdisk", "-o", "-U", "5eed0001-0000-4000-8000-00000000d15c"]
        for num, off, size, label in layout:
            cmd += ["-n", f"{num}:{s(off)}:{s(off + size) - 1}", "-t", f"{num}:8300",
                    "-c", f"{num}:{label}", "-u", f"{num}:5eed0001-0000-4000-8000-0000000000{num:02d}"]
        _run(cmd + [str(disk)])


def _copy_sparse(src: Path, dst: Path, offset: int, chunk: int = 64 << 10) -> None:
    """Copy `src` into `dst` at `offset` without truncating, skipping all-zero chunks."""
    zero = bytes(chunk)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        pos = 0
        while data := fin.read(chunk):
            if data != zero[:len(data)]:
                fout.seek(offset + pos)
                fout.write(data)
            pos += len(data)


def build_ext4_chain(outdir: Path, table: str = "mbr", versions: list[dict[str, bytes]] | None = None,
                     disk_size: int = 64 << 20, keep_raw: bool = False,
                     log: Callable[[str], None] | None = None) -> list[Path]:
    """Build one raw disk per version and turn them into a qcow2 chain in `outdir`.

    Returns the layer paths bottom first: base.qcow2, v2.qcow2, v3.qcow2, ...
    With keep_raw=True the raw disks v1.raw, v2.raw, ... are left next to them as oracles.
    `log`, if given, receives one human-readable line per step.
    """
    say = log or (lambda msg: None)
    versions = DEFAULT_VERSIONS if versions is None else versions
    if not versions:
        raise ValueError("need at least one version")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ChainBuildError(f"missing tools: {', '.join(missing)} (need e2fsprogs, fdisk, gdisk, qemu-utils)")
    layout = partition_layout(table, disk_size)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    layers: list[Path] = []
    raws: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".ext4chain-", dir=outdir) as tmp:
        work = Path(tmp)
        template = work / "table.raw"  # empty disk with just the partition table
        with open(template, "wb") as f:
            f.truncate(disk_size)
        _write_partition_table(template, table, layout)
        images = {label: work / f"{label}.img" for _, _, _, label in layout}
        _make_ext4(images["data"], SMALL_PART, "data", DATA_TREE, work)
        for k, tree in enumerate(versions, start=1):
            say(f"version {k}/{len(versions)}: {len(tree)} files -> v{k}.raw ({table}, {disk_size // MiB} MiB)")
            if k == 1:
                _make_ext4(images["vmroot"], layout[0][2], "vmroot", tree, work)
            else:
                _edit_ext4(images["vmroot"], versions[k - 2], tree, work)
            _make_ext4(images["logs"], SMALL_PART, "logs", logs_tree(k), work)
            raw = outdir / f"v{k}.raw"
            raw.unlink(missing_ok=True)
            with open(raw, "wb") as f:
                f.truncate(disk_size)
            _copy_sparse(template, raw, 0)
            for _, off, _, label in layout:
                _copy_sparse(images[label], raw, off)
            raws.append(raw)

            layer = outdir / ("base.qcow2" if k == 1 else f"v{k}.qcow2")
            layer.unlink(missing_ok=True)
            if k == 1:
                _run(["qemu-img", "convert", "-O", "qcow2", raw.name, layer.name], cwd=outdir)
            else:
                # `qemu-img convert -B` would copy every cluster of a raw source.  Instead make an
                # empty overlay of the raw disk and safely rebase it onto the previous layer:
                # qemu-img then copies in exactly the clusters that differ.
                _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw",
                      layer.name], cwd=outdir)
                _run(["qemu-img", "rebase", "-f", "qcow2", "-b", layers[-1].name, "-F", "qcow2",
                      layer.name], cwd=outdir)
            say(f"  layer {layer.name}: {layer.stat().st_blocks * 512 // 1024} KiB on disk"
                + (f", backing {layers[-1].name}" if layers else ""))
            layers.append(layer)

    for layer in layers:
        _run(["qemu-img", "check", "-q", layer.name], cwd=outdir)
    info = json.loads(_run(["qemu-img", "info", "--backing-chain", "--output=json", layers[-1].name],
                           cwd=outdir).stdout)
    chain = [entry["filename"] for entry in reversed(info)]
    if [Path(c).name for c in chain] != [p.name for p in layers] or info[-1].get("backing-filename"):
        raise ChainBuildError(f"unexpected backing chain {chain}, wanted {[p.name for p in layers]}")
    if not keep_raw:
        for raw in raws:
            raw.unlink()
    say(f"chain ok: {' <- '.join(p.name for p in layers)} in {outdir}")
    return layers


def read_tree_via_loop(image_path: Path, offset: int = 0, sizelimit: int | None = None) -> dict[str, bytes]:
    """Mount a filesystem image read-only via a loop device and return {relative path: bytes}.

    Only regular files are returned; top-level lost+found is skipped.  The loop device is
    always unmounted and detached, even on failure.
    """
    cmd = ["losetup", "-f", "--show", "-r", "--offset", str(offset)]
    if sizelimit is not None:
        cmd += ["--sizelimit", str(sizelimit)]
    mnt = Path(tempfile.mkdtemp(prefix="ext4chain-mnt-"))
    device, mounted = None, False
    try:
        device = _run(cmd + [str(image_path)]).stdout.strip()
        _run(["mount", "-o", "ro", device, str(mnt)])
        mounted = True
        tree: dict[str, bytes] = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            if Path(dirpath) == mnt and "lost+found" in dirnames:
                dirnames.remove("lost+found")
            for name in filenames:
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    tree[path.relative_to(mnt).as_posix()] = path.read_bytes()
        return tree
    finally:
        try:
            if mounted:
                _run(["umount", str(mnt)])
        finally:
            if device:
                _run(["losetup", "-d", device])
            mnt.rmdir()


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}, use e.g. 64M") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory for base.qcow2, v2.qcow2, ...")
    parser.add_argument("--table", choices=("mbr", "gpt"), default="mbr", help="partition table (default mbr)")
    parser.add_argument("--size", type=_parse_size, default=64 << 20, help="virtual disk size (default 64M)")
    parser.add_argument("--keep-raw", action="store_true", help="keep the per-version raw disks v1.raw, ...")
    args = parser.parse_args(argv)
    try:
        build_ext4_chain(args.outdir, args.table, disk_size=args.size, keep_raw=args.keep_raw, log=print)
    except (ChainBuildError, ValueError) as e:
        print(f"ext4chain: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
