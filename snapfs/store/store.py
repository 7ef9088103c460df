"""The store: a directory of VMs, each a manifest plus volume files.

Layout::

    STORE/snapfs-store.json      marks the directory as a store
    STORE/lock                   flock()ed by the one writer (a mount or a CLI command)
    STORE/vms/<vm>/manifest.json
    STORE/vms/<vm>/<uuid>        volume files, named by UUID
    STORE/shared/<uuid>          shareable disks: one raw volume each, which
                                 the manifests of the VMs that attach it name

A qcow2 volume's backing name is its parent's bare UUID, with the format
always recorded.  Readers need no lock: manifests are replaced atomically.

Everything snapfs creates in a store is its owner's only: files 0600,
directories 0700, whatever the umask (``snapfs check`` flags looser modes).
"""

import errno
import fcntl
import json
import os
import shutil
import stat
import threading
import uuid
from contextlib import contextmanager

from ..errors import AlreadyExists, Busy, NotFound, StoreError, StoreLocked
from . import manifest as M
from .chain import VolumeRef
from .inuse import held_by_qemu
from .names import check_name

MARKER = "snapfs-store.json"
STORE_FORMAT = "snapfs-store"
STORE_VERSION = 1
VMS = "vms"
SHARED = "shared"
LOCK = "lock"
TEMPORARY_LEFTOVER = "left by an interrupted manifest update"
# Hidden directories of vms/: a VM being assembled (vm add, vm clone) and
# renamed into place whole, or one being removed.  Only the process holding
# the writer lock makes them, so once a writer opens the store any it
# finds is a leftover of an interrupted one.
STAGING_PREFIXES = (".import-", ".clone-", ".removed-")
STAGING_LEFTOVER = "leftover of an interrupted import, clone or removal"


class Store:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.vms_dir = os.path.join(self.path, VMS)
        self._lock_fd = None
        self._kept = {}     # name -> (Manifest, file identity): see load_vms
        # Held while a VM is renamed into place: a mount's threads may
        # clone two VMs to the same name at once.
        self._installing = threading.Lock()

    # -- creation and opening ----------------------------------------------

    @classmethod
    def init(cls, path):
        """Create a store at ``path`` (a new or empty directory)."""
        path = os.path.abspath(path)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise StoreError(f"{path}: exists and is not a directory")
            if os.listdir(path):
                if os.path.exists(os.path.join(path, MARKER)):
                    raise StoreError(f"{path}: is already a snapfs store")
                raise StoreError(f"{path}: directory is not empty")
        # The parents are the user's, made as the umask says; the store
        # itself (a new directory, or the empty one given) becomes private.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.mkdir(path, M.DIR_MODE)
        except FileExistsError:
            pass
        os.chmod(path, M.DIR_MODE)
        M.private_dir(os.path.join(path, VMS))
        marker = {"format": STORE_FORMAT, "version": STORE_VERSION, "id": str(uuid.uuid4())}
        tmp = os.path.join(path, f".{MARKER}.tmp")
        with _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as f:
            json.dump(marker, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, MARKER))
        M.fsync_dir(path)
        return cls(path)

    @classmethod
    def open(cls, path):
        """Open an existing store.  Raises StoreError if it is not one."""
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no such store (run 'snapfs init {path}' first)")
        try:
            with open(os.path.join(path, MARKER)) as f:
                marker = json.load(f)
        except FileNotFoundError:
            raise StoreError(f"{path}: not a snapfs store (no {MARKER})") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable store marker: {e}") from None
        if not isinstance(marker, dict) or marker.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: not a snapfs store")
        if marker.get("version") != STORE_VERSION:
            raise StoreError(f"{path}: store version {marker.get('version')} is not supported")
        if not os.path.isdir(os.path.join(path, VMS)):
            raise StoreError(f"{path}: store is damaged (no {VMS}/ directory)")
        return cls(path)

    # -- the writer lock ---------------------------------------------------

    @contextmanager
    def locked(self, purpose):
        """Hold the store's writer lock.  Raises StoreLocked if another
        process (a mount, or another command) holds it."""
        self.acquire_lock(purpose)
        try:
            yield self
        finally:
            self.release_lock()

    def acquire_lock(self, purpose):
        lock_path = os.path.join(self.path, LOCK)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, M.FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise StoreLocked(f"{self.path}: store is in use ({holder or 'by another process'})"
                              ) from None
        try:
            # The umask applied when the file was made (perhaps by an older
            # snapfs): the holder's description is the owner's business.
            os.fchmod(fd, M.FILE_MODE)
            os.ftruncate(fd, 0)
            # The purpose may name what the user typed, valid UTF-8 or not.
            # It only tells others who holds the lock: a full filesystem
            # must not keep the store from being checked, mounted, or freed
            # by a delete.
            try:
                os.pwrite(fd, f"pid {os.getpid()}: {purpose}\n".encode("utf-8",
                                                                      "backslashreplace"), 0)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def release_lock(self):
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock_holder(self):
        """The lock file's description of its holder, or None if unlocked."""
        try:
            fd = os.open(os.path.join(self.path, LOCK), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # -- VMs ----------------------------------------------------------------

    def vm_dir(self, name):
        return os.path.join(self.vms_dir, check_name(name, "VM name"))

    def vm_names(self):
        # scandir: the entry types come with the listing, no stat per VM.
        with os.scandir(self.vms_dir) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())

    def has_vm(self, name):
        return os.path.exists(os.path.join(self.vm_dir(name), M.MANIFEST))

    def load_vm(self, name):
        return self._load_vm(name)[0]

    def _load_vm(self, name):
        """(manifest, identity of the file it was read from)."""
        path = os.path.join(self.vm_dir(name), M.MANIFEST)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"no VM named {name!r} in {self.path}") from None
        except OSError as e:
            raise StoreError(f"{path}: unreadable manifest: {e}") from None
        with f:
            st = os.fstat(f.fileno())
            return M.load_file(f, path), _identity(st)

    def load_vms(self, keep=False):
        """[(name, Manifest or the exception loading it raised)] of every
        VM, in name order.

        With ``keep``, each manifest read is also held for the next call
        (or one ``take_loaded``), which returns it if its file was not
        replaced meanwhile: a mount parses each manifest once, not once to
        recover and again to list the VMs."""
        names = self.vm_names()
        results = {}
        for name in names:
            manifest = self.take_loaded(name)
            if manifest is not None:
                results[name] = (manifest, None)
                continue
            try:
                results[name] = self._load_vm(name)
            except Exception as e:     # the caller decides
                results[name] = (e, None)
        self._kept = {n: r for n, r in results.items() if r[1] is not None} if keep else {}
        return [(n, results[n][0]) for n in names]

    def take_loaded(self, name):
        """The manifest of VM ``name`` kept by ``load_vms(keep=True)``, once,
        if its file is still the one it was read from; else None.  The caller
        owns it (nothing else holds it)."""
        manifest, identity = self._kept.pop(name, (None, None))
        if manifest is None:
            return None
        try:
            st = os.stat(os.path.join(self.vm_dir(name), M.MANIFEST))
        except OSError:
            return None
        return manifest if _identity(st) == identity else None

    def forget_loaded(self, name=None):
        """Drop what ``load_vms(keep=True)`` kept (of one VM, or all)."""
        if name is None:
            self._kept.clear()
        else:
            self._kept.pop(name, None)

    def save_vm(self, manifest):
        M.save(manifest, os.path.join(self.vm_dir(manifest.name), M.MANIFEST))

    def remove_temporaries(self):
        """Remove the manifest temp files that a process killed while saving
        left in VM directories, and return a line for each.

        Only those: a temp file is never the truth (the manifest is
        replaced by rename), so removing it loses nothing.  Other leftovers
        are recovery's and ``snapfs check``'s.  The caller holds the writer
        lock, so that no save is in flight.  Raises OSError."""
        done = []
        for name in self.vm_names():
            path = os.path.join(self.vms_dir, name, M.TEMPORARY)
            try:
                os.unlink(path)
            except FileNotFoundError:     # the usual case: one syscall per VM
                continue
            done.append(f"removed {path} ({TEMPORARY_LEFTOVER})")
        return done

    def staging_dir(self, kind):
        """A new private, hidden directory in vms/ in which a VM is
        assembled (``kind``: "import", "clone"): no VM until ``install_vm``.
        Raises OSError."""
        path = os.path.join(self.vms_dir, f".{kind}-{uuid.uuid4()}")
        M.private_dir(path)
        return path

    def install_vm(self, staging, name):
        """Rename ``staging`` (a whole VM, its manifest written) to VM
        ``name``: the VM appears at once and whole.  Returns its directory.
        Raises AlreadyExists if the name was taken meanwhile (``staging``
        stays the caller's), OSError."""
        target = self.vm_dir(name)
        with self._installing:
            if os.path.lexists(target):
                raise AlreadyExists(f"VM {name!r} already exists in {self.path}")
            os.rename(staging, target)
        M.fsync_dir(self.vms_dir)
        return target

    def remove_staging_leftovers(self):
        """Remove the staging directories of imports, clones and removals
        that a crash interrupted, and return a line for each.  The caller
        holds the writer lock, so none is in flight.  Raises OSError."""
        done = []
        with os.scandir(self.vms_dir) as entries:
            leftovers = sorted(e.path for e in entries
                               if e.name.startswith(STAGING_PREFIXES) and e.is_dir())
        for path in leftovers:
            shutil.rmtree(path)
            done.append(f"removed {path} ({STAGING_LEFTOVER})")
        if done:
            M.fsync_dir(self.vms_dir)
        return done

    def remove_vm(self, name):
        """Remove a VM and its volumes.  The rename makes it vanish atomically;
        the files are deleted after."""
        directory = self.vm_dir(name)
        if not self.has_vm(name):
            raise NotFound(f"no VM named {name!r} in {self.path}")
        # Deleting the files of a running VM would leave QEMU writing
        # into unlinked files, and the guest's disks lost at its exit.
        for entry in sorted(os.listdir(directory)):
            if held_by_qemu(os.path.join(directory, entry)):
                raise Busy(f"VM {name} is in use by QEMU (volume {entry} holds its image "
                           f"lock); stop the VM first")
        try:
            shared = self.load_vm(name).shared_ids()
        except StoreError:
            shared = set()   # unreadable: its shared volumes are check's to judge
        trash = os.path.join(self.vms_dir, f".removed-{uuid.uuid4()}")
        os.rename(directory, trash)
        M.fsync_dir(self.vms_dir)
        shutil.rmtree(trash)
        # A shareable disk goes with its last VM.  A crash before this
        # leaves it unreferenced, and 'snapfs check --repair' removes it.
        for sid in sorted(shared - self.shared_in_use()):
            self.remove_shared(sid)

    # -- shareable disks ------------------------------------------------------

    @property
    def shared_dir(self):
        return os.path.join(self.path, SHARED)

    def shared_path(self, shared_id):
        return os.path.join(self.shared_dir, str(uuid.UUID(shared_id)))

    def shared_in_use(self):
        """Ids of the shareable disks some VM's manifest names (an unreadable
        manifest raises: nothing may be judged unused on a guess)."""
        used = set()
        for name, m in self.load_vms():
            if isinstance(m, BaseException):
                raise StoreError(f"VM {name}: {m}") from m
            used |= m.shared_ids()
        return used

    def shareable_named(self, disk):
        """The id of the shareable disk that the store's VMs attach as
        ``disk``.  Raises NotFound if none does, StoreError if several
        different ones do."""
        ids = {m.special[disk]["id"] for _, m in self.load_vms()
               if not isinstance(m, BaseException) and disk in m.special
               and m.special[disk]["kind"] == M.SHAREABLE}
        if not ids:
            raise NotFound(f"no VM of {self.path} has a shareable disk named {disk!r}")
        if len(ids) > 1:
            raise StoreError(f"{len(ids)} different shareable disks are named {disk!r} in "
                             f"{self.path}: {sorted(ids)}")
        return ids.pop()

    def special_path(self, m, disk):
        """The file or device that LUN or shareable ``disk`` of ``m`` uses."""
        kind = m.special[disk]
        return kind["device"] if kind["kind"] == M.LUN else self.shared_path(kind["id"])

    def special_ref(self, m, disk):
        """The VolumeRef of a LUN ("block": raw on a block device, checked at
        every open) or of a shareable disk (raw)."""
        fmt = "block" if m.special[disk]["kind"] == M.LUN else "raw"
        return VolumeRef(self.special_path(m, disk), fmt)

    def remove_shared(self, shared_id):
        try:
            os.unlink(self.shared_path(shared_id))
        except FileNotFoundError:
            pass
        M.fsync_dir(self.shared_dir)

    # -- volumes ------------------------------------------------------------

    def volume_path(self, vm, volume_id):
        return os.path.join(self.vm_dir(vm), volume_id)

    def chain_refs(self, manifest, volume_id):
        """VolumeRefs from the base up to ``volume_id``."""
        return [VolumeRef(self.volume_path(manifest.name, vid), manifest.volumes[vid]["format"])
                for vid in manifest.chain(volume_id)]


def private_file(path):
    """``path`` opened for appending text, line buffered (a log), created
    0600 whatever the umask; an existing regular file is made 0600 too (an
    older snapfs made its log as the umask said).  Raises OSError."""
    return _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a", buffering=1)


def _open_private(path, flags, mode, **kwargs):
    """open(path, mode) with os.open ``flags`` (O_CREAT among them): a
    regular file ends up 0600.  Raises OSError."""
    fd = os.open(path, flags | os.O_CLOEXEC, M.FILE_MODE)
    try:
        # The umask applied to the mode above.  A device or FIFO given as
        # a log (/dev/null) is not snapfs' to change.
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, M.FILE_MODE)
        return open(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def _identity(st):
    """What changes whenever a manifest is replaced (rename of a new file)."""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size
