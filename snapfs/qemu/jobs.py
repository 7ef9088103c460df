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

A pivot that fails (job-complete refused, the job falls back to standby
or aborts) leaves the VM on its old chain with nothing lost: the pivot is
asked again, an aborted job is started again, a few times (VDSM retries
too), then ``drive`` raises and the intent stays for the next operation.
"""

import time

from ..errors import QemuError

POLL = 0.05            # seconds between two looks at the job list
PIVOT_RETRIES = 3      # job-complete asked this often before giving up
START_RETRIES = 3      # a job that failed is started again this often
RETRY_PAUSE = 0.5      # seconds between two attempts


def jobs(qmp):
    return {j["id"]: j for j in qmp.execute("query-jobs")}


def drive(qmp, merge, persist, step, progress=None):
    """Take ``merge``'s job from where QEMU has it to its end (QEMU's graph
    switched, the job dismissed).  ``step`` is the last step the manifest
    recorded; ``persist(step)`` records the next one before it is taken.
    ``progress(done, total)`` gets QEMU's job progress.  Raises QemuError
    (EIO) after repeated failures, QemuTimeout (EBUSY) if QEMU stops
    answering; either way the VM stays on a chain that reads the same."""
    pivots = starts = 0
    error = None
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
            continue
        status = job["status"]
        if progress and job.get("total-progress"):
            progress(job["current-progress"], job["total-progress"])
        if status == "ready":
            if step not in ("ready", "completing"):
                step = "ready"
                persist(step)
            if pivots >= PIVOT_RETRIES:
                raise QemuError(f"QEMU at {qmp.path}: the pivot of job {merge.id} failed "
                                f"{pivots} times; the VM stays on its old chain, nothing is "
                                f"lost, and the next operation (or 'snapfs check') tries again")
            step = "completing"
            persist(step)
            pivots += 1
            try:
                qmp.execute("job-complete", {"id": merge.id})
            except QemuError:
                # Refused (the job flapped to standby, or is not in sync
                # after all): still mirroring, on the old chain.
                time.sleep(RETRY_PAUSE)
            continue
        if status == "pending":
            step = "concluded"
            persist(step)
            qmp.execute("job-finalize", {"id": merge.id})
            continue
        if status == "concluded":
            if job.get("error"):
                # Aborted before any graph change: the old chain stands.
                error = job["error"]
                qmp.execute("job-dismiss", {"id": merge.id})
                step = "failed"
                continue
            step = "finalized"
            persist(step)
            qmp.execute("job-dismiss", {"id": merge.id})
            return
        time.sleep(POLL)   # created, running, standby, paused, waiting, aborting
