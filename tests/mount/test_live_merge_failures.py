"""Live deletes (merges inside a real QEMU) that go wrong: a job that stops
moving (paused in QEMU) is given up after the stall limit; a pivot asked
of a paused job happens once it runs again, or fails with EIO and is
finished by ``snapfs check`` later; a pivot QEMU refuses (the job
cancelled) starts the merge again; snapfs killed at each step of an
intermediate commit, recovered with QEMU running and gone; a merge that
keeps failing in QEMU (its store full) leaves its intent, and every later
operation reports it until space is freed.

The test acts on QEMU through a second monitor (``LiveVm.ctl``) while
snapfs holds the attached one."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from snapfs.qemu.qmp import QmpSession
from tests.mount.test_live_merge import (K64, POINTS, SIZES, check_stopped, cli, snapshots, take,
                                         write_both)
from tests.support.live_vm import LiveVm
from tests.support.mounting import mounted, snapfs, wait_for
from tests.support.qemu import info_chain, qemu_img

pytestmark = pytest.mark.mount


@pytest.fixture
def vm(tmp_path, store, run_dir):
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    return LiveVm(store, "web", tmp_path, SIZES)


def ctl(vm, command, arguments=None):
    with QmpSession(vm.ctl) as q:
        return q.execute(command, arguments)


def job_status(vm, job):
    return {j["id"]: j["status"] for j in ctl(vm, "query-jobs")}.get(job)


def pause_job(vm, job):
    """``job-pause``: a ready mirror stands by (and refuses job-complete)."""
    ctl(vm, "job-pause", {"id": job})
    assert wait_for(lambda: job_status(vm, job) == "standby"), job_status(vm, job)


def leaves(vm):
    return {d: str(vm.dir / v) for d, v in vm.manifest()["active"].items()}


def shared_view(vm, vid):
    """A volume's view read beside a running QEMU (``-U``: QEMU holds the
    image locks)."""
    out = vm.tmp / "shared.raw"
    qemu_img("convert", "-U", "-f", vm.manifest()["volumes"][vid]["format"], "-O", "raw",
             vm.dir / vid, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def error_line(stderr):
    """The CLI's error: one line, after any warnings, never a traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and all(x.startswith("snapfs: ") for x in lines), stderr
    assert lines[-1].startswith("snapfs: error: "), stderr
    return lines[-1]


@contextlib.contextmanager
def delete_paused_at(vm, tmp_path, name, point, env=None):
    """``snapfs snapshot delete NAME`` started and held at crash point
    ``point`` (SNAPFS_PAUSE_AT); yields (process, pause file): removing
    the file lets it go on.  Killed by its PID if the test ends first."""
    pause = tmp_path / "pause"
    full = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_CRASH_")}
    full.update(env or {}, SNAPFS_PAUSE_AT=point, SNAPFS_PAUSE_FILE=str(pause))
    proc = subprocess.Popen([sys.executable, "-m", "snapfs.cli", "snapshot", "delete",
                             str(vm.store), vm.name, name], env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: pause.exists() or proc.poll() is not None, timeout=30)
        assert pause.exists(), proc.communicate()
        yield proc, pause
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        with contextlib.suppress(FileNotFoundError):
            pause.unlink()


def finished(vm, deleted, direction="commit"):
    """The live delete of ``deleted`` is done: no intent, QEMU writes the
    manifest's leaves."""
    m = vm.manifest()
    assert m["operation"] is None, m["operation"]
    last = m["last_operation"]
    assert last["snapshot"] == deleted and last.get("live") is True, last
    assert {x["direction"] for x in last["disks"].values()} == {direction}, last
    assert vm.tops() == leaves(vm)


def check_bare_chains(vm):
    """``qemu-img info --backing-chain`` of each leaf names the manifest's
    parents, bare."""
    m = vm.manifest()
    for vid in m["active"].values():
        for image in info_chain(vm.dir / vid):
            name = os.path.basename(image["filename"])
            assert image.get("backing-filename") == m["volumes"][name]["parent"], image


def active_commit_setup(vm, expected):
    """keep, then a (a large layer), then a small leaf: deleting a is an
    active commit of the leaf into a's volume, which pivots."""
    write_both(vm, 0x10, 0, 4 * K64)
    take(vm, "keep", expected)
    write_both(vm, 0x20, 0, 4 * K64)
    snapfs("snapshot", "create", vm.store, "web", "a")
    write_both(vm, 0x30, K64, K64)


# -- 1. a job that stops moving ---------------------------------------------------

def test_a_paused_job_is_given_up_after_the_stall_limit(tmp_path, vm):
    """snapfs killed right after the active commit went ready; the job is
    paused in QEMU; ``snapfs check`` (SNAPFS_JOB_STALL=1) gives up on it
    with EIO and changes nothing; once resumed, check finishes the delete."""
    expected = {}
    with vm.running():
        active_commit_setup(vm, expected)
        n = POINTS["commit"].index("delete:ready") + 1
        trace = tmp_path / "trace"
        r = cli(vm, "snapshot", "delete", vm.store, "web", "a",
                env={"SNAPFS_CRASH_AT": str(n), "SNAPFS_CRASH_TRACE": str(trace)})
        assert r.returncode == -signal.SIGKILL, r
        assert trace.read_text().splitlines()[-1] == f"{n} delete:ready"
        intent = vm.manifest()
        job = intent["operation"]["live"]["sda"]["job"]
        assert intent["operation"]["live"]["sda"]["step"] == "ready"
        pause_job(vm, job)
        write_both(vm, 0x40, 3 * K64, K64)        # into the old leaf while the job stands by
        tops = vm.tops()
        assert tops == leaves(vm)

        start = time.monotonic()
        r = cli(vm, "check", vm.store, env={"SNAPFS_JOB_STALL": "1"})
        took = time.monotonic() - start
        assert r.returncode == 1, r
        assert 1 <= took < 30, took
        for words in (job, "standby", "no progress", "stays on its", "snapfs check"):
            assert words in r.stderr, (words, r.stderr)
        assert "Traceback" not in r.stderr
        assert vm.manifest() == intent
        assert vm.tops() == tops
        assert job_status(vm, job) == "standby"
        assert shared_view(vm, snapshots(vm)["keep"]["volumes"]["sda"]) == expected["keep"]["sda"]

        ctl(vm, "job-resume", {"id": job})
        r = cli(vm, "check", vm.store)
        assert r.returncode == 0 and "live delete" in r.stderr, r.stderr
        finished(vm, "a")
        write_both(vm, 0x50, 5 * K64, K64)        # lands in the new leaves
    check_stopped(vm, expected)


# -- 2. a pivot that does not happen at once -------------------------------------

def test_a_pivot_asked_of_a_paused_job_happens_when_it_resumes(tmp_path, vm):
    """The delete held right before job-complete; the job paused from the
    test (standby).  QEMU 7.2 takes job-complete in standby and pivots
    once the job runs again: resumed 0.7 s later, the delete finishes,
    with the writes from before and during."""
    expected = {}
    with vm.running():
        active_commit_setup(vm, expected)
        with delete_paused_at(vm, tmp_path, "a", "delete:completing") as (proc, pause):
            job = vm.manifest()["operation"]["live"]["sda"]["job"]
            pause_job(vm, job)
            write_both(vm, 0x40, 2 * K64, 2 * K64)      # during: mirrored after the resume
            resume = threading.Timer(0.7, ctl, (vm, "job-resume", {"id": job}))
            start = time.monotonic()
            resume.start()
            try:
                pause.unlink()
                out, err = proc.communicate(timeout=60)
            finally:
                resume.cancel()
                resume.join()
        assert proc.returncode == 0, err
        assert time.monotonic() - start >= 0.7      # it waited for the job to resume
        finished(vm, "a")
        write_both(vm, 0x50, 6 * K64, K64)
    check_stopped(vm, expected)


def test_a_refused_pivot_starts_the_merge_again(tmp_path, vm):
    """The delete held right before job-complete; the job cancelled from
    the test as ``virsh blockjob --abort`` does (block-job-cancel of a
    ready job: it completes without a pivot).  QEMU refuses job-complete,
    the job ends with the VM on its old chain; the delete notices, starts
    the merge again and pivots: the manifest and QEMU agree, nothing is
    lost."""
    expected = {}
    with vm.running():
        active_commit_setup(vm, expected)
        with delete_paused_at(vm, tmp_path, "a", "delete:completing") as (proc, pause):
            job = vm.manifest()["operation"]["live"]["sda"]["job"]
            write_both(vm, 0x40, 2 * K64, 2 * K64)      # while the job mirrors
            ctl(vm, "block-job-cancel", {"device": job})
            assert wait_for(lambda: job_status(vm, job) == "pending"), job_status(vm, job)
            pause.unlink()
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"refused the pivot of job {job}" in err, err
        finished(vm, "a")
        write_both(vm, 0x50, 6 * K64, K64)
    check_stopped(vm, expected)


def test_a_job_paused_for_good_fails_the_delete_and_check_finishes_it(tmp_path, vm):
    """As above, but the job is not resumed: with SNAPFS_JOB_STALL=1 the
    delete fails (EIO, one line), the VM stays on its old chain and the
    intent stays; resumed, ``snapfs check`` finishes it."""
    expected = {}
    with vm.running():
        active_commit_setup(vm, expected)
        with delete_paused_at(vm, tmp_path, "a", "delete:completing",
                              env={"SNAPFS_JOB_STALL": "1"}) as (proc, pause):
            job = vm.manifest()["operation"]["live"]["sda"]["job"]
            pause_job(vm, job)
            write_both(vm, 0x40, 2 * K64, 2 * K64)
            tops = vm.tops()
            pause.unlink()
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        line = error_line(err)
        for words in (job, "no progress", "standby", "stays on its", "snapfs check"):
            assert words in line, (words, line)
        op = vm.manifest()["operation"]
        assert op["phase"] == "merge" and op["live"]["sda"]["step"] == "completing", op
        assert "a" not in snapshots(vm)
        assert vm.tops() == tops == leaves(vm)
        assert job_status(vm, job) == "standby"

        ctl(vm, "job-resume", {"id": job})
        r = cli(vm, "check", vm.store)
        assert r.returncode == 0 and "live delete" in r.stderr, r.stderr
        finished(vm, "a")
        write_both(vm, 0x50, 6 * K64, K64)
    check_stopped(vm, expected)


# -- 3. SIGKILL at each step of an intermediate commit ----------------------------

INTERMEDIATE_POINTS = (["delete:recorded"]
                       + ["delete:started", "delete:concluded", "delete:finalized"] * 2
                       + ["delete:switched", "delete:unlinked", "delete:unlinked"])


def x_under_y(vm, n, expected):
    """x (a large layer), y<n> (a small one, at offsets x's has not), a
    leaf above: deleting x commits y<n>'s layer into x's, not the leaf."""
    write_both(vm, 0x20 + n, 0, 4 * K64)
    snapfs("snapshot", "create", vm.store, "web", "x")
    write_both(vm, 0x40 + n, (4 + n) * K64, K64)
    take(vm, f"y{n}", expected)
    write_both(vm, 0x60 + n, (16 + n) * K64, K64)
    m = vm.manifest()
    return snapshots(vm)["x"]["volumes"], dict(m["active"])


def check_intermediate(vm, n, x_volumes, active):
    """x's volumes took y<n>'s place; the leaves are the ones before."""
    m = vm.manifest()
    assert m["operation"] is None
    assert snapshots(vm)[f"y{n}"]["volumes"] == x_volumes
    assert m["active"] == active
    disks = m["last_operation"]["disks"]
    assert {d: x["direction"] for d, x in disks.items()} == {d: "commit" for d in SIZES}


@pytest.mark.parametrize("qemu_gone", [False, True], ids=["qemu-runs", "qemu-gone"])
def test_kill_an_intermediate_commit_at_each_step(tmp_path, vm, qemu_gone):
    """A delete of x whose child y<n> is not the leaf, committed (y's layer
    is the smaller): its crash points listed first, then the delete killed
    at each in turn and recovered by ``snapfs check`` with QEMU running or
    SIGKILLed.  Each time: the intent gone, x's volumes in y<n>'s place,
    every view and the leaf as the model says, QEMU writing the manifest's
    leaves, no orphan file, qemu-img clean, bare backing names."""
    expected = {}
    with vm.running():
        write_both(vm, 0x10, 0, 4 * K64)
        take(vm, "keep", expected)
        x_volumes, active = x_under_y(vm, 0, expected)
        trace = tmp_path / "trace"
        r = cli(vm, "snapshot", "delete", vm.store, "web", "x",
                env={"SNAPFS_CRASH_TRACE": str(trace)})
        assert r.returncode == 0, r.stderr
        assert [x.split(" ", 1)[1] for x in trace.read_text().splitlines()] == \
            INTERMEDIATE_POINTS
        check_intermediate(vm, 0, x_volumes, active)
        assert vm.tops() == leaves(vm)
    check_stopped(vm, expected)
    for n, point in enumerate(INTERMEDIATE_POINTS, 1):
        with vm.running() as proc:
            x_volumes, active = x_under_y(vm, n, expected)
            trace = tmp_path / f"trace{n}"
            r = cli(vm, "snapshot", "delete", vm.store, "web", "x",
                    env={"SNAPFS_CRASH_AT": str(n), "SNAPFS_CRASH_TRACE": str(trace)})
            assert r.returncode == -signal.SIGKILL, (point, r)
            assert trace.read_text().splitlines()[-1] == f"{n} {point}"
            assert vm.manifest()["operation"]["op"] == "delete", point
            if not qemu_gone:
                r = cli(vm, "check", vm.store)
                assert r.returncode == 0 and "live delete" in r.stderr, (point, r.stderr)
                assert vm.tops() == leaves(vm), point
                write_both(vm, 0x80 + n, 26 * K64 + n * 4096, 4096)    # lands in the leaves
            else:
                # The leaf is not merged: QEMU writes it at every step.
                write_both(vm, 0x80 + n, 26 * K64 + n * 4096, 4096)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if qemu_gone:
            r = cli(vm, "check", vm.store)
            assert r.returncode == 0 and "delete" in r.stderr, (point, r.stderr)
        check_intermediate(vm, n, x_volumes, active)
        assert set(snapshots(vm)) == set(expected), point
        # The views on x's volumes (y<n>'s, the leaf's) and the one below;
        # the older ones were checked in their rounds, and their volumes
        # are not written since.
        snaps = snapshots(vm)
        for name in (f"y{n}", f"y{n - 1}"):
            for disk, vid in snaps[name]["volumes"].items():
                assert vm.view(vid) == expected[name][disk], (point, name, disk)
        for disk, vid in vm.manifest()["active"].items():
            assert vm.view(vid) == vm.model[disk], (point, disk)
        vm.check_volumes()
        check_bare_chains(vm)


# -- 4. a merge that keeps failing: the store is full ------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 32 MiB tmpfs, unmounted at the end whatever happened."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M,mode=0700", "snapfs-test",
                    str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def free_space(directory):
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def fill(path, leave=0):
    """A file at ``path`` that takes all the free space of its filesystem
    but ``leave`` bytes."""
    size = free_space(path.parent) - leave
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path


def test_a_merge_that_keeps_failing_leaves_its_intent(tmp_path, small_fs, run_dir):
    """The store's filesystem fills up once the delete is recorded: QEMU's
    commit fails with ENOSPC each time.  The delete, a later create and
    ``snapfs check`` fail with EIO naming it and change nothing, and a
    mount of the full store reads the views as taken; with space again,
    ``snapfs check`` finishes the delete."""
    store = small_fs / "store"
    snapfs("init", store)
    snapfs("vm", "add", store, "web", "--disk", "sda=4M", "--disk", "data=2M")
    vm = LiveVm(store, "web", tmp_path, SIZES)
    expected = {}
    with vm.running():
        write_both(vm, 0x10, 0, 2 * K64)
        take(vm, "keep", expected)
        write_both(vm, 0x20, 0, 8 * K64)
        snapfs("snapshot", "create", store, "web", "x")
        # y's layer: smaller than x's, at offsets x's has not, so that
        # committing it allocates clusters in x's volume.
        write_both(vm, 0x30, 16 * K64, 4 * K64)
        take(vm, "y", expected)
        write_both(vm, 0x40, 24 * K64, K64)

        with delete_paused_at(vm, tmp_path, "x", "delete:recorded") as (proc, pause):
            # Room for the intent's next step, not for the merge.
            filler = fill(small_fs / "filler", leave=16 << 10)
            pause.unlink()
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        line = error_line(err)
        assert "No space left on device" in line and "snapfs check" in line, line
        job = vm.manifest()["operation"]["live"]["sda"]["job"]
        assert job in line, line
        # The space QEMU's failed writes left goes too: the store is full,
        # and what follows must not need to write.
        rest = fill(small_fs / "rest")
        assert free_space(small_fs) == 0
        intent = (vm.dir / "manifest.json").read_bytes()
        files = sorted(os.listdir(vm.dir))

        def unchanged():
            assert (vm.dir / "manifest.json").read_bytes() == intent
            assert sorted(os.listdir(vm.dir)) == files
            assert vm.tops() == leaves(vm)

        r = cli(vm, "snapshot", "create", store, "web", "z")
        assert r.returncode == 1, r
        line = error_line(r.stderr)
        assert job in line and "No space left on device" in line, line
        unchanged()
        r = cli(vm, "check", store)
        assert r.returncode == 1, r
        assert "recovery deferred" in r.stderr and "No space left on device" in r.stderr, r
        assert "operation is recorded as in progress" in r.stdout, r.stdout
        unchanged()
        with mounted(store, tmp_path / "mnt") as mnt:
            snaps = mnt / "web" / "snapshots"
            assert sorted(os.listdir(snaps)) == ["keep", "latest", "y"]
            for name in ("keep", "y"):
                for disk in SIZES:
                    try:
                        data = (snaps / name / f"{disk}.raw").read_bytes()
                    except OSError as e:         # EIO is allowed, wrong bytes are not
                        assert e.errno == errno.EIO, (name, disk, e)
                        continue
                    assert data == expected[name][disk], (name, disk)
        unchanged()

        filler.unlink()
        rest.unlink()
        r = cli(vm, "check", store)
        assert r.returncode == 0 and "live delete" in r.stderr, r.stderr
        finished(vm, "x")
        write_both(vm, 0x50, 28 * K64, K64)
    check_stopped(vm, expected)
    check_bare_chains(vm)
