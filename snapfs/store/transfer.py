"""Copy volume files: sparse-aware, durable, with a progress bar for big ones."""

import errno
import os

from tqdm import tqdm

from ..errors import ImageError, NoSpace
from ..qcow2.create import IMAGE_MODE

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
