"""The ``snapfs`` command line.

Every error is one line on stderr and a non-zero exit, never a traceback
(``--debug`` shows tracebacks).
"""

import argparse
import json
import logging
import os
import sys

from . import __version__
from .errors import InvalidArgument, SnapfsError
from .fs.mount_options import describe_accepted
from .store.sizes import human
from .store.store import Store

log = logging.getLogger("snapfs")


def main(argv=None):
    parser = build_parser()
    argv = _mount_form(list(sys.argv[1:] if argv is None else argv), parser)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="snapfs: %(message)s")
    try:
        return args.func(args) or 0
    except SnapfsError as e:
        if args.debug:
            raise
        print(f"snapfs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snapfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"snapfs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def _mount_form(argv, parser):
    """``snapfs STORE MOUNTPOINT [-o OPTIONS]``, as mount.fuse3 runs it for
    ``mount -t fuse.snapfs`` and fstab, is ``snapfs mount ...``: rewritten
    so when the first word is not a command and a second one follows (a
    lone unknown word stays argparse's "invalid choice")."""
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if len(words) < 2 or argv[words[0]] in _commands(parser):
        return argv
    # Only global flags (--debug) can come before the store.
    return argv[:words[0]] + ["mount"] + argv[words[0]:]


def _commands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def build_parser():
    p = argparse.ArgumentParser(
        prog="snapfs",
        usage="snapfs [-h] [--version] [--debug] COMMAND ...\n"
              "       snapfs STORE MOUNTPOINT [-o OPTIONS]",
        description="Keep VM disks as qcow2 chains and browse every snapshot through FUSE.  "
                    "'snapfs STORE MOUNTPOINT [-o OPTIONS]' is 'snapfs mount': the form that "
                    "'mount -t fuse.snapfs STORE MOUNTPOINT' and fstab run (through "
                    "mount.fuse3).",
        epilog="Run 'snapfs COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logging and tracebacks")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", prog="snapfs")

    c = sub.add_parser("init", help="create an empty store")
    c.add_argument("store")
    c.set_defaults(func=cmd_init)

    vm = sub.add_parser("vm", help="add, list, remove VMs; attach them to QEMU").add_subparsers(
        title="vm commands", metavar="COMMAND")
    c = vm.add_parser("add", help="add a VM with new or imported disks",
                      description="Add a VM.  SPEC is a size (20G: a new blank qcow2 disk) or "
                      "the path of a raw or qcow2 image.  A qcow2 backing chain is imported "
                      "layer by layer: each backing layer becomes a snapshot named after its "
                      "file, oldest first, and the top becomes the active state.  Internal "
                      "snapshots (qemu-img snapshot, virsh) become snapshots too, each just "
                      "before its layer, with their own names and dates.  Direct LUNs and "
                      "shareable disks are never snapshotted (RHV's rule): snapshots, "
                      "previews, commits, undos, deletes and clones leave them alone.  "
                      "--libvirt takes the disks from a domain XML (virsh dumpxml), and "
                      "--libvirt-snapshots the snapshots from the XMLs virsh "
                      "snapshot-dumpxml writes; no libvirtd is needed.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--disk", action="append", default=[], metavar="NAME=SPEC",
                   help="a disk: NAME=SIZE or NAME=PATH (repeat for more disks)")
    c.add_argument("--lun", action="append", default=[], metavar="NAME=/dev/BLOCKDEV",
                   help="a direct LUN: a host block device used in place, never copied or "
                        "layered (repeat for more)")
    c.add_argument("--shareable", action="append", default=[], metavar="NAME[=PATH]",
                   help="a shareable disk: NAME=PATH imports a raw image, or a qcow2 image "
                        "without backing file, as one raw volume that several VMs can "
                        "attach; NAME alone attaches the store's shareable disk NAME")
    c.add_argument("--libvirt", metavar="DOMAIN.xml",
                   help="the disks of a libvirt domain, from the file virsh dumpxml writes: "
                        "each file disk by its target name, type='block' as a direct LUN, "
                        "<shareable/> as a shareable disk; CD-ROMs, floppies and network "
                        "disks are skipped (not with --disk, --lun, --shareable)")
    c.add_argument("--libvirt-snapshots", metavar="DIR",
                   help="with --libvirt: the domain's snapshot XMLs (virsh snapshot-dumpxml, "
                        "one *.xml each); each external snapshot keeps its name, description "
                        "and time, and holds the layers its overlays were created on")
    c.add_argument("--move", action="store_true",
                   help="rename the images into the store instead of copying them "
                        "(when on the same filesystem; refused for images with internal "
                        "snapshots, which are rebuilt)")
    c.set_defaults(func=cmd_vm_add)
    c = vm.add_parser("list", help="list VMs")
    c.add_argument("store")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_vm_list)
    c = vm.add_parser("remove", help="remove a VM and all its volumes")
    c.add_argument("store")
    c.add_argument("vm")
    c.set_defaults(func=cmd_vm_remove)
    c = vm.add_parser("clone", help="make a new, independent VM from a snapshot",
                      description="Clone snapshot SNAPSHOT of VM into a new VM NEW_VM: one "
                      "collapsed, sparse qcow2 volume per disk the snapshot holds (a partial "
                      "snapshot gives only its disks), no snapshots, no volume shared with VM, "
                      "so later writes, deletes and merges in either never touch the other.  "
                      "Shareable disks are attached as they are (the same volume, then used by "
                      "both VMs); direct LUNs are left out.  Works on a VM with a preview open "
                      "or running in QEMU.  On a mounted store: echo 'SNAPSHOT NEW_VM' > "
                      "MOUNT/VM/control/clone.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("snapshot")
    c.add_argument("new_vm")
    c.set_defaults(func=cmd_vm_clone)
    c = vm.add_parser("attach", help="record the QEMU that runs a VM (its QMP socket)",
                      description="Record, on this host, how to reach the QEMU that runs VM: "
                      "its QMP socket and optionally its guest agent's.  If QEMU answers, it "
                      "must run the VM's active volumes.  Operations then check it first; while "
                      "it runs, snapshots are created and deleted inside it (live snapshot, live "
                      "merge) and preview, commit and undo are refused (EBUSY).  Works whether "
                      "or not the store is mounted: a mount reads the record before each "
                      "operation.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP UNIX socket")
    c.add_argument("--guest-agent", metavar="SOCKET",
                   help="the UNIX socket of the guest agent's channel")
    c.set_defaults(func=cmd_vm_attach)
    c = vm.add_parser("detach", help="forget the QEMU recorded for a VM")
    c.add_argument("store")
    c.add_argument("vm")
    c.set_defaults(func=cmd_vm_detach)
    c = vm.add_parser("qemu-args", help="print qemu-system arguments for a VM's active volumes",
                      description="Print the qemu-system arguments that run VM on its active "
                      "volumes, one per line: per disk a -blockdev and a virtio-blk-pci "
                      "-device (node name and id snapfs-DISK), and the QMP monitor and guest "
                      "agent channel if asked.  Use: qemu-system-x86_64 ... $(snapfs vm "
                      "qemu-args STORE VM --qmp SOCK) when the paths have no blanks; else "
                      "mapfile -t a < <(snapfs vm qemu-args ...); qemu-system-x86_64 ... "
                      "\"${a[@]}\".")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--qmp", metavar="SOCKET", help="add a QMP monitor listening on SOCKET")
    c.add_argument("--guest-agent", metavar="SOCKET",
                   help="add a guest agent channel listening on SOCKET")
    c.set_defaults(func=cmd_vm_qemu_args)

    snap = sub.add_parser("snapshot", help="list, create, delete, rename and preview snapshots"
                          ).add_subparsers(title="snapshot commands", metavar="COMMAND")
    c = snap.add_parser("list", help="list a VM's snapshots, oldest first")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_snapshot_list)
    c = snap.add_parser("create", help="create a snapshot of a VM's disks",
                        description="Create a snapshot of every layered disk of the VM, or of "
                        "those given with --disks (a disk left out keeps its active layer). "
                        "Direct LUNs and shareable disks are never snapshotted.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("name", nargs="?", help="default: the UTC time, e.g. 2026-11-27T08-15-30Z")
    c.add_argument("-d", "--description", default="")
    c.add_argument("--disks", type=lambda v: [d for d in v.split(",") if d],
                   metavar="DISK,...", help="the disks to include (default: all layered disks)")
    c.set_defaults(func=cmd_snapshot_op, op="create")
    c = snap.add_parser("delete", help="delete a snapshot by merging its layers away")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("name")
    c.set_defaults(func=cmd_snapshot_op, op="delete")
    c = snap.add_parser("rename", help="rename a snapshot")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("name")
    c.add_argument("new_name")
    c.set_defaults(func=cmd_snapshot_op, op="rename")
    c = snap.add_parser("preview", help="make a snapshot's state active, keeping the current one",
                        description="Preview snapshot NAME: its state becomes active, the "
                        "current one is kept as before-preview until commit or undo.  --disk "
                        "DISK=OTHER takes DISK from snapshot OTHER instead (a custom preview); "
                        "a disk NAME doesn't hold keeps its current state.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("name")
    c.add_argument("--disk", action="append", default=[], metavar="DISK=OTHER",
                   help="preview DISK from snapshot OTHER (repeat for more disks)")
    c.set_defaults(func=cmd_snapshot_op, op="preview")
    for op, text in (("commit", "keep the previewed state; newer snapshots are deleted"),
                     ("undo", "drop the preview; the previous state is active again")):
        c = snap.add_parser(op, help=text)
        c.add_argument("store")
        c.add_argument("vm")
        c.set_defaults(func=cmd_snapshot_op, op=op)

    c = sub.add_parser("diff", help="list the files that changed between two snapshots",
                       description="List the files added (+), removed (-), modified (M) and "
                       "renamed (R old -> new) between A and B, snapshot names or 'active', "
                       "as zfs diff does: one line per change, the path from the root of the "
                       "filesystem prefixed by its view (sda-part1/etc/hosts).  Only the "
                       "ranges the two chains' qcow2 maps resolve differently are looked at. "
                       "Skipped partitions and damaged files are named on stderr.  'active' "
                       "is refused while the VM runs in QEMU.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--json", action="store_true",
                   help="one JSON document: disks -> partitions -> changes, with each "
                        "partition's filesystem kind or why it was skipped")
    c.set_defaults(func=cmd_diff)

    c = sub.add_parser("check", help="verify manifests, volume files, backing links, headers, "
                                     "refcounts and file modes")
    c.add_argument("store")
    c.add_argument("--repair", action="store_true",
                   help="also remove leftover files that no manifest refers to, release leaked "
                        "clusters and make store files private (0600, directories 0700)")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("mount", help="mount a store (in the background unless --foreground)",
                       description="Mount a store.  Also run as 'snapfs STORE MOUNTPOINT -o "
                       "OPTIONS' by 'mount -t fuse.snapfs' and fstab.")
    c.add_argument("store")
    c.add_argument("mountpoint")
    c.add_argument("-f", "--foreground", action="store_true")
    c.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma separated: " + describe_accepted())
    c.add_argument("--log", help="log file of the background mount "
                                 "(default: snapfs.log in the store)")
    c.set_defaults(func=cmd_mount)

    c = sub.add_parser("umount", help="unmount a snapfs mount and wait for it to finish")
    c.add_argument("mountpoint")
    c.set_defaults(func=cmd_umount)

    c = sub.add_parser("inspect", help="show a qcow2 image's header and internal snapshots")
    c.add_argument("image")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_inspect)
    return p


# -- commands -----------------------------------------------------------------

def cmd_init(args):
    store = Store.init(args.store)
    print(f"initialised store {store.path}")


def cmd_vm_add(args):
    from .errors import InvalidArgument
    from .ops.importer import add_vm
    from .ops.libvirt_import import import_domain
    if args.libvirt_snapshots and not args.libvirt:
        raise InvalidArgument("--libvirt-snapshots needs --libvirt")
    if args.libvirt and (args.disk or args.lun or args.shareable):
        raise InvalidArgument("--libvirt takes the disks from the domain XML: "
                              "no --disk, --lun or --shareable with it")
    store = Store.open(args.store)
    _locked(store, f"snapfs vm add {args.vm}")
    progress = None if sys.stderr.isatty() else False
    try:
        _recover(store)
        if args.libvirt:
            m = import_domain(store, args.vm, args.libvirt, args.libvirt_snapshots,
                              move=args.move, progress=progress,
                              report=lambda line: print(f"snapfs: {line}", file=sys.stderr))
        else:
            m = add_vm(store, args.vm, args.disk, move=args.move, progress=progress,
                       luns=args.lun, shareables=args.shareable)
    finally:
        store.release_lock()
    kinds = "".join(f", {kind}: {', '.join(d for d in m.special if m.special[d]['kind'] == kind)}"
                    for kind in ("lun", "shareable")
                    if any(k["kind"] == kind for k in m.special.values()))
    print(f"added VM {m.name}: {len(m.all_disks)} disk(s){kinds}, "
          f"{len(m.snapshots)} snapshot(s)")


def cmd_vm_clone(args):
    from tqdm import tqdm
    from .ops.clone import LEFT_OUT_LUN
    from .ops.operations import VmOperations
    store = Store.open(args.store)
    _locked(store, f"snapfs vm clone {args.vm} {args.snapshot} {args.new_vm}")
    try:
        _recover(store)
        with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="cloning", disable=None,
                  leave=False) as bar:
            m = VmOperations(store, args.vm, progress=_bar_updater(bar)).clone(args.snapshot,
                                                                               args.new_vm)
    finally:
        store.release_lock()
    left_out = m.last_operation["left_out"]
    shared = [d for d in m.all_disks if d in m.special]
    notes = [f"shareable: {', '.join(shared)} (attached, shared with {args.vm})"] if shared else []
    luns = [d for d, why in left_out.items() if why == LEFT_OUT_LUN]
    if luns:
        notes.append(f"left out: direct LUN(s) {', '.join(luns)}")
    partial = [d for d, why in left_out.items() if why != LEFT_OUT_LUN]
    if partial:
        notes.append(f"left out: {', '.join(partial)} (not in snapshot {args.snapshot})")
    print(f"cloned snapshot {args.snapshot} of {args.vm} into VM {m.name}: "
          f"disk(s) {', '.join(m.disks)} ({human(m.last_operation['bytes'])} of data)"
          + "".join(f"; {n}" for n in notes))


def cmd_vm_list(args):
    from .qemu.attach import read_record
    store = Store.open(args.store)
    rows = []
    for name in store.vm_names():
        try:
            m = store.load_vm(name)
            rows.append({"name": name, "disks": m.all_disks, "snapshots": len(m.snapshots)})
            if m.special:
                rows[-1]["kinds"] = {d: k["kind"] for d, k in m.special.items()}
        except SnapfsError as e:
            rows.append({"name": name, "error": str(e)})
            continue
        try:
            record = read_record(store.path, name)
        except SnapfsError as e:
            rows[-1]["attached"] = {"error": str(e)}
            continue
        rows[-1]["attached"] = record and {k: record[k] for k in ("qmp", "guest_agent",
                                                                  "attached")}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        if "error" in r:
            print(f"{r['name']}\tBROKEN: {r['error']}")
            continue
        line = f"{r['name']}\tdisks: {','.join(r['disks'])}\tsnapshots: {r['snapshots']}"
        attached = r["attached"]
        if attached and "error" in attached:
            line += f"\tattached: BROKEN: {attached['error']}"
        elif attached:
            line += f"\tattached: qmp {attached['qmp']}"
            if attached["guest_agent"]:
                line += f", guest agent {attached['guest_agent']}"
        print(line)


def cmd_vm_remove(args):
    from .qemu.attach import remove_record
    store = Store.open(args.store)
    _locked(store, f"snapfs vm remove {args.vm}")
    try:
        store.remove_vm(args.vm)
    finally:
        store.release_lock()
    # A VM added later under this name is not the one that QEMU runs.
    remove_record(store.path, args.vm, missing_ok=True)
    print(f"removed VM {args.vm}")


def cmd_vm_attach(args):
    """No writer lock: the manifest is only read (it is replaced atomically),
    and the record lives outside the store, so a mounted store is attached
    the same way (the mount reads the record before each operation)."""
    from .errors import QemuNotRunning
    from .qemu.attach import write_record
    from .qemu.qmp import QmpSession
    from .qemu.verify import check_runs_active
    store = Store.open(args.store)
    m = store.load_vm(args.vm)
    try:
        with QmpSession(args.qmp) as qmp:
            check_runs_active(store, m, qmp)
        state = "QEMU runs its active volumes"
    except QemuNotRunning:
        state = "QEMU is not running now: the VM is treated as offline until it is"
    write_record(store.path, m.name, args.qmp, args.guest_agent)
    print(f"attached VM {m.name} to the QEMU at {os.path.abspath(args.qmp)}: {state}")


def cmd_vm_detach(args):
    from .qemu.attach import remove_record
    store = Store.open(args.store)
    store.vm_dir(args.vm)       # a valid name (the VM itself may be gone)
    remove_record(store.path, args.vm)
    print(f"detached VM {args.vm}")


def cmd_vm_qemu_args(args):
    from .qemu.args import qemu_args
    store = Store.open(args.store)
    m = store.load_vm(args.vm)
    leaves = {disk: (store.volume_path(m.name, vid), m.volumes[vid]["format"])
              for disk, vid in m.active.items()}
    leaves.update((disk, (store.special_path(m, disk), "raw")) for disk in m.special)
    leaves = {disk: leaves[disk] for disk in m.all_disks}
    words = qemu_args(leaves, qmp=args.qmp and os.path.abspath(args.qmp),
                      guest_agent=args.guest_agent and os.path.abspath(args.guest_agent),
                      kinds={d: k["kind"] for d, k in m.special.items()})
    print("\n".join(words))


def cmd_snapshot_list(args):
    store = Store.open(args.store)
    m = store.load_vm(args.vm)
    if args.json:
        print(json.dumps([dict(s.to_json(), excluded=m.excluded(s)) for s in m.snapshots],
                         indent=2))
        return
    if not m.snapshots:
        print(f"VM {m.name} has no snapshots")
    for s in m.snapshots:
        print(f"{s.created}  {s.name}\t{s.description}")


def _locked(store, purpose):
    """The writer lock, with a hint at the mount's control files if mounted."""
    from .errors import StoreLocked
    try:
        store.acquire_lock(purpose)
    except StoreLocked as e:
        holder = store.lock_holder() or ""
        if "mounted at " in holder:
            mnt = holder.split("mounted at ", 1)[1]
            raise StoreLocked(f"{store.path}: store is mounted at {mnt}; change it through "
                              f"the mount ({mnt}/VM/snapshots, {mnt}/VM/control/...)") from None
        raise e from None
    return store


def _recover(store):
    from .ops.recovery import recover
    for line in recover(store):
        print(f"snapfs: recovered: {line}", file=sys.stderr)


def cmd_snapshot_op(args):
    from .ops.operations import VmOperations
    store = Store.open(args.store)
    _locked(store, f"snapfs snapshot {args.op} {args.vm}")
    try:
        _recover(store)
        bar = None
        if args.op == "delete":
            from tqdm import tqdm
            bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                       disable=None, leave=False)
        ops = VmOperations(store, args.vm,
                           progress=_bar_updater(bar) if bar is not None else None)
        try:
            if args.op == "create":
                snap = ops.create(args.name, args.description, args.disks)
                print(f"created snapshot {snap.name} of {args.vm}")
            elif args.op == "delete":
                record = ops.delete(args.name)
                moved = ", ".join(f"{disk}: {r['direction']} {human(r['bytes'])}"
                                  for disk, r in record["disks"].items())
                print(f"deleted snapshot {args.name} of {args.vm} ({moved})")
            elif args.op == "rename":
                ops.rename(args.name, args.new_name)
                print(f"renamed snapshot {args.name} of {args.vm} to {args.new_name}")
            elif args.op == "preview":
                ops.preview(args.name, _disk_sources(args.disk))
                print(f"previewing snapshot {args.name} of {args.vm}: "
                      f"commit to keep it, undo to go back")
            else:
                getattr(ops, args.op)()
                print(f"{args.op} done for {args.vm}")
        finally:
            if bar is not None:
                bar.close()
    finally:
        store.release_lock()


def _disk_sources(specs):
    """--disk DISK=OTHER options -> {disk: snapshot name}."""
    out = {}
    for spec in specs:
        disk, sep, other = spec.partition("=")
        if not sep or not disk or not other or disk in out:
            raise InvalidArgument(f"invalid --disk {spec!r}: use DISK=SNAPSHOT, once per disk")
        out[disk] = other
    return out


def _bar_updater(bar):
    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
    return update


def cmd_check(args):
    from .store.check import StoreChecker
    from .errors import StoreLocked
    store = Store.open(args.store)
    locked = False
    try:
        store.acquire_lock("snapfs check")
        locked = True
        _recover(store)
    except StoreLocked:
        if args.repair:
            raise
        # Mounted: the mount recovered the store when it started.
    try:
        checker = StoreChecker(store, repair=args.repair)
        return _report_check(checker)
    finally:
        if locked:
            store.release_lock()


def _report_check(checker):
    checker.run()
    for line in checker.repaired:
        print(line)
    problems = list(dict.fromkeys(checker.problems))
    for p in problems:
        print(p)
    if problems:
        print(f"snapfs: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"ok: {checker.vms_checked} VM(s), {checker.volumes_checked} volume(s) checked")


def cmd_diff(args):
    from .ops.diff import diff_vm, text_lines, to_json
    store = Store.open(args.store)
    disks = diff_vm(store, args.vm, args.a, args.b)
    if args.json:
        print(json.dumps(to_json(args.vm, args.a, args.b, disks), indent=2))
        return
    lines, notes = text_lines(disks)
    for note in notes:
        print(f"snapfs: {note}", file=sys.stderr)
    if lines:
        print("\n".join(lines))


def cmd_mount(args):
    from .fs.mount import mount
    mount(args.store, args.mountpoint, args.options, foreground=args.foreground,
          log_file=args.log, debug=args.debug)


def cmd_umount(args):
    from .fs.mount import umount
    umount(args.mountpoint)


def cmd_inspect(args):
    from .store.volume import Qcow2Volume
    from .errors import ImageError
    try:
        vol = Qcow2Volume(args.image)
    except FileNotFoundError:
        raise ImageError(args.image, "no such file") from None
    try:
        h = vol.header
        snaps = vol.internal_snapshots()
        info = {
            "filename": args.image, "format": "qcow2", "compat": h.compat,
            "virtual-size": h.size, "cluster-size": h.cluster_size,
            "refcount-bits": h.refcount_bits, "extended-l2": h.extended_l2,
            "compression-type": h.compression, "corrupt": h.corrupt, "dirty": h.dirty,
            "backing-filename": h.backing_file, "backing-format": h.backing_format,
            "snapshots": [{"id": s.id, "name": s.name, "date": s.date.isoformat(),
                           "vm-clock-nsec": s.vm_clock_nsec, "vm-state-size": s.vm_state_size,
                           "disk-size": s.disk_size} for s in snaps],
        }
    finally:
        vol.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "snapshots":
            print(f"{key}: {value}")
    if snaps:
        print("internal snapshots:")
        for s in snaps:
            print(f"  {s.id}\t{s.name}\t{s.date:%Y-%m-%d %H:%M:%S}\t{human(s.disk_size or 0)}")


if __name__ == "__main__":
    sys.exit(main())
