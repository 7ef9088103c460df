"""Rows 5 and 6: deleting a snapshot (a merge) against ``qemu-img commit``.

Inputs, built once per row with random.Random(SEED) and qemu-io (64 KiB
clusters; extents of 64 KiB..2 MiB, one per 2 MiB slot, each filled with its
own byte pattern and written in shuffled order, so host and guest order
differ): a chain base <- b <- c <- top.  Imported with ``snapfs vm add``,
b and c become snapshots and top the active state; deleting snapshot b
merges b with c.

- row 5, "similar": b and c hold the same amount of data at disjoint
  offsets (b a little more), so both directions move about as much and
  snapfs commits c into b: exactly the bytes ``qemu-img commit`` moves.
- row 6, "small-b": b holds just under 20 % of what c holds, partly under
  c's data, so snapfs streams b into c while ``qemu-img commit`` moves all
  of c.

Each run, not timed: fresh copies of the files each side writes (files a
side only reads are hard links to the inputs; every input's mtime is
checked afterwards).  Timed, alternating which side goes first, over an
even number of runs (--runs rounded up: the side that goes first is often
slower, so each side goes first equally often):

- snapfs as a user runs it: the wall time of the CLI ``snapfs snapshot
  delete STORE vm b``, Python start-up included (with its bytecode cached,
  as in any installation);
- the reference: the wall time of ``qemu-img commit -d c.qcow2`` (-d leaves
  c as it was instead of emptying it; snapfs deletes its spare volume, so
  the reference does strictly less work).

Just before each side runs, the files it only reads (the merge's source
among them) are dropped from the page cache (POSIX_FADV_DONTNEED), after a
sync that leaves nothing dirty: both start cold on the data they read and
warm on their programs.  (The fresh copies they write into stay cached:
neither side reads their data, only their tables.)  Once a side has run
and been checked, every file it touched is dropped too: pages a side
leaves behind slow the next one down, whichever it is.

Right after it runs, each side's result is checked against the layouts
the inputs were built from: every data extent of the expected top view
must read back as its pattern (qemu-io ``read -P``) and everything else
must be unallocated or read as zeros (``qemu-img map``); snapfs must have
merged in the intended direction, and every image either side wrote must
pass ``qemu-img check``.  Any mismatch aborts the bench.  The bytes each
side moved are printed to stderr (snapfs's from its manifest's
last_operation).  Default size: about 2.3 minutes; --quick: about 25 s.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import GiB, MiB, ROOT, SEED, SNAPFS, median, ratio_row, run

CLUSTER = 64 << 10
SLOT = 2 * MiB          # extents are placed one per slot of this size
VM = "vm"
LAYERS = ("base", "b", "c", "top")

# Row number, target (ratio maximum), and the direction snapfs must take.
SCENARIOS = {
    "similar": dict(number="5", maximum=1.0, direction="commit",
                    measure="delete a snapshot (merge), similar layers"),
    "small-b": dict(number="6", maximum=0.2, direction="stream",
                    measure="delete a snapshot, cheaper direction <= 20 %"),
}
# (virtual disk size, bytes the merge moves (row 5) or c holds (row 6))
SIZES = {"similar": (4 * GiB, 1 * GiB), "small-b": (4 * GiB, 1536 * MiB)}
QUICK_SIZES = {"similar": (1 * GiB, 256 * MiB), "small-b": (1 * GiB, 448 * MiB)}


def log(msg):
    print(f"bench merges: {msg}", file=sys.stderr, flush=True)


# -- inputs --------------------------------------------------------------------

def extents(rng, slots, min_len=CLUSTER, max_len=SLOT):
    """One extent per slot: (guest offset, length, pattern byte), shuffled."""
    out = []
    for s in slots:
        length = rng.randrange(min_len, max_len + 1, CLUSTER)
        start = s * SLOT + rng.randrange(0, SLOT - length + 1, CLUSTER)
        out.append((start, length, rng.randrange(1, 256)))
    rng.shuffle(out)
    return out


def layouts(scenario, disk_size, moved):
    """Extents per layer.  ``moved``: see SIZES."""
    rng = random.Random(f"{SEED}-{scenario}")
    nslots = disk_size // SLOT
    slots = list(range(nslots))
    count = max(1, moved // ((CLUSTER + SLOT) // 2))
    base = extents(rng, rng.sample(slots, nslots // 32))
    top = extents(rng, rng.sample(slots, max(1, nslots // 64)), max_len=256 << 10)
    if scenario == "similar":
        if 2 * count > nslots:
            raise SystemExit(f"bench merges: {moved} bytes do not fit twice in {disk_size}")
        picked = rng.sample(slots, 2 * count)
        b, c = extents(rng, picked[:count]), extents(rng, picked[count:])
        if sum(e[1] for e in c) > sum(e[1] for e in b):
            b, c = c, b                    # b a little bigger: snapfs commits c
    else:
        c = extents(rng, rng.sample(slots, count))
        b, room = [], sum(e[1] for e in c) * 19 // 100
        for e in extents(rng, rng.sample(slots, count // 3)):
            if e[1] <= room:
                b.append(e)
                room -= e[1]
    return {"base": base, "b": b, "c": c, "top": top}


def expected_view(layers):
    """The top view the layouts give: sorted [(start, end, pattern)] of the
    data (upper layers win), everything else zeros."""
    owner = {}
    for layer in LAYERS:
        for off, n, pat in layers[layer]:
            for cl in range(off // CLUSTER, (off + n) // CLUSTER):
                owner[cl] = pat
    out = []
    for cl in sorted(owner):
        if out and out[-1][1] == cl and out[-1][2] == owner[cl]:
            out[-1][1] = cl + 1
        else:
            out.append([cl, cl + 1, owner[cl]])
    return [(a * CLUSTER, b * CLUSTER, p) for a, b, p in out]


def write_layer(path, size, parent, written):
    """A qcow2 layer over ``parent`` (``parent``.qcow2 in the same
    directory; None for a base) that holds the ``written`` extents (as
    ``extents`` gives them), written with qemu-io."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}"]
    if parent:
        cmd += ["-b", f"{parent}.qcow2", "-F", "qcow2"]
    run(*cmd, path, size)
    cmds = "".join(f"write -q -P {pat} {off} {n}\n" for off, n, pat in written)
    r = subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=cmds,
                       capture_output=True, text=True)
    if r.returncode != 0 or "error" in r.stdout.lower():
        raise SystemExit(f"bench merges: qemu-io writing {path} failed:\n{r.stdout}{r.stderr}")


def own_bytes(path):
    """Data bytes an image holds itself (not its backing), per qemu-img map."""
    out = run("qemu-img", "map", "--output=json", "-f", "qcow2", path).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def snapfs_env(work):
    """The environment snapfs runs in: bytecode cached (in ``work``, not in
    the source tree) as in any installation, even if this shell disables it."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(work / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def build(work, scenario, disk_size, moved):
    """The images, a store that imported them, and what to expect.  Returns a dict."""
    d = work / scenario
    images = d / "images"
    images.mkdir(parents=True)
    layers = layouts(scenario, disk_size, moved)
    parent = None
    for layer in LAYERS:
        write_layer(images / f"{layer}.qcow2", disk_size, parent, layers[layer])
        parent = layer
    store = d / "store"
    env = snapfs_env(work)
    run(sys.executable, "-c", "import snapfs.cli, snapfs.ops.operations, snapfs.ops.merge, tqdm",
        cwd=ROOT, env=env)                # fills the bytecode cache
    run(*SNAPFS, "init", store, cwd=ROOT, env=env)
    run(*SNAPFS, "vm", "add", store, VM, "--disk", f"sda={images / 'top.qcow2'}",
        cwd=ROOT, env=env)
    m = json.loads((store / "vms" / VM / "manifest.json").read_text())
    names = {s["name"]: s["volumes"]["sda"] for s in m["snapshots"]}
    if sorted(names) != ["b", "base", "c"]:
        raise SystemExit(f"bench merges: unexpected snapshots {sorted(names)}")
    own = {layer: own_bytes(images / f"{layer}.qcow2") for layer in LAYERS}
    log(f"{scenario}: disk {disk_size / GiB:g} GiB; own data " +
        ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in own.items()))
    if scenario == "small-b" and own["b"] > own["c"] // 5:
        raise SystemExit("bench merges: b holds more than 20 % of c's data")
    return {"dir": d, "images": images, "store": store, "own": own, "env": env,
            "vols": {**names, "top": m["active"]["sda"]}, "expected": expected_view(layers)}


# -- one run -------------------------------------------------------------------

def _place(src, dst, copy):
    """Copy ``src`` to ``dst`` (a file the side writes), or hard-link it (a
    file it only reads).  Returns ``dst`` if linked, else None."""
    if copy:
        run("cp", "--sparse=always", src, dst)
        return None
    os.link(src, dst)
    return dst


def _stamp(paths):
    return {str(p): (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths}


def prepare_qemu(inp, dest):
    """A copy of b (the commit target), links to the rest (c is only read:
    ``qemu-img commit -d`` leaves it as it was).  Returns the linked files."""
    dest.mkdir()
    linked = [_place(inp["images"] / f"{layer}.qcow2", dest / f"{layer}.qcow2", layer == "b")
              for layer in LAYERS]
    return [p for p in linked if p]


def prepare_snapfs(inp, dest, direction):
    """A copy of the store: the merge target, the volume whose backing name
    the relink rewrites and the small files copied, the rest linked.
    Returns the linked files."""
    src_vm, vm = inp["store"] / "vms" / VM, dest / "vms" / VM
    vm.mkdir(parents=True)
    for f in inp["store"].iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    vols = inp["vols"]
    written = {vols["b"], vols["top"]} if direction == "commit" else {vols["c"]}
    linked = [_place(f, vm / f.name, f.name in written or f.name not in vols.values())
              for f in src_vm.iterdir()]
    return [p for p in linked if p]


def evict(paths):
    """Drop ``paths`` from the page cache (they must be clean: synced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_qemu(d):
    start = time.perf_counter()
    run("qemu-img", "commit", "-q", "-d", "-f", "qcow2", d / "c.qcow2")
    return time.perf_counter() - start


def run_snapfs(store, env):
    start = time.perf_counter()
    run(*SNAPFS, "snapshot", "delete", store, VM, "b", cwd=ROOT, env=env)
    return time.perf_counter() - start


def _check_view(path, expected, script):
    """Start a qemu-io that reads the view of ``path`` and verifies every
    expected extent's pattern, and zeros wherever ``qemu-img map`` says
    something is allocated that should not be.  Returns the Popen."""
    want = set()
    cmds = []
    for start, end, pat in expected:
        want.update(range(start // CLUSTER, end // CLUSTER))
        cmds.append(f"read -q -P {pat} {start} {end - start}\n")
    out = run("qemu-img", "map", "--output=json", "-f", "qcow2", path).stdout
    for e in json.loads(out):
        if e["data"]:
            for cl in range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER)):
                if cl not in want:
                    cmds.append(f"read -q -P 0 {cl * CLUSTER} {CLUSTER}\n")
    script.write_text("".join(cmds))
    with open(script) as f:
        return subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(path)], stdin=f,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_image(path):
    r = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench merges: qemu-img check {path} is not clean "
                         f"(exit {r.returncode}):\n{r.stdout}{r.stderr}")


def _check_top(path, expected, script, who):
    proc = _check_view(path, expected, script)
    out, _ = proc.communicate()
    if proc.returncode != 0 or "fail" in out.lower():
        bad = [line.replace("qemu-io> ", "") for line in out.splitlines()
               if "fail" in line.lower()] or [out[-500:]]
        raise SystemExit(f"bench merges: after {who} the top view is not what it was "
                         f"(qemu-io exit {proc.returncode}):\n" + "\n".join(bad[:10]))


def verify_qemu(inp, qdir):
    """Abort unless qemu-img commit kept the top view and left b clean."""
    _check_image(qdir / "b.qcow2")
    _check_top(qdir / "top.qcow2", inp["expected"], qdir.parent / "qemu.io", "qemu-img commit")
    return None


def verify_snapfs(inp, store, expected_direction):
    """Abort unless snapfs deleted b in the intended direction, kept the top
    view and left every volume clean.  Returns its (direction, bytes moved)
    from its manifest."""
    m = json.loads((store / "vms" / VM / "manifest.json").read_text())
    rec = m["last_operation"]
    if not rec or rec.get("op") != "delete" or rec.get("snapshot") != "b":
        raise SystemExit(f"bench merges: snapfs recorded {rec}, not the delete of b")
    direction, moved = rec["disks"]["sda"]["direction"], rec["disks"]["sda"]["bytes"]
    if direction != expected_direction:
        raise SystemExit(f"bench merges: snapfs merged by {direction}, the inputs were "
                         f"built for {expected_direction}")
    if m["operation"] is not None or [s["name"] for s in m["snapshots"]] != ["base", "c"]:
        raise SystemExit(f"bench merges: snapfs manifest after delete: {m['snapshots']}, "
                         f"operation {m['operation']}")
    for vid in m["volumes"]:
        _check_image(store / "vms" / VM / vid)
    _check_top(store / "vms" / VM / m["active"]["sda"], inp["expected"],
               store.parent / "snapfs.io", "snapfs")
    return direction, moved


def measure_scenario(inp, scenario, runs):
    spec = SCENARIOS[scenario]
    # Whichever side goes first in a run is often slower (measured in one
    # run: qemu-img commit 3.2 and 3.5 s first, 1.7-1.9 s second): an even
    # number of runs puts each side first equally often, so that the
    # medians do not favour one of them.
    runs += runs % 2
    by_position = {"snapfs": ([], []), "qemu": ([], [])}   # (first, second)
    inputs = [p for d in (inp["images"], inp["store"] / "vms" / VM) for p in d.iterdir()]
    stamps = _stamp(inputs)
    ours, theirs = [], []
    moved = None
    for i in range(runs):
        rundir = inp["dir"] / f"run{i}"
        rundir.mkdir()
        qdir, store = rundir / "qemu", rundir / "store"
        t0 = time.perf_counter()
        reads = {"qemu": prepare_qemu(inp, qdir),
                 "snapfs": prepare_snapfs(inp, store, spec["direction"])}
        os.sync()
        t_prep = time.perf_counter() - t0
        sides = [("snapfs", store, lambda d: run_snapfs(d, inp["env"]),
                  lambda: verify_snapfs(inp, store, spec["direction"])),
                 ("qemu", qdir, run_qemu, lambda: verify_qemu(inp, qdir))]
        if i % 2:
            sides.reverse()
        t, t_verify = {}, 0.0
        for name, d, fn, check in sides:
            os.sync()
            evict(reads[name])
            t[name] = fn(d)
            t0 = time.perf_counter()
            moved = check() or moved
            t_verify += time.perf_counter() - t0
            # What a side leaves in the page cache slows the next one down
            # (measured: three qemu-img commits in a row took 1.8, 2.4 and
            # 3.1 s, and 1.8 s each with this): leave nothing.
            os.sync()
            evict(p for p in d.rglob("*") if p.is_file())
        if _stamp(inputs) != stamps:
            raise SystemExit("bench merges: an input changed (a linked file was written)")
        ours.append(t["snapfs"])
        theirs.append(t["qemu"])
        for position, (name, *_) in enumerate(sides):
            by_position[name][position].append(t[name])
        log(f"{scenario} run {i + 1}/{runs}: snapfs {t['snapfs']:.2f} s, "
            f"qemu-img commit {t['qemu']:.2f} s ({sides[0][0]} first; "
            f"untimed: copies {t_prep:.1f} s, checks {t_verify:.1f} s)")
        shutil.rmtree(rundir)
    log(f"{scenario}: medians when first / second: " + ", ".join(
        f"{name} {median(first):.2f} / {median(second):.2f} s"
        for name, (first, second) in by_position.items()))
    log(f"{scenario}: snapfs moved {moved[1] / MiB:.1f} MiB by {moved[0]} "
        f"({moved[1] / inp['own']['c']:.0%} of what qemu-img commit moved); "
        f"qemu-img commit moved {inp['own']['c'] / MiB:.1f} MiB (all of c)")
    return ratio_row(spec["number"], spec["measure"], "s", median(ours), median(theirs),
                     "qemu-img commit", maximum=spec["maximum"])


def measure(work: Path, quick: bool, runs: int):
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in SCENARIOS:
        disk_size, moved = (QUICK_SIZES if quick else SIZES)[scenario]
        inp = build(work, scenario, disk_size, moved)
        rows.append(measure_scenario(inp, scenario, runs))
        shutil.rmtree(inp["dir"])
    return rows
