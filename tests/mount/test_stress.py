"""Acceptance of the hardening issue: concurrent creates, deletes, reads of
snapshots that are never deleted, and writes to the active disks, for
SNAPFS_STRESS_SECONDS (60 by default, 300 in the thorough profile).

Findings 4 and 5: readers saw transient EIO ("data cluster ... lies past
the end of the file", "unknown volume") while other snapshots were created
and deleted, and deleted volumes stayed open until unmount.  Here: no
errno but the documented ones, no view that changes, no deleted file held
open, and the daemon's descriptors and memory stay bounded."""

import errno
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

from tests.support import qemu
from tests.support.daemon import daemon_pid, deleted_files, open_files, rss_bytes
from tests.support.mounting import mounted, snapfs, wait_for

MiB = 1 << 20
PROFILE = os.environ.get("SNAPFS_TEST_PROFILE", "ci")
SECONDS = float(os.environ.get("SNAPFS_STRESS_SECONDS", 300 if PROFILE == "thorough" else 60))
DISKS = {"sda": 24 * MiB, "sdb": 8 * MiB}
KEEP = ("keep1", "keep2")
# What an operation may answer while another runs (DESIGN.md: EBUSY).
OPERATION_ERRNOS = {errno.EBUSY}


def digest(path):
    """sha256 of a view, read through the daemon: the page cache of the
    file is dropped first (views may be cached by the kernel)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        while chunk := os.read(fd, MiB):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def command(path, line):
    """``echo LINE > path``: one write(), as the shell does.  (Python's text
    files write again at close() after a failed write: a command refused
    with EBUSY could then run after all.)"""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Run:
    def __init__(self, vm, deadline):
        self.vm = vm
        self.deadline = deadline
        self.lock = threading.Lock()
        self.errors = []          # unexpected: (what, errno or exception)
        self.counts = {}
        self.temp = []            # names of snapshots made by the run, to delete
        # Snapshots made during the run and never deleted: merges of their
        # neighbours change their chains under their readers.
        self.kept = {}            # (snapshot, disk) -> sha256

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, what, error):
        with self.lock:
            self.errors.append((what, repr(error)))

    def going(self):
        return time.monotonic() < self.deadline and len(self.errors) < 20


def creator(run):
    i = 0
    while run.going():
        name = f"t{i}"
        i += 1
        try:
            if i % 3:
                os.mkdir(run.vm / "snapshots" / name)
                # A mkdir asked while a merge runs is queued: the snapshot
                # shows once its turn comes (test_merge_wait.py).
                if not wait_for((run.vm / "snapshots" / name).exists, timeout=120):
                    run.fail(f"create {name}", "the queued mkdir never made it")
                    continue
            else:
                command(run.vm / "control" / "create", f"{name} made by the stress run\n")
            if i % 8 == 1:
                digests = {(name, d): digest(run.vm / "snapshots" / name / f"{d}.raw")
                           for d in DISKS}
                with run.lock:
                    run.kept.update(digests)
            else:
                with run.lock:
                    run.temp.append(name)
            run.count("created")
        except OSError as e:
            if e.errno not in OPERATION_ERRNOS:
                run.fail(f"create {name}", e)
            run.count(f"create {errno.errorcode[e.errno]}")
        time.sleep(random.uniform(0, 0.2))


def deleter(run):
    while run.going():
        with run.lock:
            name = random.choice(run.temp) if len(run.temp) > 2 else None
        if name is None:
            time.sleep(0.05)
            continue
        how = "rmdir" if random.random() < 0.5 else "control"
        try:
            if how == "rmdir":
                os.rmdir(run.vm / "snapshots" / name)
            else:
                command(run.vm / "control" / "delete", f"{name}\n")
            with run.lock:
                run.temp.remove(name)
            run.count("deleted")
        except OSError as e:
            if e.errno not in OPERATION_ERRNOS:
                run.fail(f"delete {name}", e)
            run.count(f"delete {errno.errorcode[e.errno]}")
        time.sleep(random.uniform(0, 0.2))


def reader(run, expected):
    """Reads the never-deleted snapshots whole, and now and then the newest
    snapshot of the run (which may go away: ENOENT), never an EIO."""
    while run.going():
        with run.lock:
            views = list(expected.items()) + list(run.kept.items())
        for (snap, disk), want in views:
            path = run.vm / "snapshots" / snap / f"{disk}.raw"
            try:
                got = digest(path)
            except OSError as e:
                run.fail(f"read {snap}/{disk}", e)
                continue
            if got != want:
                run.fail(f"read {snap}/{disk}", "the view changed")
            run.count("view read")
        with run.lock:
            newest = run.temp[-1] if run.temp else None
        if newest:
            try:
                with open(run.vm / "snapshots" / newest / "sda.raw", "rb") as f:
                    f.seek(random.randrange(DISKS["sda"] // MiB) * MiB)
                    f.read(MiB)
                run.count("temp read")
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY):
                    run.fail(f"read {newest}", e)


def writer(run):
    rng = random.Random(7)
    files = {d: open(run.vm / "active" / f"{d}.raw", "r+b", buffering=0) for d in DISKS}
    try:
        while run.going():
            disk = rng.choice(list(DISKS))
            offset = rng.randrange(DISKS[disk] // 4096) * 4096
            try:
                files[disk].seek(offset)
                files[disk].write(rng.randbytes(4096 * rng.randint(1, 16))[:DISKS[disk] - offset])
                run.count("write")
            except OSError as e:
                run.fail(f"write {disk}@{offset}", e)
            time.sleep(0.005)
    finally:
        for f in files.values():
            f.close()


def sampler(run, pid, store, samples):
    vm_dir = Path(store) / "vms" / "vm"
    while run.going():
        samples.append({"deleted": deleted_files(pid, store), "fds": len(open_files(pid)),
                        "volumes": len(os.listdir(vm_dir)) - 1,
                        "rss": rss_bytes(pid), "time": time.monotonic()})
        time.sleep(0.5)


def test_concurrent_creates_deletes_reads_and_writes(tmp_path, store):
    snapfs("vm", "add", store, "vm", *[a for d, size in DISKS.items()
                                       for a in ("--disk", f"{d}={size}")])
    samples = []
    with mounted(store, tmp_path / "mnt") as mnt:
        vm = mnt / "vm"
        rng = random.Random(1)
        expected = {}
        for snap in KEEP:
            for disk, size in DISKS.items():
                with open(vm / "active" / f"{disk}.raw", "r+b") as f:
                    for _ in range(40):
                        f.seek(rng.randrange(size // 65536) * 65536)
                        f.write(rng.randbytes(65536))
            os.mkdir(vm / "snapshots" / snap)
            for disk in DISKS:
                expected[(snap, disk)] = digest(vm / "snapshots" / snap / f"{disk}.raw")
        pid = daemon_pid(store)
        run = Run(vm, time.monotonic() + SECONDS)
        threads = [threading.Thread(target=creator, args=(run,)),
                   threading.Thread(target=deleter, args=(run,)),
                   threading.Thread(target=reader, args=(run, expected)),
                   threading.Thread(target=reader, args=(run, expected)),
                   threading.Thread(target=writer, args=(run,)),
                   threading.Thread(target=sampler, args=(run, pid, store, samples))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 300)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        print(f"stress: {SECONDS:.0f} s, {run.counts}")
        assert run.errors == [], run.errors
        assert run.counts.get("created", 0) >= 10 and run.counts.get("deleted", 0) >= 5, run.counts
        assert run.counts.get("view read", 0) >= 10 and run.counts.get("write", 0) >= 100
        # Quiet now: nothing deleted is held open, and what is held is the
        # store's volumes and a few of the daemon's own.
        deadline = time.monotonic() + 60
        while '"state": "running"' in (vm / "control" / "status").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for (snap, disk), want in list(expected.items()) + list(run.kept.items()):
            assert digest(vm / "snapshots" / snap / f"{disk}.raw") == want
        assert len(run.kept) >= 2 * len(DISKS)
        assert deleted_files(pid, store) == []
        volumes = len(os.listdir(Path(store) / "vms" / "vm")) - 1
        assert len(open_files(pid)) <= volumes + 24
    held = [s for s in samples if s["deleted"]]
    print(f"stress: {len(samples)} samples; fds {min(s['fds'] for s in samples)}.."
          f"{max(s['fds'] for s in samples)}; rss {min(s['rss'] for s in samples) >> 20}.."
          f"{max(s['rss'] for s in samples) >> 20} MiB; samples with deleted files open: "
          f"{len(held)}")
    assert held == [], held[:3]
    # Bounded by the volumes the VM has now (snapshots kept by the run add
    # volumes): one descriptor each for the mount's chains, and while a
    # merge runs one more each for the chain it reads from (its own pool);
    # the slack covers a volume made or deleted between the two readings,
    # and the daemon's own files.  Memory does not grow with the number of
    # operations.
    over = [s for s in samples if s["fds"] > 2 * s["volumes"] + 32]
    assert over == [], over[:3]
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    assert max(s["rss"] for s in last) <= max(s["rss"] for s in first) * 1.5 + 32 * MiB
    # Offline, with QEMU as the oracle: the store is consistent and the kept
    # snapshots read as they did.
    assert snapfs("check", store).returncode == 0
    m = json.loads((Path(store) / "vms" / "vm" / "manifest.json").read_text())
    expected.update(run.kept)
    for snap in m["snapshots"]:
        for disk in DISKS:
            if (snap["name"], disk) in expected:
                vol = Path(store) / "vms" / "vm" / snap["volumes"][disk]
                assert hashlib.sha256(qemu.to_raw(vol)).hexdigest() == \
                    expected[(snap["name"], disk)], (snap["name"], disk)
    for vol in (Path(store) / "vms" / "vm").iterdir():
        if vol.name != "manifest.json":
            assert qemu.is_clean(qemu.check(vol)), vol
