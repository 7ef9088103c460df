"""Domain errors, each with the errno the FUSE adapter answers with.

Nothing below ``fuse.py`` raises ``pyfuse3.FUSEError``: code raises one of
these, and the adapter translates it once, at the boundary.  The CLI prints
``str(error)`` as one line.
"""

import errno


class SnapfsError(Exception):
    """Base of every error snapfs reports to a user."""

    errno = errno.EIO


class NotFound(SnapfsError):
    errno = errno.ENOENT


class AlreadyExists(SnapfsError):
    errno = errno.EEXIST


class InvalidName(SnapfsError):
    errno = errno.EINVAL


class InvalidArgument(SnapfsError):
    errno = errno.EINVAL


class NameTooLong(InvalidName):
    errno = errno.ENAMETOOLONG


class ChainTooDeep(SnapfsError):
    """One more layer would make a disk's chain deeper than the store keeps."""
    errno = errno.EMLINK


class PermissionDenied(SnapfsError):
    """Only the mount's owner (or root) may change snapshots."""
    errno = errno.EACCES


class NotPermitted(SnapfsError):
    """The namespace does not allow this here (e.g. mkdir outside snapshots/)."""
    errno = errno.EPERM


class NoAttribute(SnapfsError):
    """getxattr of an attribute the file does not have."""
    errno = errno.ENODATA


class CrossDevice(SnapfsError):
    errno = errno.EXDEV


class Busy(SnapfsError):
    errno = errno.EBUSY


class ReadOnly(SnapfsError):
    errno = errno.EROFS


class NoSpace(SnapfsError):
    errno = errno.ENOSPC


class StoreError(SnapfsError):
    """The store itself is missing, locked or inconsistent."""


class StoreLocked(StoreError):
    errno = errno.EBUSY


class ImageError(SnapfsError):
    """An image cannot be used.  The message names the file and the reason."""

    errno = errno.EIO

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedImage(ImageError):
    """A well-formed image that uses something snapfs refuses (encryption, ...)."""


class CorruptImage(ImageError):
    """An image whose structures are inconsistent or point outside the file."""


class UnsafeBacking(ImageError):
    """A backing reference that leaves the image's directory, loops, or is too deep."""


class QemuError(SnapfsError):
    """The QEMU that runs a VM failed to answer its monitor (QMP) or refused
    a command.  The message names the socket."""

    errno = errno.EIO


class QemuNotRunning(QemuError):
    """Nothing listens on the QMP socket: the VM is not running (offline)."""


class QemuTimeout(QemuError):
    """QEMU is there but did not answer in time: try again later."""

    errno = errno.EBUSY


class QemuMismatch(Busy):
    """The QEMU attached to a VM does not run the VM's active volumes."""
