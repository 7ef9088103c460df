"""Mounting and unmounting: the background daemon and ``snapfs umount``.

``mount`` forks like other FUSE tools: the parent waits until the child
reports the mount visible (or an error) and exits with its status; the
child holds the store's writer lock for as long as the mount lives.
"""

import logging
import os
import re
import resource
import signal
import subprocess
import threading
import time

from ..errors import Busy, InvalidArgument, SnapfsError, StoreError
from ..store.processes import alive
from ..store.store import Store, private_file
from .mount_options import parse_mount_options

log = logging.getLogger(__name__)

UMOUNT_WAIT_SECONDS = 30
_FUSE_FD_MOUNTPOINT = re.compile(r"^/dev/fd/\d+$")
FSNAME_PREFIX = "snapfs:"
# The kernel's default readahead for a FUSE mount is 128 KiB, so buffered
# reads reach the daemon as 128 KiB requests; with a larger window they
# arrive as 1 MiB requests (libfuse's maximum), several in flight.
# scripts/bench.py measured cold sequential reads 2.5x faster at 4 MiB.
READ_AHEAD_KB = 4096


def _check_mountpoint(mountpoint):
    if not os.path.isdir(mountpoint):
        raise InvalidArgument(f"{mountpoint}: mount point is not a directory")
    if find_mount(mountpoint) is not None:
        raise InvalidArgument(f"{mountpoint}: a snapfs store is already mounted here")


def mount(store_path, mountpoint, options, foreground=False, log_file=None, debug=False):
    """``options``: the ``-o`` options (see mount_options.py)."""
    opts = parse_mount_options(options)
    if _FUSE_FD_MOUNTPOINT.match(str(mountpoint)):
        # mount.fuse3's drop_privileges mounts by itself, without
        # default_permissions (so the views' modes would go unchecked), and
        # passes /dev/fd/N: snapfs would not know its own mount point.
        raise InvalidArgument("the drop_privileges mount option is not supported; mount.fuse3 "
                              "has already attached the mount point: umount it")
    store = Store.open(store_path)
    mountpoint = os.path.abspath(mountpoint)
    _check_mountpoint(mountpoint)
    if foreground:
        _serve(store, mountpoint, opts, ready=None)
        return
    log_file = os.path.abspath(log_file or os.path.join(store.path, "snapfs.log"))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        message = b""
        while chunk := os.read(read_end, 4096):
            message += chunk
        os.close(read_end)
        if message.startswith(b"ok"):
            return
        os.waitpid(pid, 0)
        raise StoreError(message.decode(errors="replace").strip() or
                         f"mount failed; see {log_file}")
    # The daemon.
    os.close(read_end)
    os.setsid()
    code = 1
    try:
        _setup_daemon_logging(log_file, debug)

        def ready():
            os.write(write_end, b"ok\n")
            os.close(write_end)
            _detach_stdio()

        _serve(store, mountpoint, opts, ready=ready)
        code = 0
    except SnapfsError as e:
        _report(write_end, str(e))
    except Exception as e:   # the parent must always hear back
        log.exception("mount failed")
        _report(write_end, f"mount failed: {e}")
    finally:
        os._exit(code)


def _report(fd, message):
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _detach_stdio():
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")


def _setup_daemon_logging(log_file, debug):
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    # The log names VMs and snapshots: private, like the rest of the store.
    handler = logging.StreamHandler(private_file(log_file))
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _serve(store, mountpoint, opts, ready):
    from .fuse import mount_options, serve
    from .vfs import Vfs
    from ..ops.recovery import recover
    _raise_open_file_limit()
    store.acquire_lock(f"mounted at {mountpoint}")
    try:
        for line in recover(store, scratch_dirs=[opts.scratch_dir] if opts.scratch_dir else []):
            log.warning("recovered: %s", line)
    except SnapfsError as e:
        # The VM keeps its pending operation; the next operation retries it.
        log.error("recovery incomplete: %s", e)
    vfs = Vfs(store, read_only=opts.read_only, scratch_dir=opts.scratch_dir,
              scratch_limit=opts.scratch_limit, owner_files=opts.owner_files)
    try:
        try:
            options = mount_options(store.path, opts.allow_other, opts.fuse_flags)
            log.info("mounting %s at %s (%s)", store.path, mountpoint, ",".join(sorted(options)))
            def on_mounted():
                _tune_readahead(mountpoint)
                if ready is not None:
                    ready()

            serve(vfs, mountpoint, options, ready=on_mounted,
                  on_signal=lambda signum: _unmount_on_signal(mountpoint, signum,
                                                              foreground=ready is None))
        except RuntimeError as e:
            raise StoreError(f"{mountpoint}: cannot mount: {e}") from None
        log.info("unmounted %s", mountpoint)
    finally:
        vfs.close()
        store.release_lock()


# -- finding and unmounting -----------------------------------------------------

def _unescape(field):
    return field.encode().decode("unicode_escape") if "\\" in field else field


def find_mount(mountpoint):
    """The store path of the snapfs mount at ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        sep = fields.index("-")
        point, fstype, source = _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])
        if point == target and fstype == "fuse.snapfs" and source.startswith(FSNAME_PREFIX):
            return source[len(FSNAME_PREFIX):]
    return None


def _raise_open_file_limit():
    """The daemon keeps one descriptor per volume it has read: a store of
    200 VMs x 20 snapshots needs over 4,000, more than the usual soft limit
    of 1,024.  Raise it to the hard limit; say so if that is still low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)
    if soft != resource.RLIM_INFINITY and soft < 8192:
        log.warning("open-file limit is %d: a store with more volumes than that cannot be "
                    "read whole (raise it with ulimit -n)", soft)


def _tune_readahead(mountpoint):
    """Raise the mount's readahead window, from a thread: the kernel sets
    the window when the daemon answers FUSE's INIT, so it can only be
    raised after that, and stat() of the mount point returns only after
    INIT.  Root only; a reader merely gets smaller requests without it."""
    def tune():
        try:
            dev = os.stat(mountpoint).st_dev
            with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
                f.write(f"{READ_AHEAD_KB}\n")
        except OSError as e:
            log.warning("cannot raise readahead for %s: %s", mountpoint, e)
    threading.Thread(target=tune, name="readahead", daemon=True).start()


def umount(mountpoint):
    """Unmount and wait until the daemon has released the store."""
    store_path = find_mount(mountpoint)
    if store_path is None:
        raise InvalidArgument(f"{mountpoint}: no snapfs store is mounted here")
    holder_pid = _lock_holder_pid(store_path)
    unmount_once(mountpoint)
    deadline = time.monotonic() + UMOUNT_WAIT_SECONDS
    while holder_pid and alive(holder_pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def unmount_once(mountpoint):
    """One normal unmount, never a lazy one: the kernel refuses it (Busy)
    while a file, a loop device or a working directory inside is in use,
    so nothing that uses the mount is cut off with ENOTCONN."""
    tool = "fusermount3" if _which("fusermount3") else "fusermount"
    # The C locale, so that the reason can be recognised in the message.
    result = subprocess.run([tool, "-u", os.path.realpath(mountpoint)],
                            capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        msg = result.stderr.strip().splitlines()
        reason = msg[-1] if msg else "busy"
        error = Busy if "busy" in reason.lower() else StoreError
        raise error(f"{mountpoint}: cannot unmount: {reason}")


def _unmount_on_signal(mountpoint, signum, foreground):
    """SIGINT, SIGTERM or SIGHUP asks the daemon to unmount, which it does
    as ``snapfs umount`` would: only if nothing uses the mount.  While
    something does, it says so and goes on serving; the next signal tries
    again.  Runs in a thread while the event loop answers FUSE requests
    (the unmount needs them answered).  True if the mount is gone."""
    name = signal.Signals(signum).name
    try:
        unmount_once(mountpoint)
    except Busy:
        again = ("press Ctrl-C again" if foreground and signum == signal.SIGINT
                 else f"send {name} again (kill -{name[3:]} {os.getpid()})")
        # One warning: on stderr for a foreground mount, in the log file
        # for a background one.
        log.warning("%s is busy (a file, loop device or working directory in it is in use); "
                    "not unmounting. Close them and %s, or run 'snapfs umount %s'.",
                    mountpoint, again, mountpoint)
        return False
    except (SnapfsError, OSError) as e:
        log.warning("%s; still serving %s", e, mountpoint)
        return False
    log.info("unmounted %s on %s", mountpoint, name)
    return True


def _lock_holder_pid(store_path):
    try:
        holder = Store(store_path).lock_holder()
    except OSError:
        return None
    if holder and holder.startswith("pid "):
        try:
            return int(holder.split()[1].rstrip(":"))
        except ValueError:
            return None
    return None


def _which(name):
    # get_exec_path() falls back to /bin:/usr/bin, as subprocess does: a
    # daemon started by mount(8) has no PATH at all (mount(8) removes it).
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.get_exec_path())
