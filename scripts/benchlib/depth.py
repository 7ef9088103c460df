"""Group "depth" (row 10): the newest view of a 200-deep chain against a
4-deep one, and ``snapfs snapshot create`` on each.

Input: one store with two VMs, ``d4`` and ``d200``, each with one 256 MiB
disk (64 MiB with --quick; 64 KiB clusters) whose newest snapshot's view is
a chain of 4 and of 200 volumes.  Both views hold the same bytes:

- the base is imported with ``snapfs vm add``: fixed-seed random data in
  half of the disk's 1 MiB pieces (the rest unallocated), then snapshot
  ``s000`` freezes it;
- one fixed-seed list of 199 x 12 writes (--quick: 199 x 6) of 1, 2 or 4
  clusters at random cluster offsets, each from one of 32 random source
  files, is split into 199 consecutive groups for d200 and into 3 for d4.
  Each group is written into the VM's active volume with ``qemu-io``, then
  a snapshot freezes it (``s001``, ``s002``, ...), made in-process by
  ``VmOperations.create``, what ``snapfs snapshot create`` runs (the CLI
  would add 200 Python start-ups to the build).  The newest snapshot's
  extent map thus merges clusters from every layer of its chain, and the
  two maps differ only in how many layers they merge.  (qemu-io opens
  each volume without its backing chain, which took it ~0.2 s at depth
  200: every write covers whole clusters, so nothing is copied up.)

The group takes about a minute (--quick: 30 s), 20 s of it building and
checking the inputs.

Once, untimed: the expected bytes (the base and the writes, applied in
Python) must equal ``qemu-img convert -O raw`` of each VM's newest volume,
and both views read through the mount must equal that conversion, byte for
byte.  ``snapfs check`` must pass.  Any difference aborts the bench.

Timed, ``runs`` times, the two VMs alternating which goes first, each run
on fresh mounts (the merged map is built once per view and kept, so only a
new daemon builds it again); the view is ``VM/snapshots/<newest>/sda.raw``:

- cold (all caches dropped before each measure): time to first byte
  (lookup, open and a 4 KiB read at offset 0: the VM's directories are
  listed, the snapshot's partition table read and the chain's map built
  here; the split is printed to stderr), a sequential read with 1 MiB
  reads, and 2000 random 4 KiB reads;
- warm (every volume file in the page cache, a new daemon, the view's own
  pages dropped with POSIX_FADV_DONTNEED before each read and checked gone
  with fincore): the same three.  A read from the view's page cache never
  reaches snapfs, so it would say nothing about depth.

Each measure is taken on both VMs back to back (first byte of both, then
sequential reads of both, ...), so that the two of a pair are close in
time; the ratio within each run is printed to stderr too.

Then, with the store unmounted: the wall time of ``snapfs snapshot create
STORE VM NAME`` (Python start-up included, bytecode cached), ``runs``
times per VM, alternating; each run makes each chain one layer deeper.

Reported: medians, and the ratio 200-deep / 4-deep.  Targets (proposed,
not from the issue): reads of the deep view at least 0.8x the shallow
one's, as the map is flat and a read never walks the chain; time to first
byte and snapshot create have no target (informational).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import (MiB, ROOT, SEED, SNAPFS, Row, SnapfsMount, drop_caches, median,
                     ratio_row, run)
from .merges import snapfs_env
from .reads import random_reads, sequential
from .scale import no_fsync

sys.path.insert(0, str(ROOT))

CLUSTER = 64 << 10
DEPTHS = {"d4": 4, "d200": 200}     # VM -> volumes in its newest snapshot's chain
SHALLOW, DEEP = "d4", "d200"
SOURCES = 32                        # random source files for the writes
SOURCE_BYTES = 256 << 10
CLUSTERS = (1, 1, 1, 2, 4)          # clusters per write
READ_TARGET = 0.8


def log(msg):
    print(f"bench: depth: {msg}", file=sys.stderr, flush=True)


def fail(msg):
    raise SystemExit(f"bench: depth: FAILED: {msg}")


# -- inputs --------------------------------------------------------------------

def make_inputs(work, size, per_layer):
    """The base image, the source files and the writes.  Returns (base
    qcow2 path, sources [(path, bytes)], writes [(offset, length, source)],
    expected view as a bytearray)."""
    rng = random.Random(f"{SEED}-depth")
    expected = bytearray(size)
    raw = work / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for piece in range(size // MiB):
            if rng.random() < 0.5:
                data = rng.randbytes(MiB)
                expected[piece * MiB:(piece + 1) * MiB] = data
                f.seek(piece * MiB)
                f.write(data)
    base = work / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}",
        raw, base)
    raw.unlink()
    sources = []
    (work / "src").mkdir()
    for i in range(SOURCES):
        data = rng.randbytes(SOURCE_BYTES)
        path = work / "src" / f"{i:02d}"
        path.write_bytes(data)
        sources.append((path, data))
    writes = []
    for _ in range((DEPTHS[DEEP] - 1) * per_layer):
        length = rng.choice(CLUSTERS) * CLUSTER
        offset = rng.randrange(0, (size - length) // CLUSTER + 1) * CLUSTER
        writes.append((offset, length, rng.randrange(SOURCES)))
    for offset, length, src in writes:
        expected[offset:offset + length] = sources[src][1][:length]
    return base, sources, writes, expected


def split(items, parts):
    """``items`` in ``parts`` consecutive groups of near-equal size."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def qemu_write(path, group, sources):
    """Write ``group`` into the qcow2 volume ``path``, its backing chain not
    opened (see the module docstring).  No flushes: drop_caches syncs
    before any measure."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    cmds = "".join(f"write -q -s {sources[src][0]} {off} {n}\n" for off, n, src in group)
    r = subprocess.run(["qemu-io", "-t", "unsafe", "json:" + json.dumps(spec)], input=cmds,
                       capture_output=True, text=True)
    if r.returncode != 0 or "error" in (r.stdout + r.stderr).lower() or "fail" in r.stdout.lower():
        fail(f"qemu-io writing {path}:\n{r.stdout}{r.stderr}")


def build_vm(store_path, vm, depth, base, sources, writes):
    """Import ``base`` as ``vm``, then write each group and snapshot it:
    ``depth`` snapshots, the newest with a chain of ``depth`` volumes."""
    from snapfs.ops.operations import VmOperations
    from snapfs.store.store import Store
    run(*SNAPFS, "vm", "add", store_path, vm, "--disk", f"sda={base}", cwd=ROOT)
    store = Store.open(store_path)
    store.acquire_lock("depth benchmark: building")
    try:
        ops = VmOperations(store, vm)
        with no_fsync():
            ops.create("s000")
            for i, group in enumerate(split(writes, depth - 1), start=1):
                m = store.load_vm(vm)
                qemu_write(store.volume_path(vm, m.active["sda"]), group, sources)
                ops.create(f"s{i:03d}")
    finally:
        store.release_lock()
    os.sync()


def newest(store_path, vm):
    """(snapshot name, volume path, chain depth) of ``vm``'s newest snapshot."""
    from snapfs.store.store import Store
    store = Store.open(store_path)
    m = store.load_vm(vm)
    snap = m.snapshots[-1]
    vid = snap.volumes["sda"]
    return snap.name, Path(store.volume_path(vm, vid)), len(m.chain(vid))


# -- checks ----------------------------------------------------------------------

def first_difference(a, b):
    """Offset of the first differing byte of two equal-length buffers."""
    step = 1 << 16
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, len(a))):
                if a[i] != b[i]:
                    return i
    return None


def compare_file(path, expected, what):
    """Abort unless ``path`` holds exactly ``expected``."""
    want = memoryview(expected)
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(want):
            chunk = f.read(min(4 * MiB, len(want) - pos))
            if not chunk:
                fail(f"{what}: {path} ends at {pos}, expected {len(want)} bytes")
            if chunk != want[pos:pos + len(chunk)]:
                at = pos + first_difference(chunk, want[pos:pos + len(chunk)])
                fail(f"{what}: {path} differs at byte {at} (0x{at:x}): "
                     f"read {chunk[at - pos:at - pos + 16].hex()}, "
                     f"expected {bytes(want[at:at + 16]).hex()}")
            pos += len(chunk)
        if f.read(1):
            fail(f"{what}: {path} is longer than {len(want)} bytes")


def check_views(work, store, mnt, expected):
    """qemu-img convert of each newest volume must be the expected bytes,
    and each view must read back as that conversion."""
    for vm, depth in DEPTHS.items():
        name, volume, found = newest(store, vm)
        if found != depth:
            fail(f"{vm}: newest snapshot {name} has a chain of {found} volumes, not {depth}")
        extents = [e for e in json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2",
                                             volume).stdout) if e["data"]]
        layers = len({e["depth"] for e in extents})
        log(f"{vm}: the newest view maps {len(extents)} data extents from {layers} of its "
            f"{depth} volumes (qemu-img map)")
        if layers < depth // 2:
            fail(f"{vm}: only {layers} of {depth} volumes hold data the newest view shows")
        ref = work / f"{vm}.raw"
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", volume, ref)
        compare_file(ref, expected, f"{vm}: qemu-img convert of the newest volume vs the writes")
        ref_bytes = bytearray(ref.read_bytes())
        ref.unlink()
        with SnapfsMount(store, mnt) as mount:
            compare_file(view_path(mount.mnt, vm, name), ref_bytes,
                         f"{vm}: view of snapshot {name} vs qemu-img convert")
        log(f"{vm}: snapshot {name} (chain of {depth}) reads back as qemu-img convert: ok")


# -- measures ------------------------------------------------------------------

def view_path(mnt, vm, name):
    return Path(mnt) / vm / "snapshots" / name / "sda.raw"


def first_byte(path):
    """ms to look up, open and read 4 KiB at 0 (time to first byte), and of
    that: (lookups: the VM's and the snapshot's directories are listed,
    the snapshot's partition table read; open: the chain's map is built;
    the read)."""
    start = time.perf_counter()
    os.stat(path)
    looked_up = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        opened = time.perf_counter()
        data = os.pread(fd, 4096, 0)
        end = time.perf_counter()
    finally:
        os.close(fd)
    if len(data) != 4096:
        fail(f"first read of {path} returned {len(data)} bytes")
    return (end - start) * 1000, tuple(round((b - a) * 1000, 1) for a, b in
                                       ((start, looked_up), (looked_up, opened), (opened, end)))


def resident(path):
    out = run("fincore", "--bytes", "--noheadings", "--output", "RES", path).stdout
    return int(out.split()[0])


def evict(path):
    """Drop the view's pages from the page cache, and check they went."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident(path)
    if left:
        fail(f"{left} bytes of {path} stayed in the page cache after POSIX_FADV_DONTNEED")


def warm_files(store_path):
    """Read every volume file of the store into the page cache."""
    for f in (Path(store_path) / "vms").glob("*/*"):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(4 * MiB):
                pass


def measure_reads(store, mnt, names, size, runs):
    """{vm: {measure: [values]}} over ``runs`` runs, alternating."""
    out = {vm: {} for vm in DEPTHS}

    def add(vm, key, value):
        out[vm].setdefault(key, []).append(value)

    for r in range(runs):
        # Each measure on both sides back to back, so that a pair is as
        # close in time as it can be (this machine's speed drifts).
        order = [SHALLOW, DEEP] if r % 2 == 0 else [DEEP, SHALLOW]
        with SnapfsMount(store, mnt) as mount:
            views = {vm: view_path(mount.mnt, vm, names[vm]) for vm in order}
            for vm in order:
                drop_caches()
                ms, parts = first_byte(views[vm])
                add(vm, "ttfb_cold", ms)
                add(vm, "parts_cold", parts)
            for vm in order:
                drop_caches()
                add(vm, "seq_cold", sequential(views[vm]))
            for vm in order:
                drop_caches()
                add(vm, "rand_cold", random_reads(views[vm], size))
        warm_files(store)
        with SnapfsMount(store, mnt) as mount:
            views = {vm: view_path(mount.mnt, vm, names[vm]) for vm in order}
            for vm in order:
                ms, parts = first_byte(views[vm])
                add(vm, "ttfb_warm", ms)
                add(vm, "parts_warm", parts)
            for vm in order:
                evict(views[vm])
                add(vm, "seq_warm", sequential(views[vm]))
            for vm in order:
                evict(views[vm])
                add(vm, "rand_warm", random_reads(views[vm], size))
        log(f"run {r + 1}/{runs} ({order[0]} first): " + "; ".join(
            f"{vm} first byte {out[vm]['ttfb_cold'][-1]:.1f}/{out[vm]['ttfb_warm'][-1]:.1f} ms, "
            f"seq {out[vm]['seq_cold'][-1]:,.0f}/{out[vm]['seq_warm'][-1]:,.0f} MB/s, "
            f"random {out[vm]['rand_cold'][-1]:,.0f}/{out[vm]['rand_warm'][-1]:,.0f}/s"
            for vm in DEPTHS) + " (cold/warm); first byte = lookup + open + read, ms: " +
            "; ".join(f"{vm} {out[vm]['parts_cold'][-1]} / {out[vm]['parts_warm'][-1]}"
                      for vm in DEPTHS))
    return out


def measure_create(work, store, runs):
    """{vm: [seconds]} of ``snapfs snapshot create`` through the CLI."""
    env = snapfs_env(work)
    run(sys.executable, "-c", "import snapfs.cli, snapfs.ops.operations, snapfs.ops.merge, tqdm",
        cwd=ROOT, env=env)                # fills the bytecode cache
    out = {vm: [] for vm in DEPTHS}
    for r in range(runs):
        order = [SHALLOW, DEEP] if r % 2 == 0 else [DEEP, SHALLOW]
        for vm in order:
            start = time.perf_counter()
            run(*SNAPFS, "snapshot", "create", store, vm, f"c{r}", cwd=ROOT, env=env)
            out[vm].append(time.perf_counter() - start)
    for vm, depth in DEPTHS.items():
        name, _, found = newest(store, vm)
        if name != f"c{runs - 1}" or found != depth + runs:
            fail(f"{vm}: after {runs} creates the newest snapshot is {name} with a chain "
                 f"of {found}, expected c{runs - 1} with {depth + runs}")
    log("snapshot create: " + "; ".join(
        f"{vm} {', '.join(f'{t:.3f}' for t in out[vm])} s" for vm in DEPTHS))
    return out


def info_row(number, measure, unit, deep, shallow):
    """A deep/shallow ratio with no target."""
    return Row(number, measure, unit, deep, shallow, "4-deep chain", "-", None)


def measure(work: Path, quick: bool, runs: int):
    work.mkdir(parents=True, exist_ok=True)
    size = (64 if quick else 256) * MiB
    per_layer = 6 if quick else 12
    start = time.perf_counter()
    base, sources, writes, expected = make_inputs(work, size, per_layer)
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT)
    for vm, depth in DEPTHS.items():
        t0 = time.perf_counter()
        build_vm(store, vm, depth, base, sources, writes)
        log(f"built {vm}: {depth} snapshots of a {size // MiB} MiB disk in "
            f"{time.perf_counter() - t0:.1f} s")
    base.unlink()
    shutil.rmtree(work / "src")
    mnt = work / "mnt"
    t0 = time.perf_counter()
    check = subprocess.run([*SNAPFS, "check", str(store)], cwd=ROOT, capture_output=True,
                           text=True)
    if check.returncode != 0:
        fail(f"snapfs check of the new store:\n{check.stdout}{check.stderr}")
    check_views(work, store, mnt, expected)
    del expected
    log(f"inputs built in {t0 - start:.1f} s, checked in {time.perf_counter() - t0:.1f} s; "
        f"{len(writes)} writes, {sum(n for _, n, _ in writes) / MiB:.0f} MiB")
    names = {vm: newest(store, vm)[0] for vm in DEPTHS}
    reads = measure_reads(store, mnt, names, size, runs)
    creates = measure_create(work, store, runs)
    d = {k: median(v) for k, v in reads[DEEP].items() if not k.startswith("parts")}
    s = {k: median(v) for k, v in reads[SHALLOW].items() if not k.startswith("parts")}
    # The table's ratio is of the medians, as in the other groups; the ratio
    # within each run (the two sides measured back to back) shows the noise.
    log("deep/shallow within each run: " + "; ".join(
        f"{k} {', '.join(f'{a / b:.2f}' for a, b in zip(reads[DEEP][k], reads[SHALLOW][k]))}"
        for k in d) + "; snapshot create " +
        ", ".join(f"{a / b:.2f}" for a, b in zip(creates[DEEP], creates[SHALLOW])))
    shape = f"newest view, 200-deep chain, {size // MiB} MiB"
    ref = "4-deep chain"
    return [
        ratio_row("10", f"{shape}: sequential read, cold, 1 MiB reads", "MB/s",
                  d["seq_cold"], s["seq_cold"], ref, minimum=READ_TARGET),
        ratio_row("10", f"{shape}: sequential read, layers in page cache, 1 MiB reads", "MB/s",
                  d["seq_warm"], s["seq_warm"], ref, minimum=READ_TARGET),
        ratio_row("10", f"{shape}: random 4 KiB reads, cold", "reads/s",
                  d["rand_cold"], s["rand_cold"], ref, minimum=READ_TARGET),
        ratio_row("10", f"{shape}: random 4 KiB reads, layers in page cache", "reads/s",
                  d["rand_warm"], s["rand_warm"], ref, minimum=READ_TARGET),
        info_row("10", f"{shape}: time to first byte (lookup, open, 4 KiB read; new mount), cold",
                 "ms", d["ttfb_cold"], s["ttfb_cold"]),
        info_row("10", f"{shape}: time to first byte, layers in page cache", "ms",
                 d["ttfb_warm"], s["ttfb_warm"]),
        info_row("10", "snapshot create on the 200-deep VM (CLI wall time)", "s",
                 median(creates[DEEP]), median(creates[SHALLOW])),
    ]
