"""The FUSE adapter: translates pyfuse3 calls to ``Vfs`` calls.

This is the only module that imports pyfuse3.  Domain errors become
``FUSEError(errno)`` here, once.  Vfs calls can block on disk I/O, so they
run in worker threads; the trio loop only shuffles requests.
"""

import errno
import logging
import os
import signal
import stat

import pyfuse3
import trio

from .errors import SnapfsError

log = logging.getLogger(__name__)

# Enough worker threads to overlap reads of different views; the machine
# has few cores and reads are mostly page-cache hits.
WORKER_THREADS = 8


class SnapfsOperations(pyfuse3.Operations):
    def __init__(self, vfs):
        super().__init__()
        self.vfs = vfs
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._limiter = trio.CapacityLimiter(WORKER_THREADS)

    async def _run(self, fn, *args):
        """Run a Vfs call in a worker thread, mapping errors to errno."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except SnapfsError as e:
            if e.errno == errno.EIO:
                log.error("%s", e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.error("I/O error: %s", e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    def _attrs(self, node):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = node.timeout
        attr.attr_timeout = node.timeout
        attr.st_mode = node.mode
        attr.st_nlink = 2 if node.is_dir else 1
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_rdev = 0
        size = self.vfs.size(node)
        attr.st_size = size
        attr.st_blksize = 1 << 16
        attr.st_blocks = -(-size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    # -- metadata -------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        node = await self._run(self.vfs.lookup, parent_inode, os.fsdecode(name))
        return await self._run(self._attrs, node)

    async def getattr(self, inode, ctx=None):
        node = await self._run(self.vfs.node, inode)
        return await self._run(self._attrs, node)

    async def readlink(self, inode, ctx):
        target = await self._run(self.vfs.readlink, inode)
        return os.fsencode(target)

    async def opendir(self, inode, ctx):
        node = await self._run(self.vfs.node, inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = await self._run(self.vfs.listdir, fh)
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            attrs = await self._run(self._attrs, node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                break

    async def releasedir(self, fh):
        pass

    async def forget(self, inode_list):
        # Inodes live as long as the mount; the kernel's counts need no action.
        pass

    async def statfs(self, ctx):
        st = os.statvfs(self.vfs.store.path)
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = 255
        return data

    # -- file contents --------------------------------------------------

    async def open(self, inode, flags, ctx):
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        node = await self._run(self.vfs.open, inode, bool(writable))
        # Immutable views may stay in the page cache across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=node.immutable)

    async def read(self, fh, off, size):
        return await self._run(self.vfs.read, fh, off, size)

    async def release(self, fh):
        pass

    async def access(self, inode, mode, ctx):
        node = await self._run(self.vfs.node, inode)
        if mode & os.W_OK and not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EROFS)
        return True


def mount_options(store_path, allow_other=False, extra=()):
    options = set(pyfuse3.default_options)
    options |= {f"fsname=snapfs:{store_path}", "subtype=snapfs", "ro"}
    if allow_other:
        options.add("allow_other")
    options |= set(extra)
    return options


def serve(vfs, mountpoint, options, ready=None):
    """Mount and serve until unmounted.  ``ready()`` is called once the
    mount is visible.  Raises OSError / RuntimeError if mounting fails."""
    ops = SnapfsOperations(vfs)
    pyfuse3.init(ops, mountpoint, options)
    clean = False
    try:
        if ready is not None:
            ready()
        trio.run(_main)
        clean = True
    finally:
        pyfuse3.close(unmount=clean)


async def _main():
    """Serve until unmounted, or until SIGTERM/SIGINT/SIGHUP, which unmount."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal():
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
