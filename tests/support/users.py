"""Throwaway Unix users for permission tests, and running things as them.

Everything here needs root.  Users are made with ``useradd`` and removed
with ``userdel -r``; a test runs a command as one of them with ``runuser``
(no PAM login, no password: the accounts stay locked).

What a user can run: the system ``python3`` (``/usr/bin/python3``), for
the one-shot probes of ``probe()``.  The project's virtualenv may not be
usable by other users (its interpreter can live under root's home, which is
0700), so ``snapfs_command()`` says how a user can run snapfs, and why.
"""

import contextlib
import dataclasses
import grp
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
SYSTEM_PYTHON = "/usr/bin/python3"
ENV = {"LC_ALL": "C", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple      # names of the groups it is in, its own included


def require_tools():
    """Fail (never skip) when the tools these tests stand on are missing."""
    missing = [t for t in ("useradd", "userdel", "runuser") if shutil.which(t) is None]
    if missing:
        raise AssertionError(f"permission tests need {', '.join(missing)} (Debian: the passwd "
                             f"and util-linux packages); install them")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise AssertionError(f"permission tests run probes with {SYSTEM_PYTHON}: install python3")
    if os.geteuid() != 0:
        raise AssertionError("permission tests make users and mount as root: run them as root")


def create_user(name, groups=()):
    """``useradd`` a user with its own group, a home and /bin/sh."""
    cmd = ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh"]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    result = subprocess.run(cmd + [name], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"useradd {name} failed ({result.returncode}): {result.stderr}")
    pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid,
                tuple([grp.getgrgid(pw.pw_gid).gr_name, *groups]))


def processes_of(uid):
    """PIDs of the processes whose real or effective uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:3]
        except (OSError, StopIteration):
            continue
        if str(uid) in uids:
            pids.append(int(entry))
    return pids


def stop_processes(pids, wait=5.0):
    """SIGTERM each of ``pids``, then SIGKILL those still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        if not any(alive(p) for p in pids):
            return


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def remove_user(user):
    """Stop what is left running as ``user`` (only these tests start
    anything as a throwaway user), then ``userdel -r``.  Returns an error
    message, or None."""
    stop_processes(processes_of(user.uid))
    result = subprocess.run(["userdel", "--remove", user.name], capture_output=True, text=True)
    # 12: the home could not be removed; anything else: the user may remain.
    if result.returncode != 0:
        try:
            pwd.getpwnam(user.name)
        except KeyError:
            return None if result.returncode == 12 else f"userdel {user.name}: {result.stderr}"
        return f"userdel {user.name} failed ({result.returncode}): {result.stderr}"
    return None


def run_as(user, argv, timeout=120, env=None, check=False, ns=None):
    """Run ``argv`` as ``user`` (a User, or "root") from ``/``, in the C
    locale, in the mount namespace ``ns`` (a FuseNamespace) if given;
    returns CompletedProcess with text output."""
    name = user if isinstance(user, str) else user.name
    full = [*(ns.prefix if ns else []), "runuser", "-u", name, "--", "env", "-i",
            *(f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()), *map(str, argv)]
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and result.returncode != 0:
        raise AssertionError(f"as {name}: {shlex.join(map(str, argv))} failed "
                             f"({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def sh(user, script, **kw):
    """``script`` run by /bin/sh as ``user``."""
    return run_as(user, ["/bin/sh", "-c", script], **kw)


# A probe tries one system call as the user and prints the errno's name,
# or OK and what it read.  Run by the system python3 with -I: nothing of
# the project, the environment or the user's site is imported.
_PROBE = r'''
import errno, hashlib, os, sys
op, a = sys.argv[1], sys.argv[2:]

def flags(spec):
    n = 0
    for name in spec.split("|"):
        n |= getattr(os, name)
    return n

def run():
    if op == "stat":
        return oct(os.stat(a[0]).st_mode)
    if op == "listdir":
        return ",".join(sorted(os.listdir(a[0])))
    if op == "readlink":
        return os.readlink(a[0])
    if op == "read":
        with open(a[0], "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    if op == "open":
        os.close(os.open(a[0], flags(a[1]), 0o666))
        return None
    if op == "write":
        fd = os.open(a[0], flags(a[2]) if len(a) > 2 else os.O_WRONLY)
        try:
            os.write(fd, a[1].encode())
        finally:
            os.close(fd)
        return None
    if op == "pwrite":
        fd = os.open(a[0], os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xee" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    if op == "mkdir":
        return os.mkdir(a[0])
    if op == "rmdir":
        return os.rmdir(a[0])
    if op == "rename":
        return os.rename(a[0], a[1])
    if op == "unlink":
        return os.unlink(a[0])
    if op == "symlink":
        return os.symlink(a[0], a[1])
    if op == "link":
        return os.link(a[0], a[1])
    if op == "mknod":
        return os.mknod(a[0], 0o600 | 0o100000)
    if op == "utime_now":        # utimensat(UTIME_NOW) with no open: touch's second step
        return os.utime(a[0])
    if op == "utime_set":
        return os.utime(a[0], (1, 1))
    if op == "truncate":
        return os.truncate(a[0], int(a[1]))
    if op == "chmod":
        return os.chmod(a[0], int(a[1], 8))
    if op == "chown":
        return os.chown(a[0], int(a[1]), int(a[2]))
    if op == "setxattr":
        return os.setxattr(a[0], "user.snapfs-test", b"1")
    raise SystemExit(f"unknown probe {op}")

try:
    out = run()
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
else:
    print("OK" if out is None else "OK " + str(out))
'''


def probe(user, op, *args, ns=None):
    """Try one call as ``user``: "OK", "OK <result>", or an errno name
    ("EACCES")."""
    result = run_as(user, [SYSTEM_PYTHON, "-I", "-c", _PROBE, op, *map(str, args)],
                    timeout=120, ns=ns)
    if result.returncode != 0 or not result.stdout.strip():
        raise AssertionError(f"probe {op} {args} as {user}: exit {result.returncode}\n"
                             f"{result.stdout}{result.stderr}")
    return result.stdout.strip()


def can_open_fuse(user):
    """Can ``user`` open /dev/fuse?  libfuse opens it as the caller before
    it falls back to fusermount3, and gives up if that open fails."""
    return run_as(user, ["test", "-r", "/dev/fuse", "-a", "-w", "/dev/fuse"]).returncode == 0


class FuseNamespace:
    """A private mount namespace in which ``user`` can open /dev/fuse.

    Where /dev/fuse is 0600 root (not the usual 0666), no user can mount
    FUSE.  Rather than change the machine's /dev/fuse, this makes a device
    node of the same number, owned by ``user`` and 0600, in ``workdir``,
    and bind-mounts it on /dev/fuse inside a new mount namespace (private
    propagation: nothing in it is seen outside).  A holder process keeps
    the namespace; commands enter it with ``prefix`` (nsenter).  Mounts
    made in it are seen only in it: read them with ``mounts()``.  It all
    goes when ``stop()`` ends the holder and the last process in it exits.
    """

    def __init__(self, user, workdir):
        self.node = Path(workdir) / "fuse-device"
        os.mknod(self.node, 0o600 | stat.S_IFCHR, os.stat("/dev/fuse").st_rdev)
        os.chown(self.node, user.uid, user.gid)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             f"mount --bind {shlex.quote(str(self.node))} /dev/fuse && echo ready "
             f"&& exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise AssertionError(f"cannot make a mount namespace with a user's /dev/fuse: "
                                 f"{self.holder.stderr.read()}")
        self.prefix = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def mounts(self):
        """Mount points of the snapfs mounts in the namespace."""
        return list(mount_options(f"/proc/{self.holder.pid}/mountinfo"))

    def stop(self):
        if self.holder.poll() is None:
            stop_processes([self.holder.pid])
        self.holder.wait(timeout=10)
        self.node.unlink(missing_ok=True)


def mount_options(mountinfo="/proc/self/mountinfo"):
    """{mount point: set of its superblock's options} of the snapfs mounts
    (user_id=, group_id=, allow_other, default_permissions...)."""
    found = {}
    with open(mountinfo) as f:
        for line in f:
            if " fuse.snapfs " in line:
                fields = line.split()
                found[fields[4]] = set(fields[-1].split(","))
    return found


def snapfs_command(user):
    """(argv prefix that runs the snapfs CLI as ``user``, extra env, why).

    The virtualenv's own python is used when the user can run it.  When it
    cannot (its interpreter lives under a directory the user cannot enter),
    the system python3 runs the same code with the virtualenv's
    site-packages on PYTHONPATH, provided it is the same Python minor
    version (pyfuse3 is a compiled extension).  Nothing's permissions are
    changed.  Raises AssertionError when neither works."""
    check = "import pyfuse3, trio, snapfs.cli"
    venv = run_as(user, [VENV_PYTHON, "-c", check])
    if venv.returncode == 0:
        return [str(VENV_PYTHON), "-m", "snapfs.cli"], {}, "the virtualenv's python"
    site = sorted((ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, site)])}
    system = run_as(user, [SYSTEM_PYTHON, "-c", check], env=env)
    if system.returncode == 0:
        return ([SYSTEM_PYTHON, "-m", "snapfs.cli"], env,
                f"{SYSTEM_PYTHON} with the virtualenv's site-packages: {user.name} cannot run "
                f"{VENV_PYTHON} ({venv.stderr.strip().splitlines()[-1:]})")
    raise AssertionError(f"{user.name} cannot run snapfs: {VENV_PYTHON}: {venv.stderr.strip()}; "
                         f"{SYSTEM_PYTHON}: {system.stderr.strip()}")


@contextlib.contextmanager
def traversable_dir(prefix):
    """A directory every user can traverse (pytest's tmp_path is 0700), for
    mounts other users reach.  Removed afterwards, never through a mount
    left in it (that fails the test instead)."""
    from .mounting import force_unmount, snapfs_mounts
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        left = [m for m in snapfs_mounts() if m.startswith(f"{path}/")]
        for m in left:
            force_unmount(m)
        time.sleep(0.2 if left else 0)
        still = [m for m in snapfs_mounts() if m.startswith(f"{path}/")]
        if not still:       # never rmtree through a live mount
            shutil.rmtree(path, ignore_errors=True)
        assert not left, f"mounts left behind under {path}: {left}"
        assert not path.exists(), f"{path} could not be removed (mounts: {still})"
