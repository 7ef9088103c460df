"""Follow a user's image back through its backing files, safely.

Used only when importing: inside the store, the manifest names every
volume's parent and format.  A backing name must stay inside the top
image's directory: absolute names, '..' and symlinks that lead out are
refused, as are loops and chains deeper than MAX_IMPORT_DEPTH.  Images
made by libvirt name their backing files by absolute path: for those the
caller lists the files its metadata names (``listed``), and an absolute
name is followed if it stays inside the directory or is one of them.
"""

import os
from dataclasses import dataclass, field

from ..errors import ImageError, UnsafeBacking
from ..qcow2.structs import MAGIC
from ..store.volume import open_volume

# Images from outside the store are untrusted: a hostile chain must not make
# an import open thousands of files.  The store's own chains may grow deeper
# (chain.MAX_CHAIN_DEPTH), one layer per snapshot.
MAX_IMPORT_DEPTH = 64


@dataclass
class Layer:
    path: str          # as found (inside the source directory)
    format: str        # "raw" or "qcow2"
    size: int          # virtual size
    backing: str | None = None         # backing name as recorded in the file
    backing_format: str | None = None
    # Its internal snapshots (qcow2.snapshots.InternalSnapshot), in table order.
    internal_snapshots: list = field(default_factory=list)


QCOW2_SUFFIXES = (".qcow2", ".qcow", ".qcow3")


def detect_format(path):
    """The user names a file to import; its name and first bytes say which
    format it is.  A file named like qcow2, or starting like qcow2 ('QFI'),
    is read as qcow2, so a damaged qcow2 is refused rather than imported as
    raw bytes.  Only the top image is detected: backing layers must record
    their format."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not a disk image") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror}") from None
    if head == MAGIC or head[:3] == MAGIC[:3] or str(path).lower().endswith(QCOW2_SUFFIXES):
        return "qcow2"
    return "raw"


def discover_chain(top, top_format=None, listed=None):
    """Layers from the base up to ``top``.  Raises ImageError subclasses.

    ``listed`` (None: refuse absolute backing names) maps the real paths of
    the backing files that the caller's metadata names, a libvirt domain's
    ``<backingStore>`` chain, to their format or None.  With it, an absolute
    backing name is followed when it leads inside the top image's directory
    or to one of those files, and a backing format that an image does not
    record is taken from there.
    """
    top = os.path.abspath(top)
    if top_format is None:
        top_format = detect_format(top)
    directory = os.path.realpath(os.path.dirname(top))
    layers = []
    seen = set()
    path, fmt = top, top_format
    while True:
        real = os.path.realpath(path)
        if real in seen:
            raise UnsafeBacking(path, "backing chain loops")
        seen.add(real)
        if len(layers) >= MAX_IMPORT_DEPTH:
            raise UnsafeBacking(top, f"backing chain deeper than {MAX_IMPORT_DEPTH} layers")
        if os.path.isdir(real):
            raise ImageError(path, "is a directory, not a disk image")
        vol = open_volume(path, fmt)
        try:
            if fmt == "qcow2" and vol.header.dirty:
                # Its refcounts may be stale: the copy would fail qemu-img check.
                raise ImageError(path, "image was not closed cleanly (dirty bit set); "
                                       "repair it with 'qemu-img check -r all' first")
            # Validate every table now, so that a damaged image is refused at
            # import rather than discovered later as EIO.
            vol.runs()
            # The snapshot table too (its L2 tables are checked as the
            # import reads them, before anything reaches the store).
            snapshots = vol.internal_snapshots() if fmt == "qcow2" else []
            backing, backing_fmt = vol.backing_file, vol.backing_format
            layers.append(Layer(path, fmt, vol.size, backing, backing_fmt, snapshots))
        finally:
            vol.close()
        if not backing:
            break
        if backing_fmt is None and listed:
            backing_fmt = listed.get(
                os.path.realpath(_resolve_backing(path, backing, directory, listed)))
        if backing_fmt not in ("raw", "qcow2"):
            raise ImageError(path, f"backing format of {backing!r} is not recorded "
                                   f"(set it with: qemu-img rebase -u -b {backing} -F qcow2|raw)"
                             if backing_fmt is None else
                             f"unsupported backing format {backing_fmt!r}")
        path = _resolve_backing(path, backing, directory, listed)
        fmt = backing_fmt
    layers.reverse()
    return layers


def _resolve_backing(image, name, directory, listed=None):
    if ":" in name:
        # QEMU reads "json:{...}", "nbd:..." and the like as protocols, not files.
        raise UnsafeBacking(image, f"backing name {name!r} contains ':' (a protocol, not a file)")
    if os.path.isabs(name) and listed is not None:
        candidate = name
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, directory]) != directory and real not in listed:
            raise UnsafeBacking(image, f"backing name {name!r} is outside {directory} and not "
                                       f"in the chain the domain XML lists")
    elif os.path.isabs(name):
        raise UnsafeBacking(image, f"backing name {name!r} is absolute")
    elif ".." in name.split("/"):
        raise UnsafeBacking(image, f"backing name {name!r} leaves the image directory")
    else:
        candidate = os.path.join(os.path.dirname(image), name)
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, directory]) != directory:
            raise UnsafeBacking(image, f"backing name {name!r} resolves outside {directory}")
    if not os.path.exists(real):
        raise ImageError(image, f"backing file {name!r} does not exist")
    return candidate
