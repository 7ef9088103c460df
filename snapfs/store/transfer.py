"""Copy volume files: sparse-aware, durable, with a progress bar for big ones."""

import errno
import os

from tqdm import tqdm

from ..errors import ImageError, NoSpace
from ..qcow2.create import IMAGE_MODE
from ..qcow2.filerange import write_all
from ..qcow2.mapping import ZERO

CHUNK = 8 << 20
PROGRESS_THRESHOLD = 64 << 20   # smaller copies finish before a bar is useful


def _data_segments(fd, size):
    """(offset, length) of the data regions; holes are skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # only a hole remains
                return
            yield pos, size - pos        # no SEEK_DATA support: copy everything
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def copy_file(src, dst, progress=None):
    """Copy ``src`` to the new file ``dst`` keeping holes, then fsync it.
    ``dst`` is mode 0600 whatever the umask or the mode of ``src``: a copy
    into the store is as private as the images snapfs makes.

    ``progress`` (None: automatic) shows a bar for copies above 64 MiB on a
    terminal.  Raises NoSpace or ImageError; a partial ``dst`` is removed.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
        try:
            os.fchmod(dfd, IMAGE_MODE)
            show = progress if progress is not None else size >= PROGRESS_THRESHOLD
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(src), disable=not show or None,
                      leave=False) as bar:
                done = 0
                for offset, length in list(_data_segments(sfd, size)):
                    end = offset + length
                    bar.update(offset - done)
                    while offset < end:
                        n = _copy_range(sfd, dfd, offset, min(CHUNK, end - offset))
                        if n == 0:
                            break
                        offset += n
                        bar.update(n)
                    done = offset
                bar.update(size - done)
            os.ftruncate(dfd, size)
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            os.unlink(dst)
            raise
        os.close(dfd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(f"{dst}: no space left while copying {src}") from None
        raise ImageError(src, f"cannot copy: {e.strerror}") from None
    finally:
        os.close(sfd)


def _copy_range(sfd, dfd, offset, length):
    try:
        return os.copy_file_range(sfd, dfd, length, offset, offset)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(sfd, length, offset)
    return os.pwrite(dfd, data, offset)


def flatten_to_raw(chain, dst, label, progress=None):
    """Write the bytes of ``chain`` (a store.chain.Chain) to the new raw
    file ``dst``: only what is not zero is written, so the file stays
    sparse; then fsync it.  The progress bar (as ``copy_file``'s) is
    labelled ``label``.  Raises NoSpace or ImageError; a partial ``dst``
    is removed."""
    size = chain.size
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
    try:
        os.fchmod(dfd, IMAGE_MODE)
        show = progress if progress is not None else size >= PROGRESS_THRESHOLD
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not show or None, leave=False) as bar:
            for start, length, kind, _ in list(chain.extents()):
                if kind != ZERO:
                    for at in range(start, start + length, CHUNK):
                        data = chain.read(at, min(CHUNK, start + length - at))
                        if data.count(0) != len(data):
                            write_all(dfd, data, at)
                bar.update(length)
        os.ftruncate(dfd, size)
        os.fsync(dfd)
    except BaseException as e:
        os.close(dfd)
        os.unlink(dst)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise NoSpace(f"{dst}: no space left while writing {label}") from None
        if isinstance(e, OSError):
            raise ImageError(dst, f"cannot write: {e.strerror}") from None
        raise
    os.close(dfd)
