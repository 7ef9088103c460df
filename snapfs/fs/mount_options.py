"""The ``-o`` options of a mount, as ``snapfs mount``, mount(8) and fstab
give them.

mount(8) hands a ``fuse.snapfs`` mount to mount.fuse3, which runs
``snapfs STORE MOUNTPOINT -o OPTIONS``.  By then mount(8) has turned
``defaults`` into ``rw`` and dropped ``x-*`` and ``comment=``; mount.fuse3
has dropped ``auto``, ``noauto``, ``nofail``, ``_netdev``, ``user``,
``users``, ``nouser``, ``setuid=`` and ``drop_privileges``, and added
``dev`` and ``suid`` unless ``nodev`` / ``nosuid`` was given.  What is
left must not reach libfuse unsorted: libfuse refuses options it does not
know (``relatime``, ``lazytime``...) and would honour ``dev`` and ``suid``.
So each option is sorted here into what snapfs does with it.
"""

import os
from dataclasses import dataclass, field

from ..errors import InvalidArgument
from ..store.sizes import parse_size

# Kernel flags worth passing to FUSE, as libfuse names them, and the
# options that cancel them: the later of a pair wins, as with mount(8).
_PASSED_FLAGS = ("noexec", "sync", "dirsync")
_CANCELS = {"exec": "noexec", "async": "sync"}

# Accepted and dropped, each for a reason:
_IGNORED = {
    # fstab and mount(8) bookkeeping, meaningless once mounting has begun
    # (and a direct `snapfs STORE MNT -o defaults` should not fail on them).
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
    "owner", "group",
    # snapfs serves no device nodes and no setuid files, so the mount stays
    # nodev,nosuid (libfuse's default) whatever is asked.
    "dev", "nodev", "suid", "nosuid",
    # snapfs keeps no access times.
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "lazytime", "nolazytime", "diratime", "nodiratime",
    # Always on (pyfuse3's default): the kernel checks modes.
    "default_permissions",
}
# Ignored prefixes: user=NAME (mount(8) adds it to a user mount's options),
# comment= and x-* (fstab annotations for other tools).
_IGNORED_PREFIXES = ("user=", "comment=", "x-")

SNAPFS_OPTIONS = "allow_other, owner_files, ro, rw, scratch=DIR, scratch_limit=SIZE"


@dataclass
class MountOptions:
    allow_other: bool = False
    # The files inside snapshots (file trees) show as the mount owner's,
    # with no group or other bits, instead of the guest's owners and modes.
    owner_files: bool = False
    read_only: bool = False
    scratch_dir: str = None
    scratch_limit: int = None
    fuse_flags: list = field(default_factory=list)   # passed to FUSE as they are


def parse_mount_options(options):
    """``options``: a list of single options or comma-separated groups.
    Raises InvalidArgument, naming the option, for anything unknown."""
    result = MountOptions()
    flags = {}
    for opt in (o for group in options for o in group.split(",")):
        opt = opt.strip()
        name, eq, value = opt.partition("=")
        if not opt or opt in _IGNORED or opt.startswith(_IGNORED_PREFIXES):
            continue
        if opt == "allow_other":
            result.allow_other = True
        elif opt == "owner_files":
            result.owner_files = True
        elif opt in ("ro", "rw"):
            result.read_only = opt == "ro"
        elif opt in _PASSED_FLAGS:
            flags[opt] = True
        elif opt in _CANCELS:
            flags.pop(_CANCELS[opt], None)
        elif name == "scratch" and eq:
            if not value:
                raise InvalidArgument("mount option scratch= needs a directory")
            # Absolute: the daemon changes to / once it runs in the background.
            result.scratch_dir = os.path.abspath(value)
        elif name == "scratch_limit" and eq:
            try:
                result.scratch_limit = parse_size(value)
            except InvalidArgument as e:
                raise InvalidArgument(f"mount option scratch_limit: {e}") from None
        else:
            raise InvalidArgument(f"unknown mount option {opt!r} (snapfs takes {SNAPFS_OPTIONS}, "
                                  f"and the standard ones: see 'snapfs mount --help')")
    result.fuse_flags = list(flags)
    if result.read_only:
        # MS_RDONLY: the kernel itself refuses every write, create and rename.
        result.fuse_flags.insert(0, "ro")
    return result


def describe_accepted():
    """One line for --help."""
    return (f"{SNAPFS_OPTIONS}; also noexec, sync, dirsync, and, accepted but without "
            f"effect, defaults, auto, noauto, nofail, _netdev, user, users, dev, nodev, suid, "
            f"nosuid (always nodev,nosuid), the atime options, comment=, x-*")
