"""Following a live merge's job in QEMU to its end (``drive``), one disk at
a time; ``merge.py`` says what the jobs are and starts them.

``drive`` takes a job from wherever it is to its end and calls
``persist(step)`` before each step it takes, so that the manifest says how
far QEMU got:

    started     before block-commit / block-stream
    ready       an active commit went ready (QEMU's copy is in sync)
    completing  before job-complete (the pivot is asked)
    concluded   the job's work is done (QEMU status "pending"), before
                job-finalize, which switches QEMU's graph
    finalized   QEMU changed its graph (status "concluded"), before
                job-dismiss
    failed      a job recorded as concluded ended without changing QEMU's
                graph (it failed, or was cancelled: no pivot); before
                job-dismiss, then it is started again

A pivot that fails leaves the VM on its old chain with nothing lost.
QEMU takes job-complete while the job stands by (paused) and pivots when
it runs again: that is waited for.  A job-complete refused while the job
is ready is asked again a few times (VDSM retries too); one refused
because the job left "ready" is not counted: what the job does next
decides (a job back in "ready" is asked again).  A job that aborts, or
ends without switching QEMU's graph (a ready job cancelled, as ``virsh
blockjob --abort`` does, completes without a pivot), is started again a
few times.  Then ``drive`` raises and the intent stays for the next
operation.

A job that stops moving (paused or standing by in QEMU, or running
without progress) is waited for at most ``$SNAPFS_JOB_STALL`` seconds
(60 by default) after its status or progress last changed; then
``drive`` raises QemuError (EIO) naming the job and its status.  QEMU
keeps the job, the VM stays on its chain, and the next operation (or
``snapfs check``) follows the job again.
"""

import logging
import os
import time

from ..errors import QemuError

log = logging.getLogger(__name__)

POLL = 0.05            # seconds between two looks at the job list
PIVOT_RETRIES = 3      # job-complete refused this often before giving up
START_RETRIES = 3      # a job that failed is started again this often
RETRY_PAUSE = 0.5      # seconds between two attempts
STALL_ENV = "SNAPFS_JOB_STALL"
DEFAULT_STALL = 60.0   # seconds a job may go without progress


def job_stall():
    """Seconds a job may go without progress: ``$SNAPFS_JOB_STALL`` or 60
    (the tests make it short)."""
    value = os.environ.get(STALL_ENV)
    try:
        return max(0.1, float(value)) if value else DEFAULT_STALL
    except ValueError:
        return DEFAULT_STALL


def jobs(qmp):
    return {j["id"]: j for j in qmp.execute("query-jobs")}


def drive(qmp, merge, persist, step, progress=None, stall=None):
    """Take ``merge``'s job from where QEMU has it to its end (QEMU's graph
    switched, the job dismissed).  ``step`` is the last step the manifest
    recorded; ``persist(step)`` records the next one before it is taken.
    ``progress(done, total)`` gets QEMU's job progress.  Raises QemuError
    (EIO) after repeated failures or when the job makes no progress for
    ``stall`` seconds (``job_stall()``), QemuTimeout (EBUSY) if QEMU stops
    answering; either way the VM stays on a chain that reads the same."""
    stall = job_stall() if stall is None else stall
    pivots = starts = 0
    error = None
    asked = False          # job-complete accepted: the job pivots by itself
    seen, since = None, time.monotonic()
    while True:
        job = jobs(qmp).get(merge.id)
        if job is None:
            if merge.done_in_qemu(qmp):
                return
            if starts >= START_RETRIES:
                raise QemuError(f"QEMU at {qmp.path}: the merge job {merge.id} failed "
                                f"{starts} times ({error}); the VM stays on its chain, and the next "
                                f"operation (or 'snapfs check') tries again")
            if starts:
                time.sleep(RETRY_PAUSE)
            starts += 1
            step = "started"
            persist(step)
            merge.start(qmp)
            asked, seen = False, None
            continue
        status = job["status"]
        if (status, job.get("current-progress")) != seen:
            seen, since = (status, job.get("current-progress")), time.monotonic()
        if progress and job.get("total-progress"):
            progress(job["current-progress"], job["total-progress"])
        if status == "ready" and not asked:
            if step not in ("ready", "completing"):
                step = "ready"
                persist(step)
            if pivots >= PIVOT_RETRIES:
                raise QemuError(f"QEMU at {qmp.path}: the pivot of job {merge.id} failed "
                                f"{pivots} times; the VM stays on its old chain, nothing is "
                                f"lost, and the next operation (or 'snapfs check') tries again")
            step = "completing"
            persist(step)
            try:
                qmp.execute("job-complete", {"id": merge.id})
                asked, since = True, time.monotonic()
            except QemuError as e:
                now = jobs(qmp).get(merge.id, {}).get("status")
                log.warning("QEMU at %s refused the pivot of job %s (now %s): %s; the VM stays "
                            "on its old chain, and the pivot is asked again", qmp.path,
                            merge.id, now, e)
                if now == "ready":
                    # Refused while in sync: a failed pivot, retried a few times.
                    pivots += 1
                    time.sleep(RETRY_PAUSE)
                # Else it left "ready" (cancelled, aborting): what it does
                # next decides, as long as it moves (the stall limit below).
            continue
        if status == "pending":
            step = "concluded"
            persist(step)
            qmp.execute("job-finalize", {"id": merge.id})
            continue
        if status == "concluded":
            if job.get("error") or not merge.done_in_qemu(qmp):
                # Aborted, or ended without switching QEMU's graph (a ready
                # job cancelled, as 'virsh blockjob --abort' does, completes
                # without a pivot): the old chain stands, and is written.
                error = job.get("error") or "it ended without switching QEMU's graph"
                if step in ("concluded", "finalized"):
                    # No longer "done in QEMU": recovery must not take the
                    # merged-into volume for the one written (finish._IN_B).
                    step = "failed"
                    persist(step)
                qmp.execute("job-dismiss", {"id": merge.id})
                step = "failed"
                continue
            step = "finalized"
            persist(step)
            qmp.execute("job-dismiss", {"id": merge.id})
            return
        # created, running, standby, paused, waiting, aborting; or ready
        # with the pivot asked.
        if time.monotonic() - since > stall:
            hint = ": paused in QEMU, 'job-resume' lets it go on" \
                if status in ("paused", "standby") else ""
            raise QemuError(f"QEMU at {qmp.path}: the merge job {merge.id} made no progress for "
                            f"{stall:g} s (status {status}{hint}); the VM stays on its chain, "
                            f"nothing is lost, and the next operation (or 'snapfs check') "
                            f"tries again")
        time.sleep(POLL)
