"""``snapfs check``: verify that manifests, volume files, backing links and
headers agree, and that the store's files are private to their owner.  One
method per invariant; each problem is one line."""

import os
import shutil
import stat

from ..errors import SnapfsError
from . import manifest as M
from .chain import Chain
from .scratch import LEFTOVER_OVERLAY, SCRATCH, default_scratch_dir, leftover_overlays
from .store import (
    LOCK, MARKER, SHARED, STAGING_LEFTOVER, STAGING_PREFIXES, TEMPORARY_LEFTOVER, VMS,
)
from .volume import VolumePool


class StoreChecker:
    """Collects problems; with ``repair`` it also removes leftovers (files
    nothing refers to) and tightens loose modes, reporting each as
    ``repaired: ...``."""

    def __init__(self, store, repair=False):
        self.store = store
        self.repair = repair
        self.repaired = []
        self.problems = []
        self.volumes_checked = 0
        self.vms_checked = 0

    def problem(self, text):
        self.problems.append(text)

    def leftover(self, path, text):
        """A file or directory nothing refers to: a problem, or removed."""
        if not self.repair:
            self.problem(f"{path}: {text}")
            return
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self.repaired.append(f"repaired: removed {path} ({text})")

    def run(self):
        self.check_store_entries()
        for name in sorted(os.listdir(self.store.vms_dir)):
            path = os.path.join(self.store.vms_dir, name)
            if name.startswith("."):
                if name.startswith(STAGING_PREFIXES) and not self.repair:
                    # A VM that a mount is cloning right now (a read-only
                    # check runs beside it), or a leftover that recovery
                    # removes when the next writer opens the store.
                    continue
                self.leftover(path, STAGING_LEFTOVER)
                continue
            if not os.path.isdir(path):
                self.problem(f"{path}: unexpected file in {VMS}/")
                continue
            self.check_vm(name)
        self.check_shared()
        # Last: what --repair removed has no mode left to report.
        self.check_private_modes()
        return self.repaired + self.problems

    def check_store_entries(self):
        for name in os.listdir(self.store.path):
            if name not in (MARKER, LOCK, VMS, SCRATCH, SHARED) and not name.endswith(".log"):
                self.problem(f"{os.path.join(self.store.path, name)}: unexpected file in the store")
        for path in leftover_overlays(default_scratch_dir(self.store)):
            self.leftover(path, LEFTOVER_OVERLAY)

    def check_shared(self):
        """Every shareable volume some VM attaches exists; one that none
        attaches is a leftover (of a removal or an import cut short).  With
        a manifest unreadable, nothing is judged unused."""
        try:
            used = self.store.shared_in_use()
        except SnapfsError as e:
            self.problem(f"shareable disks not checked: {e}")
            return
        present = set(os.listdir(self.store.shared_dir)) if os.path.isdir(
            self.store.shared_dir) else set()
        for sid in sorted(used - present):
            self.problem(f"{self.store.shared_path(sid)}: shareable disk is missing")
        for name in sorted(present - used):
            self.leftover(os.path.join(self.store.shared_dir, name),
                          "a shareable disk no VM attaches")

    def check_vm(self, name):
        try:
            manifest = self.store.load_vm(name)
        except SnapfsError as e:
            self.problem(str(e))
            return
        self.vms_checked += 1
        if manifest.name != name:
            self.problem(f"{manifest.path}: names VM {manifest.name!r} but lives in {name!r}")
        self.check_volume_files(manifest)
        self.check_manifest_temporary(manifest)
        self.check_volumes_reachable(manifest)
        pool = VolumePool()
        try:
            for vid in sorted(manifest.volumes):
                self.check_volume_header(manifest, vid, pool)
            self.check_chains(manifest, pool)
        finally:
            pool.close()
        if manifest.operation is not None:
            self.problem(f"{manifest.path}: an operation is recorded as in progress: "
                         f"{manifest.operation}")

    def check_volume_files(self, manifest):
        directory = self.store.vm_dir(manifest.name)
        present = set(os.listdir(directory)) - {M.MANIFEST, M.TEMPORARY}
        for vid in sorted(manifest.volumes):
            if vid not in present:
                self.problem(f"{os.path.join(directory, vid)}: volume file is missing")
        for extra in sorted(present - set(manifest.volumes)):
            self.leftover(os.path.join(directory, extra), "leftover file, no manifest refers to it")

    def check_manifest_temporary(self, manifest):
        """A manifest temp file is no problem: it is never the truth (the
        manifest is replaced by rename), and read-only check may run beside
        a mount whose save is in flight.  Left by a killed writer, it is
        removed when a writer opens the store; --repair removes it too."""
        path = os.path.join(self.store.vm_dir(manifest.name), M.TEMPORARY)
        if self.repair and os.path.lexists(path):
            self.leftover(path, TEMPORARY_LEFTOVER)

    def check_volumes_reachable(self, manifest):
        used = manifest.used_volumes()
        for vid in sorted(set(manifest.volumes) - used):
            self.problem(f"{manifest.path}: volume {vid} belongs to no snapshot and no active disk")

    def check_volume_header(self, manifest, vid, pool):
        path = self.store.volume_path(manifest.name, vid)
        if not os.path.exists(path):
            return
        info = manifest.volumes[vid]
        self.volumes_checked += 1
        try:
            vol = pool.get(path, info["format"])
        except SnapfsError as e:
            self.problem(str(e))
            return
        parent = info["parent"]
        if info["format"] == "raw":
            if parent is not None:
                self.problem(f"{path}: raw volume cannot have a parent")
            return
        if vol.backing_file != parent:
            self.problem(f"{path}: backing file is {vol.backing_file!r}, manifest says {parent!r}")
        elif parent is not None and vol.backing_format != manifest.volumes[parent]["format"]:
            self.problem(f"{path}: backing format is {vol.backing_format!r}, "
                         f"manifest says {manifest.volumes[parent]['format']!r}")
        if vol.header.corrupt:
            self.problem(f"{path}: image is marked corrupt")
        self.check_refcounts(path)

    def check_refcounts(self, path):
        """Leaks (refcounts above the references) are left by interrupted
        writes; --repair lowers them.  Refcounts below are corruption."""
        from ..qcow2.leaks import repair_leaks
        try:
            leaks, corruptions = repair_leaks(path, dry_run=True)
            if corruptions:
                self.problem(f"{path}: {corruptions} cluster(s) referenced more often than "
                             f"their refcount says (corruption)")
            if leaks and self.repair:
                repair_leaks(path)
                self.repaired.append(f"repaired: {path}: released {leaks} leaked cluster(s)")
            elif leaks:
                self.problem(f"{path}: {leaks} leaked cluster(s) (harmless; "
                             f"'snapfs check --repair' releases them)")
        except SnapfsError as e:
            self.problem(str(e))

    def check_chains(self, manifest, pool):
        tops = {vid for vid in manifest.active.values()}
        tops.update(v for s in manifest.snapshots for v in s.volumes.values())
        for vid in sorted(tops):
            try:
                Chain(pool, self.store.chain_refs(manifest, vid))
            except SnapfsError as e:
                self.problem(str(e))

    def check_private_modes(self):
        """Every file and directory of the store is its owner's only (0600,
        0700): a volume others can read is a VM's disk anyone on the host
        can copy, however private the mount.  --repair sets the mode."""
        for directory, dirs, files in os.walk(self.store.path):
            self._check_mode(directory, M.DIR_MODE)
            for name in files:
                self._check_mode(os.path.join(directory, name), M.FILE_MODE)

    def _check_mode(self, path, expected):
        try:
            st = os.lstat(path)
        except FileNotFoundError:     # removed meanwhile (by a mount's operation)
            return
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return                    # a symlink's mode means nothing
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return
        if self.repair:
            os.chmod(path, expected)
            self.repaired.append(f"repaired: {path}: mode {mode:04o} -> {expected:04o}")
            return
        verbs = _DIR_ACCESS if stat.S_ISDIR(st.st_mode) else _FILE_ACCESS
        granted = [verb for bits, verb in verbs if mode & bits]
        access = " and ".join([", ".join(granted[:-1]), granted[-1]] if len(granted) > 1
                              else granted)
        self.problem(f"{path}: mode {mode:04o} lets other users {access} it; "
                     f"expected {expected:04o}")


# What a group or other bit of a mode lets other users do.
_FILE_ACCESS = ((0o044, "read"), (0o022, "write"), (0o011, "execute"))
_DIR_ACCESS = ((0o044, "list"), (0o022, "write"), (0o011, "enter"))
