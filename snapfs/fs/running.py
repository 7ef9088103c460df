"""Running a VM's snapshot operations for the mount: one at a time, in the
order asked (fs/queue.py), with refusals logged and kept for
control/status.  ``Vfs`` is an ``OperationRunner``: these methods use its
store, listings and tree (``_refresh_vm``, ``_flush_page_caches``)."""

import errno
import logging
import threading

from ..errors import ReadOnly, SnapfsError
from ..ops.finish import utc_now
from ..ops.operations import VmOperations
from ..qemu.attach import read_record
from .queue import Job, Projection, refuse_queued
from .uses import MountUsers

log = logging.getLogger(__name__)

# Guards OperationRunner._background (threads finishing operations after
# their request).
_BACKGROUND = threading.Lock()


class OperationRunner:
    """Mixed into Vfs, which sets ``_background = []``."""

    # -- running operations ----------------------------------------------------

    # Each VM runs one operation at a time, in the order asked (fs/queue.py):
    # a request either waits for its turn (_run: control files, the close of
    # a touch) or, holding the snapshots directory's lock in the kernel,
    # runs at once on an idle VM and is queued on a busy one (_run_or_queue:
    # mkdir, rmdir, mv).  Whoever holds the VM runs the queued operations
    # that head the queue before letting it go (_let_go, _drain).

    def _run(self, vm, op, action, snapshot=None, then=None, asked_by=None, target=None):
        """Run ``action(VmOperations)`` as the VM's one operation, once
        every operation asked before it has run: it waits for a merge
        instead of failing (DESIGN.md section 1).  Refusals are logged and
        kept for control/status.  With ``then``, the rest of the operation,
        ``then(ops, result)``, goes on in a background thread that keeps
        holding the VM until it is done.  ``target``: what the operation
        makes (a clone: the new VM), for control/status."""
        if self.read_only:
            self._refused(vm, op, ReadOnly("the mount is read-only (-o ro)"))
        vm.queue.wait_turn(Job(op, snapshot, target=target, asked_by=asked_by))
        return self._run_held(vm, op, action, snapshot, then, target)

    def _run_or_queue(self, vm, job, action, then=None, after=None):
        """mkdir, rmdir, mv: run ``action`` (and ``then``) as ``_run`` does
        if the VM is idle.  Else refuse now what the queue says will fail
        (EEXIST, ENOENT, EBUSY...), and queue the rest: it runs in the
        thread that holds the VM when its turn comes, and ``after()``
        then, whatever the outcome.  True if queued."""
        if self.read_only:
            self._refused(vm, job.op, ReadOnly("the mount is read-only (-o ro)"))

        def run():
            try:
                self._run_queued(vm, job, action, then)
            finally:
                if after is not None:
                    after()

        job.run = run

        def check(jobs):
            refuse_queued(job, Projection(vm.manifest, jobs), vm,
                          lambda vid: self.store.volume_path(vm.name, vid),
                          attached=read_record(self.store.path, vm.name) is not None)

        try:
            idle = vm.queue.offer(job, check)
        except SnapfsError as e:
            self._refused(vm, job.op, e)
        if idle:
            self._run_held(vm, job.op, action, job.snapshot, then)
            return False
        log.info("%s %s on VM %s: queued behind %s", job.asked_by, job.snapshot, vm.name,
                 (vm.running or {}).get("op", "an operation"))
        return True

    def _run_held(self, vm, op, action, snapshot, then, target=None):
        """``_run`` once the VM is held by this request."""
        continuing = False
        try:
            ops, users, result = self._step(vm, op, snapshot, action, then is not None, target)
            if then is not None:
                self._spawn(f"snapfs-{op}-{vm.name}", self._continue,
                            vm, op, ops, then, result, users)
                continuing = True
            return result
        finally:
            if not continuing:
                self._let_go(vm)

    def _step(self, vm, op, snapshot, action, continues, target=None):
        """Run ``action`` for the job holding the VM; returns (ops, users,
        result).  Refusals are logged, kept and raised.  What it claimed
        stays claimed if the operation ``continues``."""
        users = MountUsers(vm, writing=lambda vids: self._writing(vm, vids))
        running = {"op": op, "snapshot": snapshot, "started": utc_now(), "progress": None}
        if target is not None:
            running["to"] = target
        vm.running = running

        def progress(done, total):
            running["progress"] = {"done": done, "total": total}

        # Every manifest switch is followed at once, while the operation
        # still holds the disks it changed (MountUsers.hold): files it
        # dropped are deleted only afterwards, and writes waiting for a
        # disk land in its new leaf.
        ops = VmOperations(self.store, vm.name, progress=progress,
                           on_saved=lambda m: self._refresh_vm(vm, m), users=users)
        failed = True
        try:
            result = action(ops)
            failed = False
        except SnapfsError as e:
            self._refused(vm, op, e)
        finally:
            self._refresh_vm(vm)
            if failed or not continues:
                users.release_claims()
            self._flush_page_caches(vm)
        return ops, users, result

    def _continue(self, vm, op, ops, then, result, users):
        """A background thread: the rest of an operation, then the queued
        operations that head the queue; then the VM is let go."""
        try:
            self._finish(vm, op, ops, then, result, users)
        finally:
            self._drain(vm)

    def _finish(self, vm, op, ops, then, result, users):
        """``then(ops, result)``; False if it failed (logged and kept)."""
        try:
            try:
                then(ops, result)
            finally:
                self._refresh_vm(vm)
        except SnapfsError as e:
            self._failed(vm, op, e)
            log.error("%s on VM %s failed: %s (it resumes with the next operation)",
                      op, vm.name, e)
            return False
        except Exception as e:
            self._failed(vm, op, e)
            log.exception("%s on VM %s failed", op, vm.name)
            return False
        finally:
            users.release_claims()
            self._flush_page_caches(vm)
        return True

    def _run_queued(self, vm, job, action, then):
        """A queued job's turn, in the thread that holds the VM: the whole
        operation (a delete's merge too).  Its request was answered long
        ago, so a failure is logged and kept for control/status."""
        log.info("%s %s on VM %s: running (queued at %s)", job.asked_by, job.snapshot,
                 vm.name, job.asked)
        try:
            ops, users, result = self._step(vm, job.op, job.snapshot, action, then is not None)
            done = then is None or self._finish(vm, job.op, ops, then, result, users)
        except SnapfsError:
            done = False                    # _refused logged and kept it
        except Exception as e:
            self._failed(vm, job.op, e)
            log.exception("%s on VM %s failed", job.op, vm.name)
            done = False
        if not done and vm.last_error is not None:
            # A new dict: control/status may be serialising the old one.
            vm.last_error = dict(vm.last_error, asked_by=job.asked_by)
            log.error("%s %s on VM %s (queued) failed: %s", job.asked_by, job.snapshot,
                      vm.name, vm.last_error["error"])

    def _let_go(self, vm):
        """A request's operation is done.  A queued job that heads the queue
        runs next, in a thread of its own (the request is answered
        meanwhile); else the VM is let go to whoever waits first."""
        vm.running = None
        job = vm.queue.hand_over()
        if job is None:
            return
        try:
            self._spawn(f"snapfs-queue-{vm.name}", self._drain, vm, job)
        except RuntimeError as e:
            # No thread to be had: run the queue here rather than leave the
            # VM held by a job nobody runs.
            log.error("VM %s: no thread for its queue (%s): running it in the request", vm.name, e)
            self._drain(vm, job)

    def _drain(self, vm, job=None):
        """This thread holds the VM: run ``job``, and every queued job that
        heads the queue after it, then let the VM go."""
        while True:
            if job is not None:
                job.run()
            vm.running = None
            job = vm.queue.hand_over()
            if job is None:
                return

    def _spawn(self, name, target, *args):
        """A background thread that ``close`` waits for."""
        def run():
            try:
                target(*args)
            finally:
                with _BACKGROUND:
                    self._background.remove(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with _BACKGROUND:
            self._background.append(thread)
        try:
            thread.start()
        except BaseException:
            with _BACKGROUND:
                self._background.remove(thread)
            raise

    def _failed(self, vm, op, error):
        vm.last_error = {"op": op, "error": str(error),
                         "errno": getattr(error, "errno", None) or errno.EIO, "time": utc_now()}

    def _writing(self, vm, volume_ids):
        """An operation is about to write these volumes: read their maps
        first, so that chains opened meanwhile use maps that stay valid."""
        self.listings.prime(vm, volume_ids)

    def _refused(self, vm, op, error):
        vm.last_error = {"op": op, "error": str(error), "errno": error.errno,
                         "time": utc_now()}
        log.warning("%s on VM %s refused: %s", op, vm.name, error)
        raise error

    def _join_background(self):
        """Wait for the operations going on after their request, and for
        the queued ones they run next."""
        while True:
            with _BACKGROUND:
                threads = list(self._background)
            if not threads:
                return
            for thread in threads:
                log.info("waiting for %s to finish", thread.name)
                thread.join()
