"""Kill every snapshot operation at each of its crash points; prove that
recovery loses nothing.

For each operation the suite first runs it once with ``SNAPFS_CRASH_TRACE``
to learn its crash points (K of them).  Then, for N = 1..K, on a fresh copy
of the pristine store, it runs the operation with ``SNAPFS_CRASH_AT=N`` (the
process SIGKILLs itself there) and checks that:

- right after the kill, no qcow2 file in the VM directory is corrupt
  (``qemu-img check`` of each file alone: leaks allowed, corruption never);
- ``snapfs check`` (which recovers) reports nothing but leaked clusters,
  and ``snapfs check --repair`` then exits 0 and leaves exactly the
  manifest and the volumes it lists, each clean for qemu-img;
- the VM is in the state before the operation if the kill came before its
  point of no return, else in the state after it (delete always rolls
  forward once recorded; create/preview roll back until the final switch;
  commit/undo roll forward).  "State" is every snapshot's and the active
  bytes of every disk as QEMU reads them (``qemu-img convert`` of the
  volume the manifest names), so every snapshot that was not deleted reads
  byte for byte as before, and a delete recorded the intended direction;
- a rolled-back operation can be run again to completion, and the store
  then passes ``snapfs check``.

The qcow2 writer's internal ordering points are crash points too
(``write:*``, see snapfs/store/writers.py), so kills also
land inside a write batch.  ``test_crash_during_recovery`` kills recovery
itself at each of its crash points and recovers again.

The VM has two disks, imported from qcow2 chains built with qemu-img and
qemu-io: snapshots s0..s3 and the active top, with data that differs per
layer and per disk; a second VM sits on raw bases.  The layer sizes are
chosen so that each delete takes a known merge direction on each disk (the
merge picks whichever moves fewer bytes), and the suite asserts that
direction really happened.

``SNAPFS_CRASH_JOBS`` sets how many kills run at once (default: the CPUs,
at most 4).
"""

import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.crash.harness import (
    KiB, MiB, RECOVERY_LINES, RESULTS, VM, OpCase, Outcome, build_qcow2_chain,
    check_clean, check_no_corruption, copy_store, crash_run, manifest, merge_phase, ok,
    run_snapfs, state_differences, trace_run, vm_dir, vm_state)
from tests.support import qemu

# -- the fixture VM -----------------------------------------------------------------
#
# Layers are s0, s1, s2, s3 (snapshots, oldest first) and top (active).
# Deleting snapshot X merges X's volume B with its child C: "commit" copies
# C's own clusters into B (moves |C|), "stream" copies into C what of B it
# does not override (moves |B - C|); the smaller wins, ties go to commit.
#
#   delete  disk  B own                C own                  commit  stream  =>
#   s0      sda   3M                   128K (+64K zero)       128K    2.8M    commit
#   s0      sdb   128K @3.5M           256K (+64K zero @3.5M) 256K    64K     stream
#   s1      sda   128K (+zero)         2M @2M                 2M      128K    stream
#   s1      sdb   256K (+zero)         2M @1M                 2M      256K    stream
#   s2      sda   2M @2M               64K @512K              64K     2M      commit
#   s2      sdb   2M @1M               128K (+64K zero @1M)   128K    1.9M    commit
#   s3      sda   64K @512K            1M @1.5M (active)      1M      64K     stream
#   s3      sdb   128K (+zero)         64K @512K (active)     64K     128K    commit

LAYERS = ["s0.qcow2", "s1.qcow2", "s2.qcow2", "s3.qcow2", "top.qcow2"]
LAYOUT = {
    "sda": [
        [("write", 0, 3 * MiB, 0x10)],
        [("write", 1 * MiB, 128 * KiB, 0x11), ("zero", 2 * MiB, 64 * KiB)],
        [("write", 2 * MiB, 2 * MiB, 0x12)],
        [("write", 512 * KiB, 64 * KiB, 0x13)],
        [("write", 1536 * KiB, 1 * MiB, 0x14)],
    ],
    "sdb": [
        [("write", 3584 * KiB, 128 * KiB, 0x20)],
        [("write", 0, 256 * KiB, 0x21), ("zero", 3584 * KiB, 64 * KiB)],
        [("write", 1 * MiB, 2 * MiB, 0x22)],
        [("write", 3 * MiB, 128 * KiB, 0x23), ("zero", 1 * MiB, 64 * KiB)],
        [("write", 512 * KiB, 64 * KiB, 0x24)],
    ],
}

# A second VM whose disks sit on raw bases (r0): on sda the raw base is big
# and its child small (commit into the raw file), on sdb the opposite
# (stream out of the raw file into the qcow2 child).
RAW_LAYERS = ["r0.raw", "r1.qcow2", "top.qcow2"]
RAW_LAYOUT = {
    "sda": [
        [("write", 0, 3 * MiB, 0x30)],
        [("write", 1 * MiB, 64 * KiB, 0x31), ("zero", 2 * MiB, 64 * KiB)],
        [("write", 3584 * KiB, 64 * KiB, 0x32)],
    ],
    "sdb": [
        [("write", 0, 64 * KiB, 0x40)],
        [("write", 1 * MiB, 2 * MiB, 0x41)],
        [("write", 3584 * KiB, 64 * KiB, 0x42)],
    ],
}

# Written into the preview's overlays (store "preview": s1 is previewed),
# so that commit keeps bytes no snapshot has.
PREVIEWED = "s1"
PREVIEW_WRITES = {"sda": "write -q -P 0x15 3M 64k", "sdb": "write -q -P 0x25 2M 64k"}


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """{"main", "preview", "raw"}: stores never touched by a test."""
    base = tmp_path_factory.mktemp("crash-pristine")
    stores = {}

    main = base / "main"
    tops = {disk: build_qcow2_chain(base / f"img-{disk}", LAYERS, layers)
            for disk, layers in LAYOUT.items()}
    ok(run_snapfs("init", main))
    ok(run_snapfs("vm", "add", main, VM, *[a for d, t in tops.items() for a in ("--disk", f"{d}={t}")]))
    stores["main"] = main

    preview = copy_store(main, base / "preview")
    ok(run_snapfs("snapshot", "preview", preview, VM, PREVIEWED))
    m = manifest(preview)
    for disk, command in PREVIEW_WRITES.items():
        qemu.qemu_io(vm_dir(preview) / m["active"][disk], command, fmt="qcow2")
    stores["preview"] = preview

    raw = base / "raw"
    tops = {disk: build_qcow2_chain(base / f"raw-{disk}", RAW_LAYERS, layers, base_raw=True)
            for disk, layers in RAW_LAYOUT.items()}
    ok(run_snapfs("init", raw))
    ok(run_snapfs("vm", "add", raw, VM, *[a for d, t in tops.items() for a in ("--disk", f"{d}={t}")]))
    stores["raw"] = raw

    for store in stores.values():
        ok(run_snapfs("check", store))
        check_clean(store)
    return stores


@pytest.fixture(scope="session")
def before(pristine):
    """The observable state of each pristine store."""
    states = {name: vm_state(store) for name, store in pristine.items()}
    # The fixture is what it claims: every snapshot and disk reads differently.
    for name, state in states.items():
        views = [h for _, v in state["snapshots"] for h in v.values()] + list(state["active"].values())
        assert len(set(views)) == len(views), f"{name}: two views read the same: {state}"
    assert [s[0] for s in states["main"]["snapshots"]] == ["s0", "s1", "s2", "s3"]
    assert [s[0] for s in states["raw"]["snapshots"]] == ["r0", "r1"]
    assert states["preview"]["preview"]["snapshot"] == PREVIEWED
    return states


# -- the operations ------------------------------------------------------------------

def _snapshot_views(state, name):
    return dict(next(v for n, v in state["snapshots"] if n == name))


def after_create(name):
    return lambda b: {**b, "snapshots": b["snapshots"] + [[name, dict(b["active"])]]}


def after_rename(old, new):
    return lambda b: {**b, "snapshots": [[new if n == old else n, v] for n, v in b["snapshots"]]}


def after_delete(name):
    return lambda b: {**b, "snapshots": [s for s in b["snapshots"] if s[0] != name]}


def after_preview(name):
    return lambda b: {**b, "active": _snapshot_views(b, name),
                      "preview": {"snapshot": name, "before": dict(b["active"])}}


def after_commit(b):
    names = [n for n, _ in b["snapshots"]]
    keep = names.index(b["preview"]["snapshot"]) + 1
    return {**b, "snapshots": b["snapshots"][:keep], "preview": None}


def after_undo(b):
    return {**b, "active": dict(b["preview"]["before"]), "preview": None}


# Besides the delete:* points of a delete, every ordering
# point inside the qcow2 writer's batches (write:refcounts, write:data,
# write:l2, write:free) is a crash point too, where leaks are expected.
CASES = [
    OpCase("create", "main", "create", ("fresh",), after_create("fresh"), "create:done"),
    OpCase("delete-commit", "main", "delete", ("s2",), after_delete("s2"), "delete:recorded",
           {"sda": "commit", "sdb": "commit"}),
    OpCase("delete-stream", "main", "delete", ("s1",), after_delete("s1"), "delete:recorded",
           {"sda": "stream", "sdb": "stream"}),
    OpCase("delete-oldest", "main", "delete", ("s0",), after_delete("s0"), "delete:recorded",
           {"sda": "commit", "sdb": "stream"}),
    OpCase("delete-newest", "main", "delete", ("s3",), after_delete("s3"), "delete:recorded",
           {"sda": "stream", "sdb": "commit"}),
    OpCase("delete-raw-base", "raw", "delete", ("r0",), after_delete("r0"), "delete:recorded",
           {"sda": "commit", "sdb": "stream"}),
    # One manifest write: either name is fine, whenever the kill comes.
    OpCase("rename", "main", "rename", ("s1", "renamed"), after_rename("s1", "renamed"), None),
    OpCase("preview", "main", "preview", ("s2",), after_preview("s2"), "preview:done"),
    OpCase("commit", "preview", "commit", (), after_commit, "commit:switched"),
    OpCase("undo", "preview", "undo", (), after_undo, "undo:switched"),
]


def _check_directions(case, m, stdout=None):
    record = m["last_operation"]
    assert record and record.get("op") == "delete", f"last_operation is {record}"
    got = {disk: r["direction"] for disk, r in record["disks"].items()}
    assert got == case.directions, f"merge directions {got}, expected {case.directions}"
    if stdout is not None:
        for disk, direction in case.directions.items():
            assert f"{disk}: {direction}" in stdout, stdout


def _assert_state(store, want, what):
    got = vm_state(store)
    diffs = state_differences(got, want)
    assert not diffs, f"{what}:\n  " + "\n  ".join(diffs)


def _expected(case, points, n, before_state, after_state):
    """(state, "before"/"after"/None) the VM must be in after a kill at n."""
    if case.point_of_no_return is None:
        return None, None
    last = points.index(case.point_of_no_return) + 1
    return (after_state, "after") if n >= last else (before_state, "before")


def exercise(case, n, points, pristine_store, before_state, after_state, workdir):
    """Kill ``case`` at crash point ``n`` on a fresh copy; verify recovery.
    Returns what happened: {"which": "before"|"after", "leaky": files}."""
    store = copy_store(pristine_store, workdir / "store")
    crash_run(case.cli(store), n)
    want, which = _expected(case, points, n, before_state, after_state)
    done = verify_recovery(case, store, want, which, before_state, after_state)
    shutil.rmtree(workdir)
    return done


def verify_recovery(case, store, want, which, before_state, after_state):
    """Everything that must hold of ``store`` after ``case`` was killed:
    ``want`` is the state recovery must reach, named ``which`` (None:
    either).  Returns {"which": ..., "leaky": files with leaks at first}."""
    # Before any repair: nothing is corrupt (leaks are allowed for now).
    leaky = check_no_corruption(vm_dir(store))

    # Recovery, then the repair of leftovers.
    first = run_snapfs("check", store)
    assert "Traceback" not in first.stderr, first.stderr
    # Recovery alone finishes or undoes everything the operation recorded:
    # the only thing it may leave for --repair is leaked clusters.
    left = [line for line in first.stdout.splitlines()
            if not line.startswith("ok:") and "leaked cluster" not in line]
    assert not left, "after recovery, snapfs check reports:\n" + "\n".join(left)
    ok(run_snapfs("check", "--repair", store), "snapfs check --repair")
    m = check_clean(store)

    # Before or after, and nothing else.
    got = vm_state(store)
    if which is None:
        which = "after" if not state_differences(got, after_state) else "before"
        want = after_state if which == "after" else before_state
    diffs = state_differences(got, want)
    assert not diffs, (f"not in the {which} state after recovery "
                       f"(first check said: {first.stdout.strip()} {first.stderr.strip()}):\n  "
                       + "\n  ".join(diffs))
    if which == "after":
        if case.directions:
            _check_directions(case, m)
    else:
        # The operation can be run again, to completion.
        result = ok(run_snapfs(*case.cli(store)), f"re-running {case.op} after recovery")
        m = check_clean(store)
        _assert_state(store, after_state, f"re-run {case.op} after a rollback")
        if case.directions:
            _check_directions(case, m, result.stdout)
        ok(run_snapfs("check", store), "snapfs check after the re-run")
    return {"which": which, "leaky": len(leaky),
            "leaks_seen_by_snapfs": sum("leaked cluster" in line
                                        for line in first.stdout.splitlines())}


# Kills run in parallel: each works on its own copy of the store.
JOBS = int(os.environ.get("SNAPFS_CRASH_JOBS") or min(4, os.cpu_count() or 2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_crash_at_every_point(case, pristine, before, tmp_path):
    before_state = before[case.store]
    after_state = case.predict(before_state)

    # The uninterrupted run: its crash points, and the state it reaches.
    reference = copy_store(pristine[case.store], tmp_path / "reference")
    result, points = trace_run(case.cli(reference), tmp_path)
    ok(result, f"snapfs snapshot {case.op} (uninterrupted)")
    m = check_clean(reference)
    ok(run_snapfs("check", reference), "snapfs check after the uninterrupted run")
    _assert_state(reference, after_state, f"{case.id}: the uninterrupted run")
    if case.directions:
        _check_directions(case, m, result.stdout)
    if case.point_of_no_return is not None and points:
        assert case.point_of_no_return in points, points
    shutil.rmtree(reference)

    outcome = Outcome(case.id, points)
    disks = manifest(pristine[case.store])["disks"]     # merges run in this order
    failures = []
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {n: pool.submit(exercise, case, n, points, pristine[case.store], before_state,
                                  after_state, tmp_path / f"n{n}")
                   for n in range(1, len(points) + 1)}
        for n, future in futures.items():
            try:
                done = future.result()
            except AssertionError as e:
                failures.append(f"{case.id} N={n}/{len(points)} (killed at {points[n - 1]}): {e}")
                continue
            if done["which"] == "after":
                outcome.rolled_forward += 1
            else:
                outcome.rolled_back += 1
            outcome.leaky_before_repair += done["leaky"]
            outcome.leaky_for_snapfs += done["leaks_seen_by_snapfs"]
            if case.directions:
                direction = merge_phase(points, n, disks, case.directions)
                if direction:
                    outcome.merge_points[direction] += 1
    RESULTS[case.id] = outcome
    print(outcome.line())
    assert not failures, f"{len(failures)} of {len(points)} crash points failed:\n\n" + "\n\n".join(failures)
    assert len(points) > 0, (f"{case.id}: 'snapfs snapshot {case.op}' reaches no crash point, "
                             f"so no kill of it can be exercised")


# (case, the crash point of the first kill): recovery itself is then
# killed at each of its own crash points, and recovered again.
DOUBLE_FAULTS = [
    ("delete-oldest", "delete:recorded"),    # recovery does both merges, commit and stream
    ("create", "create:overlay"),           # recovery rolls back: unlinks the overlays
]


@pytest.mark.parametrize("case_id,first_point", DOUBLE_FAULTS,
                         ids=[f"{c}@{p}" for c, p in DOUBLE_FAULTS])
def test_crash_during_recovery(case_id, first_point, pristine, before, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    before_state = before[case.store]
    after_state = case.predict(before_state)
    _, points = trace_run(case.cli(copy_store(pristine[case.store], tmp_path / "reference")),
                          tmp_path)
    n = len(points) - points[::-1].index(first_point)      # its last occurrence
    want, which = _expected(case, points, n, before_state, after_state)
    crashed = copy_store(pristine[case.store], tmp_path / "crashed")
    crash_run(case.cli(crashed), n)

    # The crash points recovery reaches (snapfs check recovers first).
    result, recovery_points = trace_run(("check", copy_store(crashed, tmp_path / "traced")), tmp_path)
    ok(result, "snapfs check (uninterrupted recovery)")
    assert recovery_points, f"recovery after a kill at {first_point} reaches no crash point"

    def kill_recovery(m):
        store = copy_store(crashed, tmp_path / f"m{m}" / "store")
        crash_run(("check", store), m)
        done = verify_recovery(case, store, want, which, before_state, after_state)
        shutil.rmtree(tmp_path / f"m{m}")
        return done

    failures = []
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {m: pool.submit(kill_recovery, m) for m in range(1, len(recovery_points) + 1)}
        for m, future in futures.items():
            try:
                future.result()
            except AssertionError as e:
                failures.append(f"{case.id} killed at N={n} ({first_point}), recovery killed at "
                                f"M={m}/{len(recovery_points)} ({recovery_points[m - 1]}): {e}")
    names = ", ".join(f"{k} x{v}" for k, v in Counter(recovery_points).items())
    line = (f"crash-suite {case.id}, recovery after a kill at {first_point}: "
            f"{len(recovery_points)} crash points exercised ({names})")
    RECOVERY_LINES.append(line)
    print(line)
    assert not failures, "\n\n".join(failures)


def test_delete_exercised_both_directions(request):
    """Runs after the cases above: kills landed inside merges of both kinds."""
    selected = {item.callspec.id for item in request.session.items
                if item.originalname == "test_crash_at_every_point"}
    expected = [c.id for c in CASES if c.op == "delete" and c.id in selected]
    if not expected:
        pytest.skip("no delete case selected in this run")
    deletes = {cid: o for cid, o in RESULTS.items() if cid.startswith("delete")}
    assert sorted(deletes) == sorted(expected), (
        f"delete cases whose crash runs took place: {sorted(deletes)}; expected {expected}")
    total = Counter()
    for o in deletes.values():
        total.update(o.merge_points)
    print(f"crash-suite delete: crash points inside merges: {dict(total)}")
    assert total["commit"] > 0 and total["stream"] > 0, dict(total)
