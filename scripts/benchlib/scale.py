"""Group "scale": a big store, and a huge sparse disk with a deep chain.

Row 8 -- a store of 200 VMs x 20 snapshots (--quick: 40 x 20), each VM with
one 1-8 GiB disk whose base holds an MBR with two partitions and a little
data, and 128 KiB written in every layer.  Four template chains are built
with sfdisk/qemu-img/qemu-io, then every VM is imported in-process with the
project's own ``snapfs.ops.importer.add_vm`` (what ``snapfs vm add`` runs), so
the store is exactly what the CLI makes (~15-25 s at 200 VMs).

Each run, with a fresh daemon each time:
  * caches dropped: the wall time of ``snapfs mount`` until it returns plus
    a first ``os.listdir`` of the mount point (row "all caches dropped");
  * caches dropped, then the interpreter's and snapfs's own files read back
    (``warm_program``; the store is not touched): the same time again (row
    "store cold, program warm").  Importing Python, pyfuse3 and trio from a
    cold disk costs 0.4-1.9 s here whatever the store holds, so this row is
    the part that grows with the store;
  * the daemon's RSS (its pid from the store's lock file, checked against
    pgrep); ``find MNT -printf '%y %s %l %P'`` (every directory listed,
    every entry stat'ed, every link read) and its wall time; the RSS after.
The find is compared with the same ``find`` on a plain ext4 tree of the same
shape (same names, sparse files of the same sizes, the ``latest`` links),
caches dropped before each.  Target: at most 20x that tree.  FUSE costs a
round trip to a user-space daemon for each directory operation where ext4
answers in the kernel: a second walk of a mount whose tree is already built
cost 6-7x the ext4 walk here, even with one thread hop per readdir.  To
list a snapshot snapfs must also read its partition table through its chain,
opening each volume once; twice that transport floor is the budget.  At
default size find runs in the first 3 runs only (~15 s each), to keep the
group near 3 minutes.

Row 9 -- a 1 TiB qcow2 chain of 20 layers (64 KiB clusters), a GPT with two
partitions spanning the disk, writes at fixed-seed offsets spread over the
whole TiB in every layer, and compressed clusters in the base (one qemu-io
process per compressed write), imported with ``snapfs vm add`` so that each
layer is a snapshot (an empty top is the active state).  For every snapshot
view (the disk and both partitions) every allocated range of its chain
(``qemu-img map``) is read, plus a fixed-seed sample of 1 MiB reads in the
holes (32 x 1 MiB per view; --quick 16), 1 MiB per read; the daemon's peak
RSS (VmHWM) is the measure, from one pass of a fresh mount (a peak is a
maximum, not a median: more passes would only repeat it).  ~6 GiB go
through FUSE per pass at default size.

The bound, from the design (snapfs/store/volume.py, chain.py, qcow2/mapping.py):

    peak RSS <= B0            the daemon once mounted (interpreter, pyfuse3,
                              trio, construct, the VM's manifest): measured
                              31 MB; allowed 40 MB
              + 64 MiB        ClusterCache, the LRU of decompressed clusters
                              (COMPRESSED_CACHE_BYTES): 67 MB
              + 16 x 2 MiB    requests in flight: FUSE's 12 background
                              (readahead) requests plus a few synchronous
                              ones, each at most 1 MiB (max_read), held
                              twice while the reply is joined: 34 MB
              + maps          each volume's runs and each chain's merged
                              extent map, ~40-200 B per extent: they follow
                              the allocated extents, never the virtual size
                              (an L1 table is 16 KiB for 1 TiB at 64 KiB
                              clusters, read once per volume and dropped, and
                              so are the L2 tables); here ~1,400 extents per
                              chain (each compressed cluster is one): < 5 MB
              + slack         malloc's, with one arena (see snapfs/fs/malloc_arena.py,
                              one_malloc_arena): 10 MB

    = 40 + 67 + 34 + 5 + 10 = 156 MB, stated as BOUND_MB = 160 MB.

With its default per-thread arenas glibc kept up to ~120 MB more, freed by
one worker thread and unusable by the others (measured 165-235 MB), so the
daemon now runs with one.  That the peak follows the cache and the requests,
not the virtual size, is printed to stderr: the peak after the first half of
the snapshots and after all of them, and (at default size) the peak of the
same reads on a 64 GiB chain of the same shape, both well under the bound.
The base holds 20 compressed 4 MiB writes (80 MiB of clusters) so that the
reads cycle through more than the cache holds; --quick writes 4 and does not
fill it.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .common import (GiB, MiB, ROOT, SEED, SNAPFS, SnapfsMount, drop_caches, median, ratio_row,
                     rss_bytes, run, value_row)

sys.path.insert(0, str(ROOT))

MB = 1e6
CLUSTER = 64 << 10
SNAPSHOTS = 20
TEMPLATE_SIZES = (1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB)
BOUND_MB = 160


def log(msg):
    print(f"bench: scale: {msg}", file=sys.stderr, flush=True)


# -- row 8: a store of many VMs -------------------------------------------------

def two_partitions(raw, size, label):
    """A sparse raw disk of ``size`` with a ``label`` (dos, gpt) table: one
    partition from sector 2048 to the middle, one from there to the end.
    Returns the file and the middle's sector."""
    with open(raw, "wb") as f:
        f.truncate(size)
    half = size // 2 // 512
    run("sfdisk", "-q", raw, input=f"label: {label}\n2048,{half - 2048},L\n,,L\n")
    return raw, half


def build_template(directory, size, seed):
    """A chain s00 <- s01 <- ... <- s19 <- active of a ``size`` disk: an MBR
    with two partitions and a little data in the base, 128 KiB in each layer."""
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    raw, half = two_partitions(directory / "base.raw", size, "dos")
    with open(raw, "r+b") as f:
        for start in (2048 * 512, half * 512):
            f.seek(start)
            f.write(rng.randbytes(256 << 10))
    run("qemu-img", "convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2",
        "-o", f"cluster_size={CLUSTER}", raw, directory / "s00.qcow2")
    raw.unlink()
    names = [f"s{i:02d}" for i in range(SNAPSHOTS)] + ["active"]
    writes = {}
    for parent, name in zip(names, names[1:]):
        overlay(directory, parent, name, size)
        writes[name] = [f"write -P {rng.randrange(1, 255)} "
                        f"{rng.randrange(1 * MiB, size - 64 * 1024) // CLUSTER * CLUSTER} 64k"
                        for _ in range(2)]
    write_layers(directory, writes)
    return directory / "active.qcow2"


@contextmanager
def no_fsync():
    """No fsync from this process while VMs are imported (~25 per VM, each
    5-50 ms on a busy disk): the files are what snapfs makes, only not
    durable until drop_caches syncs everything before each measure."""
    fsync, os.fsync = os.fsync, lambda fd: None
    try:
        yield
    finally:
        os.fsync = fsync


def overlay(directory, parent, name, size):
    """An empty qcow2 ``name`` backed by ``parent``."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
        "-b", f"{parent}.qcow2", "-F", "qcow2", directory / f"{name}.qcow2", str(size))


def write_layers(directory, writes):
    """qemu-io ``writes[name]`` (commands) into each layer, in one session
    (no flush: drop_caches syncs before each measure)."""
    cmds = []
    for name, commands in writes.items():
        cmds += ["-c", f"open -t unsafe -o driver=qcow2 {directory / name}.qcow2"]
        for command in commands:
            cmds += ["-c", command]
        cmds += ["-c", "close"]
    out = run("qemu-io", *cmds).stdout
    if out.count("wrote ") != sum(len(c) for c in writes.values()):
        raise SystemExit(f"bench: scale: qemu-io did not write every layer:\n{out}")


def build_store(work, vms):
    from snapfs.ops.importer import add_vm
    from snapfs.store.store import Store
    with no_fsync():
        tops = [build_template(work / f"template{i}", size, SEED + i)
                for i, size in enumerate(TEMPLATE_SIZES)]
        store = Store.init(work / "store")
        store.acquire_lock("scale benchmark: building")
        try:
            for i in range(vms):
                add_vm(store, f"vm{i:03d}", [f"sda={tops[i % len(tops)]}"], progress=False)
        finally:
            store.release_lock()
    for i in range(len(tops)):
        shutil.rmtree(work / f"template{i}")
    return Path(store.path)


FIND = ["-printf", r"%y\t%s\t%l\t%P\n"]    # every entry stat'ed, every link read
FIND_RUNS = 3        # find takes a while at 200 VMs: the group must stay within ~3 minutes
FIND_RATIO = 20


def build_reference_tree(listing, ref):
    """A plain directory tree shaped like the mount, from its ``find`` listing:
    same names, sparse files of the same sizes, the same symlinks."""
    ref.mkdir(parents=True)
    for line in listing.splitlines():
        kind, size, target, rel = line.split("\t")
        if not rel:
            continue
        path = ref / rel
        if kind == "d":
            path.mkdir()
        elif kind == "l":
            path.symlink_to(target)
        else:
            with open(path, "wb") as f:
                f.truncate(int(size))


def walk(root):
    """(seconds, listing) of ``find ROOT -printf ...``: lists every directory
    and stats every entry, like ``find -type f -printf '%s\\n'`` but keeping
    the shape, from which the reference tree is made."""
    start = time.perf_counter()
    out = run("find", root, *FIND).stdout
    return time.perf_counter() - start, out


def check_daemon_pid(mount):
    pid = mount.daemon_pid()
    found = subprocess.run(["pgrep", "-f", f"snapfs.cli mount {mount.store} "],
                           capture_output=True, text=True).stdout.split()
    if [int(p) for p in found] != [pid]:
        raise SystemExit(f"bench: scale: lock file says daemon pid {pid}, pgrep finds {found}")
    return pid


def warm_program():
    """Read the interpreter's and snapfs's own files back into the page cache
    (imports only; the store is not touched)."""
    run(sys.executable, "-c", "import snapfs.cli, snapfs.fs.mount, snapfs.fs.fuse, snapfs.fs.vfs, "
        "snapfs.ops.operations", cwd=ROOT)


def mount_and_list(store, mnt):
    """Seconds for ``snapfs mount`` to return plus a first listdir; the mount."""
    mount = SnapfsMount(store, mnt)
    start = time.perf_counter()
    mount.__enter__()
    try:
        os.listdir(mnt)
    except BaseException:
        mount.__exit__(None, None, None)
        raise
    return time.perf_counter() - start, mount


def measure_store(work, quick, runs):
    vms = 40 if quick else 200
    start = time.perf_counter()
    store = build_store(work / "row8", vms)
    log(f"built a store of {vms} VMs x {SNAPSHOTS} snapshots in "
        f"{time.perf_counter() - start:.1f} s")
    mnt = work / "row8" / "mnt"
    ref = work / "row8" / "reference"
    mnt.mkdir()
    find_runs = runs if quick else min(runs, FIND_RUNS)
    cold, startups, rss_mounted, rss_found, finds, ref_finds = [], [], [], [], [], []
    for i in range(runs):
        # All cold, as a user's first mount after boot: the interpreter's
        # own files then weigh more than the store (see the module docstring).
        drop_caches()
        seconds, mount = mount_and_list(store, mnt)
        mount.__exit__(None, None, None)
        cold.append(seconds)
        walking = i < find_runs
        for side in (("snapfs", "reference") if i % 2 == 0 else ("reference", "snapfs")):
            if side == "reference":
                if walking and ref.exists():
                    drop_caches()
                    ref_finds.append(walk(ref)[0])
                continue
            drop_caches()
            warm_program()
            seconds, mount = mount_and_list(store, mnt)
            try:
                startups.append(seconds)
                pid = check_daemon_pid(mount)
                rss_mounted.append(rss_bytes(pid) / MB)
                line = (f"run {i + 1}: mount {cold[-1]:.2f} s all cold, {startups[-1]:.2f} s "
                        f"store cold; RSS {rss_mounted[-1]:.0f} MB")
                if walking:
                    seconds, listing = walk(mnt)
                    finds.append(seconds)
                    rss_found.append(rss_bytes(pid) / MB)
                    line += (f"; find of {listing.count(chr(10))} entries {seconds:.2f} s, "
                             f"RSS {rss_found[-1]:.0f} MB")
                    if not ref.exists():
                        build_reference_tree(listing, ref)
                log(line)
            finally:
                mount.__exit__(None, None, None)
    log(f"plain tree: find {', '.join(f'{s:.2f}' for s in ref_finds)} s")
    shape = f"{vms} VMs x {SNAPSHOTS} snapshots"
    return [
        value_row("8", f"mount start-up, {shape}, all caches dropped", "s", median(cold), 1.0),
        value_row("8", f"mount start-up, {shape}, store cold, program warm", "s",
                  median(startups), 1.0),
        value_row("8", f"daemon RSS after mount, {shape}", "MB", median(rss_mounted), 150),
        value_row("8", f"daemon RSS after find walks the tree, {shape}", "MB",
                  median(rss_found), 150),
        ratio_row("8", f"find over the mount: list every dir, stat every entry, {shape}, "
                  f"cold (median of {len(finds)})", "s", median(finds), median(ref_finds),
                  "same tree on ext4, cold", maximum=FIND_RATIO),
    ]


# -- row 9: a 1 TiB disk with a deep chain -------------------------------------

def build_big_chain(directory, size, compressed_writes, seed):
    """Layers L00..L19 of a ``size`` disk (plus an empty top, the active
    state): a GPT with two partitions spanning the disk; in the base,
    ``compressed_writes`` compressed 4 MiB writes and 32 x 256 KiB; in every
    other layer 16 x 128 KiB; all at fixed-seed offsets over the whole disk.
    Returns the top, each layer's allocated ranges as seen through its
    chain (qemu-img map), and the partitions' (start, length)."""
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    raw, _ = two_partitions(directory / "gpt.raw", size, "gpt")
    table = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]
    parts = [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    base = directory / "L00.qcow2"
    run("qemu-img", "convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2",
        "-o", f"cluster_size={CLUSTER}", raw, base)
    raw.unlink()
    lo, hi = 1 * MiB, size - 1 * MiB        # clear of both GPT copies

    def offset(length):
        return rng.randrange(lo, hi - length) // CLUSTER * CLUSTER

    # One qemu-io process per compressed write: back-to-back compressed
    # writes in one session can corrupt the image.
    for _ in range(compressed_writes):
        run("qemu-io", "-t", "unsafe", "-c",
            f"write -c -P {rng.randrange(1, 255)} {offset(4 * MiB)} 4M", base)
    names = [f"L{i:02d}" for i in range(SNAPSHOTS)] + ["active"]
    writes = {"L00": [f"write -P {rng.randrange(1, 255)} {offset(256 << 10)} 256k"
                      for _ in range(32)]}
    for parent, name in zip(names, names[1:]):
        overlay(directory, parent, name, size)
        if name != "active":
            writes[name] = [f"write -P {rng.randrange(1, 255)} {offset(128 << 10)} 128k"
                            for _ in range(16)]
    write_layers(directory, writes)
    # Each layer's own clusters (qemu-img map of the layer alone: a map of
    # the chain takes ~10x longer at 1 TiB); a chain holds what its layers
    # hold, as every write here is data.  Checked once against the chain.
    maps, chain = {}, []
    for name in names[:-1]:
        spec = {"driver": "qcow2", "backing": None,
                "file": {"driver": "file", "filename": str(directory / f"{name}.qcow2")}}
        chain = _merge(chain + _data(run("qemu-img", "map", "--output=json",
                                         "json:" + json.dumps(spec)).stdout))
        maps[name] = chain
    whole = _merge(_data(run("qemu-img", "map", "--output=json",
                             directory / f"{names[-2]}.qcow2").stdout))
    if whole != chain:
        raise SystemExit("bench: scale: qemu-img map of the chain differs from its layers'")
    return directory / "active.qcow2", maps, parts


def _data(map_json):
    return [(e["start"], e["length"]) for e in json.loads(map_json) if e["data"]]


def _merge(ranges):
    out = []
    for start, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= start:
            s, n = out[-1]
            out[-1] = (s, max(n, start + length - s))
        else:
            out.append((start, length))
    return out


def _clip(ranges, start, length):
    """``ranges`` seen through the window [start, start+length)."""
    out = []
    for s, n in ranges:
        a, b = max(s, start), min(s + n, start + length)
        if a < b:
            out.append((a - start, b - a))
    return out


def read_view(path, ranges, holes, rng):
    """Read all of ``ranges`` of ``path`` and ``holes`` random 1 MiB pieces,
    1 MiB at a time; returns the bytes read."""
    fd = os.open(path, os.O_RDONLY)
    buf = memoryview(bytearray(MiB))
    total = 0
    try:
        size = os.fstat(fd).st_size
        pieces = list(ranges) + [(rng.randrange(0, size - MiB), MiB) for _ in range(holes)]
        for start, length in pieces:
            pos, end = start, start + length
            while pos < end:
                n = os.preadv(fd, [buf[:min(MiB, end - pos)]], pos)
                if n <= 0:
                    raise SystemExit(f"bench: scale: short read of {path} at {pos}")
                total += n
                pos += n
    finally:
        os.close(fd)
    return total


def read_all_views(store, mnt, vm, maps, parts, holes, label):
    """Mount, read every view of every snapshot of ``vm``.  Returns the
    daemon's peak RSS (bytes) after the mount, after the first half of the
    snapshots, and after all of them."""
    rng = random.Random(SEED)
    drop_caches()
    with SnapfsMount(store, mnt) as mount:
        pid = check_daemon_pid(mount)
        snaps = mnt / vm / "snapshots"
        names = sorted(n for n in os.listdir(snaps) if n != "latest")
        if names != sorted(maps):
            raise SystemExit(f"bench: scale: snapshots {names} are not the layers {sorted(maps)}")
        peaks = [rss_bytes(pid, peak=True)]
        total = views = 0
        start = time.perf_counter()
        for k, name in enumerate(names):
            for number, (pstart, plength) in enumerate([(0, None)] + parts):
                entry = "sda.raw" if number == 0 else f"sda-part{number}.raw"
                ranges = maps[name] if number == 0 else _clip(maps[name], pstart, plength)
                total += read_view(snaps / name / entry, ranges, holes, rng)
                views += 1
            if k == len(names) // 2 - 1:
                peaks.append(rss_bytes(pid, peak=True))
        peaks.append(rss_bytes(pid, peak=True))
        seconds = time.perf_counter() - start
    log(f"{label}: read {views} views, {total / GiB:.2f} GiB in {seconds:.1f} s; daemon peak RSS "
        f"after mount {peaks[0] / MB:.0f} MB, after half the snapshots {peaks[1] / MB:.0f} MB, "
        f"after all {peaks[2] / MB:.0f} MB")
    return peaks


def measure_big(work, quick, runs):
    compressed = 4 if quick else 20            # 4 MiB each: 20 fill the 64 MiB cluster cache
    holes = 16 if quick else 32
    sizes = [("big", 1 << 40, "1 TiB")] + ([] if quick else [("mid", 64 * GiB, "64 GiB")])
    store = work / "row9" / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    shapes = {}
    for vm, size, label in sizes:
        start = time.perf_counter()
        images = work / "row9" / f"images-{vm}"
        top, maps, parts = build_big_chain(images, size, compressed, SEED + 9)
        run(*SNAPFS, "vm", "add", store, vm, "--disk", f"sda={top}", cwd=ROOT)
        shutil.rmtree(images)
        shapes[vm] = (maps, parts, label)
        log(f"built and imported a {label} chain of {SNAPSHOTS} layers in "
            f"{time.perf_counter() - start:.1f} s")
    peaks = {}
    for vm, (maps, parts, label) in shapes.items():
        peaks[vm] = read_all_views(store, work / "row9" / "mnt", vm, maps, parts, holes, label)
    big = peaks["big"]
    if "mid" in peaks:
        log(f"peak RSS does not follow the virtual size: 64 GiB chain {peaks['mid'][-1] / MB:.0f} "
            f"MB, 1 TiB chain {big[-1] / MB:.0f} MB (same layers, writes and reads)")
    return [value_row("9", f"daemon peak RSS reading every view of a 1 TiB {SNAPSHOTS}-layer "
                      f"sparse chain{' (--quick: fewer compressed clusters)' if quick else ''}",
                      "MB", big[-1] / MB, BOUND_MB)]


def measure(work: Path, quick: bool, runs: int):
    work.mkdir(parents=True, exist_ok=True)
    rows = measure_store(work, quick, runs)
    rows += measure_big(work, quick, runs)
    return rows
