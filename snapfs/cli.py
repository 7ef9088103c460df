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
from .errors import SnapfsError
from .sizes import human
from .store import Store

log = logging.getLogger("snapfs")


def main(argv=None):
    parser = build_parser()
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


def build_parser():
    p = argparse.ArgumentParser(
        prog="snapfs",
        description="Keep VM disks as qcow2 chains and browse every snapshot through FUSE.",
        epilog="Run 'snapfs COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logging and tracebacks")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    c = sub.add_parser("init", help="create an empty store")
    c.add_argument("store")
    c.set_defaults(func=cmd_init)

    vm = sub.add_parser("vm", help="add, list or remove VMs").add_subparsers(
        title="vm commands", metavar="COMMAND")
    c = vm.add_parser("add", help="add a VM with new or imported disks",
                      description="Add a VM.  SPEC is a size (20G: a new blank qcow2 disk) or "
                      "the path of a raw or qcow2 image.  A qcow2 backing chain is imported "
                      "layer by layer: each backing layer becomes a snapshot named after its "
                      "file, oldest first, and the top becomes the active state.")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--disk", action="append", required=True, metavar="NAME=SPEC",
                   help="a disk: NAME=SIZE or NAME=PATH (repeat for more disks)")
    c.add_argument("--move", action="store_true",
                   help="rename the images into the store instead of copying them "
                        "(when on the same filesystem)")
    c.set_defaults(func=cmd_vm_add)
    c = vm.add_parser("list", help="list VMs")
    c.add_argument("store")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_vm_list)
    c = vm.add_parser("remove", help="remove a VM and all its volumes")
    c.add_argument("store")
    c.add_argument("vm")
    c.set_defaults(func=cmd_vm_remove)

    snap = sub.add_parser("snapshot", help="list snapshots").add_subparsers(
        title="snapshot commands", metavar="COMMAND")
    c = snap.add_parser("list", help="list a VM's snapshots, oldest first")
    c.add_argument("store")
    c.add_argument("vm")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_snapshot_list)

    c = sub.add_parser("check", help="verify manifests, volume files, backing links and headers")
    c.add_argument("store")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("mount", help="mount a store (in the background unless --foreground)")
    c.add_argument("store")
    c.add_argument("mountpoint")
    c.add_argument("-f", "--foreground", action="store_true")
    c.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma separated (allow_other, ...)")
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
    from .importer import add_vm
    store = Store.open(args.store)
    with store.locked(f"snapfs vm add {args.vm}"):
        m = add_vm(store, args.vm, args.disk, move=args.move,
                   progress=None if sys.stderr.isatty() else False)
    print(f"added VM {m.name}: {len(m.disks)} disk(s), {len(m.snapshots)} snapshot(s)")


def cmd_vm_list(args):
    store = Store.open(args.store)
    rows = []
    for name in store.vm_names():
        try:
            m = store.load_vm(name)
            rows.append({"name": name, "disks": m.disks, "snapshots": len(m.snapshots)})
        except SnapfsError as e:
            rows.append({"name": name, "error": str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        if "error" in r:
            print(f"{r['name']}\tBROKEN: {r['error']}")
        else:
            print(f"{r['name']}\tdisks: {','.join(r['disks'])}\tsnapshots: {r['snapshots']}")


def cmd_vm_remove(args):
    store = Store.open(args.store)
    with store.locked(f"snapfs vm remove {args.vm}"):
        store.remove_vm(args.vm)
    print(f"removed VM {args.vm}")


def cmd_snapshot_list(args):
    store = Store.open(args.store)
    m = store.load_vm(args.vm)
    if args.json:
        print(json.dumps([s.to_json() for s in m.snapshots], indent=2))
        return
    if not m.snapshots:
        print(f"VM {m.name} has no snapshots")
    for s in m.snapshots:
        print(f"{s.created}  {s.name}\t{s.description}")


def cmd_check(args):
    from .check import StoreChecker
    store = Store.open(args.store)
    checker = StoreChecker(store)
    problems = list(dict.fromkeys(checker.run()))
    for p in problems:
        print(p)
    if problems:
        print(f"snapfs: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"ok: {checker.vms_checked} VM(s), {checker.volumes_checked} volume(s) checked")


def cmd_mount(args):
    from .mount import mount
    options = [o for group in args.options for o in group.split(",") if o]
    mount(args.store, args.mountpoint, options, foreground=args.foreground,
          log_file=args.log, debug=args.debug)


def cmd_umount(args):
    from .mount import umount
    umount(args.mountpoint)


def cmd_inspect(args):
    from .volume import Qcow2Volume
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
