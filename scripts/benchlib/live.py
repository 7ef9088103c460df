"""Group "live" (rows 11-12): snapshots and merges of a VM that runs in QEMU
(``qemu-system-x86_64``, TCG), attached with ``snapfs vm attach``.

Row 11, live snapshots of a booted guest.  Four ext4 disks of 64 MiB
(``mkfs.ext4``) are imported with ``snapfs vm add --disk dN=IMAGE`` and
run by the test suite's guest (tests/support/guest.py: Debian's kernel,
busybox and qemu-guest-agent, cached in /var/cache/snapfs-tests/guest):
it mounts every disk and writes numbered fsynced files to them without
pause.  QEMU is started from ``snapfs vm qemu-args --guest-agent`` and is
attached with its agent's socket or without it.  After two untimed
snapshots (one of each kind: bytecode and caches warm), each run takes
one snapshot with the agent attached and one without, alternating which
goes first, the guest writing for 0.5 s before each.  Measured:

- the wall time of the CLI ``snapfs snapshot create STORE VM NAME``
  (Python start-up included, bytecode cached), with the agent (the guest's
  filesystems frozen through the switch) and without (crash-consistent),
  so that the cost of the freeze shows;
- how long the guest stayed frozen: ``frozen_seconds`` of the manifest's
  ``last_operation``, from asking the freeze (the guest syncs, then
  freezes its filesystems one by one) to the agent's answer to the thaw.  Target: under 10 s, the longest snapfs lets a guest stay
  frozen (a timer thaws it then, and the snapshot is only
  crash-consistent) and the longest Windows' VSS holds writes, which
  qemu-ga's VSS requester works within.

Every snapshot must be recorded live with the consistency its kind gives
("frozen" or "crash"), and QEMU must still run at the end, or the bench
aborts.  The wall times have no target: the issue gives none.

Row 12, a live merge against ``qemu-img commit`` of the same data.  A
chain of one disk (2 GiB; --quick 1 GiB; 64 KiB clusters) is built with
qemu-io, fixed seed: ``base`` holds about 384 MiB (--quick 96 MiB) and
``top``, what the guest wrote since, about 256 MiB (--quick 64 MiB), in
extents of 64 KiB..2 MiB, one per 2 MiB slot, some over base's (the
amounts are printed to stderr).  Imported with ``snapfs vm add``, base
is a snapshot and top the active leaf.  Deleting the snapshot merges them
in the direction that moves fewer bytes: here an active commit of top
into base (QEMU's mirror, then a pivot of the device onto base), which
moves top's data, as ``qemu-img commit`` of top does.
The bench checks that snapfs chose it (``last_operation`` disks
direction).  Each run, untimed: a copy of the imported store and a copy
of base for qemu-img (top is linked: ``-d`` leaves it as it was; snapfs
deletes its top volume, so the reference does strictly less); timed,
alternating which side goes first, over an even number of runs:

- snapfs: QEMU runs the copied store's VM with its CPUs stopped (``-S``)
  and is attached; the wall time of the CLI ``snapfs snapshot delete
  STORE VM base``, which returns once QEMU has merged and pivoted and the
  manifest has switched;
- the reference: ``qemu-img commit -d top.qcow2`` offline.

Just before each side runs, the files it touches are synced and dropped
from the page cache, and again once it has run and been checked.  After
each side, with QEMU stopped: ``qemu-img check`` of every image it wrote,
and ``qemu-img compare`` of its result (snapfs's active leaf, qemu-img's
base) with the input's top view.  Any difference aborts the bench.  No
target: the issue gives none; both sides run QEMU's active commit code
(``qemu-img commit`` runs it too), snapfs through its CLI and QMP.

QEMU is always stopped by its PID, even on failure, and the VMs' attach
records are kept under the work directory, not /run.  About 70 s
(--quick: 30 s), booting the guest included.
"""

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

from .common import GiB, MiB, ROOT, SEED, SNAPFS, Row, median, run, value_row
from .merges import CLUSTER, SLOT, evict, extents, own_bytes, snapfs_env, write_layer

sys.path.insert(0, str(ROOT))      # this tree's snapfs and its test support

from snapfs.qemu.agent import MAX_FREEZE  # noqa: E402
from tests.support.guest import boot_args, build_guest, wait_ready  # noqa: E402
from tests.support.live_vm import LiveVm  # noqa: E402

VM = "vm"
DISKS = [f"d{i}" for i in range(4)]
DISK_SIZE = "64M"
PAUSE = 0.5          # seconds the guest writes before each snapshot
# (virtual disk size, data in base, data in top)
MERGE_SIZES = (2 * GiB, 384 * MiB, 256 * MiB)
QUICK_MERGE_SIZES = (1 * GiB, 96 * MiB, 64 * MiB)


def log(msg):
    print(f"bench live: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def environment(run_dir):
    """Attach records under ``run_dir`` rather than /run, and this tree's
    snapfs in every Python the tests' helpers start, for the group."""
    saved = {k: os.environ.get(k) for k in ("SNAPFS_RUN_DIR", "PYTHONPATH")}
    os.environ["SNAPFS_RUN_DIR"] = str(run_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def manifest(store, vm):
    return json.loads((store / "vms" / vm / "manifest.json").read_text())


# -- row 11: live snapshots of a booted guest -----------------------------------

def take(vm, env, name, agent):
    """Attach with or without the agent, let the guest write, time the CLI
    create; -> (seconds, frozen seconds or None).  Aborts unless the
    snapshot was taken live with the consistency its kind gives."""
    vm.attach(agent)
    time.sleep(PAUSE)
    start = time.perf_counter()
    run(*SNAPFS, "snapshot", "create", vm.store, VM, name, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    last = vm.manifest()["last_operation"]
    want = "frozen" if agent else "crash"
    if (last.get("snapshot"), last.get("live"), last.get("consistency")) != (name, True, want):
        raise SystemExit(f"bench live: snapshot {name} was recorded as {last}; "
                         f"wanted a live, {want} snapshot")
    return seconds, last.get("frozen_seconds")


def measure_snapshots(work, runs, env, guest):
    work.mkdir()
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT, env=env)
    specs = []
    for disk in DISKS:
        image = work / f"{disk}.img"
        run("mkfs.ext4", "-q", "-F", image, DISK_SIZE)
        specs += ["--disk", f"{disk}={image}"]
    run(*SNAPFS, "vm", "add", store, VM, *specs, cwd=ROOT, env=env)
    vm = LiveVm(store, VM, work, {disk: 0 for disk in DISKS})
    serial = work / "serial.log"
    times = {True: [], False: []}
    frozen = []
    with vm.running(agent=True, boot=boot_args(*guest, serial)) as proc:
        start = time.monotonic()
        devices = wait_ready(serial, proc)
        log(f"guest booted in {time.monotonic() - start:.1f} s, writing to {' '.join(devices)}")
        if len(devices) != len(DISKS):
            raise SystemExit(f"bench live: the guest mounted {devices}, not {len(DISKS)} disks")
        for agent in (True, False):
            take(vm, env, f"warm-{'frozen' if agent else 'crash'}", agent)
        for i in range(runs):
            order = (True, False) if i % 2 == 0 else (False, True)
            got = {}
            for agent in order:
                got[agent] = take(vm, env, f"{'frozen' if agent else 'crash'}-{i}", agent)
                times[agent].append(got[agent][0] * 1000)
            frozen.append(got[True][1] * 1000)
            log(f"snapshot run {i + 1}/{runs}: with the agent {got[True][0] * 1000:.0f} ms "
                f"(frozen {got[True][1] * 1000:.0f} ms), without {got[False][0] * 1000:.0f} ms "
                f"({'agent' if order[0] else 'no agent'} first)")
        if proc.poll() is not None:
            raise SystemExit(f"bench live: QEMU exited ({proc.returncode}) during the snapshots")
    shutil.rmtree(work)
    shape = f"booted {len(DISKS)}-disk VM, guest writing"
    return [
        Row("11", f"live snapshot (CLI), {shape}, agent attached: frozen", "ms",
            median(times[True]), None, "-", "-", None),
        value_row("11", "guest frozen during that snapshot (freeze asked to thaw answered)",
                  "ms", median(frozen), MAX_FREEZE * 1000),
        Row("11", f"live snapshot (CLI), {shape}, no agent: crash-consistent", "ms",
            median(times[False]), None, "-", "-", None),
    ]


# -- row 12: a live merge against qemu-img commit -------------------------------

def build_chain(work, quick, env):
    """images/base.qcow2 <- images/top.qcow2, and a store that imported
    them (snapshot "base", top the active leaf).  -> a dict."""
    size, in_base, in_top = QUICK_MERGE_SIZES if quick else MERGE_SIZES
    images = work / "images"
    images.mkdir(parents=True)
    rng = random.Random(f"{SEED}-live")
    slots = range(size // SLOT)
    per_extent = (CLUSTER + SLOT) // 2            # extents' mean length
    write_layer(images / "base.qcow2", size, None,
                extents(rng, rng.sample(slots, in_base // per_extent)))
    write_layer(images / "top.qcow2", size, "base",
                extents(rng, rng.sample(slots, in_top // per_extent)))
    store = work / "store"
    run(*SNAPFS, "init", store, cwd=ROOT, env=env)
    run(*SNAPFS, "vm", "add", store, VM, "--disk", f"sda={images / 'top.qcow2'}", cwd=ROOT,
        env=env)
    if [s["name"] for s in manifest(store, VM)["snapshots"]] != ["base"]:
        raise SystemExit(f"bench live: unexpected snapshots {manifest(store, VM)['snapshots']}")
    own = {layer: own_bytes(images / f"{layer}.qcow2") for layer in ("base", "top")}
    log(f"merge: disk {size / GiB:g} GiB; own data " +
        ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in own.items()))
    return {"dir": work, "images": images, "store": store, "own": own}


def _files(*dirs):
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


def _uncached(*dirs):
    """Sync, then drop every file under ``dirs`` from the page cache."""
    os.sync()
    evict(_files(*dirs))


def _same_view(path, reference, who):
    """Abort unless qcow2 ``path`` reads as the input's top view."""
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(path),
                        str(reference)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench live: after {who}, {path} does not read as the input's top "
                         f"view (qemu-img compare exit {r.returncode}):\n{r.stdout}{r.stderr}")


def run_snapfs(inp, d, env):
    """The live delete, timed; then checked with QEMU stopped.  -> (seconds,
    bytes moved)."""
    store = d / "store"
    vm = LiveVm(store, VM, d, {"sda": 0})
    with vm.running() as proc:
        _uncached(store)
        start = time.perf_counter()
        run(*SNAPFS, "snapshot", "delete", store, VM, "base", cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        if proc.poll() is not None:
            raise SystemExit(f"bench live: QEMU exited ({proc.returncode}) during the merge")
    m = vm.manifest()
    last = m["last_operation"]
    if (last.get("op"), last.get("snapshot"), last.get("live")) != ("delete", "base", True) \
            or m["operation"] is not None or m["snapshots"]:
        raise SystemExit(f"bench live: after the live delete: last {last}, operation "
                         f"{m['operation']}, snapshots {m['snapshots']}")
    # The direction that moves what qemu-img commit moves: top into base.
    if last["disks"]["sda"]["direction"] != "commit":
        raise SystemExit(f"bench live: snapfs merged by {last['disks']['sda']['direction']}; "
                         f"the inputs were built for an active commit")
    for vid in m["volumes"]:
        run("qemu-img", "check", "-q", "-f", "qcow2", vm.dir / vid)
    _same_view(vm.dir / m["active"]["sda"], inp["images"] / "top.qcow2", "snapfs")
    return seconds, last["disks"]["sda"]["bytes"]


def run_qemu(inp, d):
    _uncached(d)
    start = time.perf_counter()
    run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", d / "top.qcow2")
    seconds = time.perf_counter() - start
    run("qemu-img", "check", "-q", "-f", "qcow2", d / "base.qcow2")
    _same_view(d / "base.qcow2", inp["images"] / "top.qcow2", "qemu-img commit")
    return seconds, None


def measure_merge(work, quick, runs, env):
    inp = build_chain(work, quick, env)
    runs += runs % 2       # each side goes first equally often
    inputs = _files(inp["images"], inp["store"])
    stamps = {p: os.stat(p).st_mtime_ns for p in inputs}
    times = {"snapfs": [], "qemu": []}
    moved = None
    for i in range(runs):
        rundir = work / f"run{i}"
        sdir, qdir = rundir / "snapfs", rundir / "qemu"
        sdir.mkdir(parents=True)
        qdir.mkdir()
        run("cp", "-a", "--sparse=always", inp["store"], sdir / "store")
        run("cp", "--sparse=always", inp["images"] / "base.qcow2", qdir / "base.qcow2")
        os.link(inp["images"] / "top.qcow2", qdir / "top.qcow2")
        sides = [("snapfs", lambda: run_snapfs(inp, sdir, env)),
                 ("qemu", lambda: run_qemu(inp, qdir))]
        if i % 2:
            sides.reverse()
        got = {}
        for name, side in sides:
            got[name], bytes_moved = side()
            moved = bytes_moved or moved
            _uncached(rundir)
        if {p: os.stat(p).st_mtime_ns for p in inputs} != stamps:
            raise SystemExit("bench live: an input changed (a linked file was written)")
        for name in times:
            times[name].append(got[name])
        log(f"merge run {i + 1}/{runs}: snapfs live {got['snapfs']:.2f} s, qemu-img commit "
            f"{got['qemu']:.2f} s ({sides[0][0]} first)")
        shutil.rmtree(rundir)
    extra = median([a - b for a, b in zip(times["snapfs"], times["qemu"])])
    log(f"merge: snapfs moved {moved / MiB:.1f} MiB by an active commit; qemu-img commit "
        f"moved top's {inp['own']['top'] / MiB:.1f} MiB; snapfs took {extra:.2f} s longer "
        f"(median of the runs' differences)")
    shutil.rmtree(work)
    return [Row("12", f"live merge (CLI delete, QEMU running): active commit of "
                      f"{inp['own']['top'] / MiB:.0f} MiB, pivot", "s",
                median(times["snapfs"]), median(times["qemu"]), "qemu-img commit, offline",
                "-", None)]


def measure(work, quick, runs):
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("bench live: needs qemu-system-x86_64 (scripts/setup.sh installs it)")
    work.mkdir(parents=True, exist_ok=True)
    log("the guest's kernel and initramfs (built once, cached)")
    guest = build_guest()
    with environment(work / "run"):
        env = snapfs_env(work)
        run(sys.executable, "-m", "compileall", "-q", ROOT / "snapfs", env=env)   # bytecode cache
        rows = measure_snapshots(work / "snapshots", runs, env, guest)
        rows += measure_merge(work / "merge", quick, runs, env)
    return rows
