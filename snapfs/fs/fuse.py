"""The FUSE adapter: translates pyfuse3 calls to ``Vfs`` calls.

This is the only module that imports pyfuse3.  Domain errors become
``FUSEError(errno)`` here, once.  Vfs calls can block on locks and disk
I/O, so they run in worker threads, with two exceptions answered in the
event loop: reads of snapshot views that need no lock and no decompression,
and writes to active views whose VM runs no operation.  A thread hop costs
more than a pread or pwrite of a local disk (scripts/bench.py measured it:
cold reads 2-3x slower, small writes 5x).
"""

import errno
import logging
import os
import signal
import threading

import pyfuse3
import trio

from ..errors import SnapfsError

log = logging.getLogger(__name__)

# Worker threads, in separate pools so that one kind of request cannot
# starve another: writes wait while their VM runs an operation, and an
# operation (a merge) can take minutes; reads must keep flowing meanwhile.
# mkdir, rmdir, mv and touch's create never wait for a busy VM (fs/queue.py):
# they share OPERATION_THREADS.  Control-file writes, the close() that makes
# a touched snapshot and ``touch control/create`` wait for their VM's
# earlier operations (a merge of minutes): each VM has threads of its own
# for those (VM_WAITING_THREADS; enough that a few commands waiting at once
# show in control/status's queue), and more of them wait in the event loop,
# in order, holding no thread.  So a VM's merge and the commands waiting for
# it never take a thread that another VM's operation needs.
READ_THREADS = 8
WRITE_THREADS = 4
OPERATION_THREADS = 4
VM_WAITING_THREADS = 4


class SnapfsOperations(pyfuse3.Operations):
    def __init__(self, vfs):
        super().__init__()
        self.vfs = vfs
        vfs.notify = self._note_invalidation
        vfs.notify_inode = self._note_stale_pages
        self._pending = threading.local()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._readers = trio.CapacityLimiter(READ_THREADS)
        self._writers = trio.CapacityLimiter(WRITE_THREADS)
        self._operations = trio.CapacityLimiter(OPERATION_THREADS)
        self._vm_waiting = {}       # VM name -> CapacityLimiter(VM_WAITING_THREADS)
        self._handles = {}
        self._next_fh = 1

    def _note_invalidation(self, parent, name):
        """Called by the Vfs for each entry an operation changed: collected
        and sent when a request's operation returns, or queued at once when
        no request is waiting (an operation finishing in the background)."""
        items = getattr(self._pending, "items", None)
        if items is None:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
        else:
            items.append((parent, os.fsencode(name)))

    def _note_stale_pages(self, inode):
        """An active view now shows another leaf: drop its cached pages.
        pyfuse3 has no queued variant, so outside a request a short-lived
        thread waits for the kernel instead of the caller."""
        items = getattr(self._pending, "items", None)
        if items is None:
            threading.Thread(target=_invalidate_pages, args=(inode,), daemon=True).start()
        else:
            items.append((inode, None))

    def _operation(self, fn, *args, wait_for_kernel=False):
        """Run an operation in a worker thread, then drop the kernel's
        cached entries it made stale.

        With ``wait_for_kernel`` the invalidation completes before the
        request is answered, so the shell never sees the old entry.  That
        is only safe when the request holds no directory lock (a write to a
        control file); rmdir, mkdir and rename hold the snapshots
        directory's lock, which the kernel needs for the invalidation, so
        theirs are queued for pyfuse3's notification thread instead.
        """
        def call():
            self._pending.items = []
            try:
                return fn(*args)
            finally:
                for parent, name in self._pending.items:
                    if name is None:
                        _invalidate_pages(parent)
                    elif wait_for_kernel:
                        try:
                            pyfuse3.invalidate_entry(parent, name)
                        except (FileNotFoundError, OSError):
                            pass    # not in the kernel's cache
                    else:
                        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
                self._pending.items = None
        return call

    async def _run(self, fn, *args, limiter=None):
        """Run a Vfs call in a worker thread, mapping errors to errno."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self._readers)
        except (SnapfsError, OSError) as e:
            raise _fuse_error(e) from None
        except Exception:
            # A bug: this request fails with EIO and the traceback goes to
            # the log; the mount, and every other VM's files, stay up.
            log.exception("internal error in %s", getattr(fn, "__qualname__", fn))
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _attrs(self, node):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = node.timeout
        attr.attr_timeout = node.timeout
        guest = self.vfs.guest_stat(node)
        if guest is not None:
            return self._guest_attrs(attr, guest)
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

    def _guest_attrs(self, attr, st):
        """A file in a tree: the guest's owner, mode, links and times (the
        kernel checks the modes against host users), or, with the mount
        option ``owner_files``, the mount owner's with no group or other
        bits."""
        if self.vfs.owner_files:
            attr.st_mode = st.mode & ~0o077
            attr.st_uid, attr.st_gid = self.uid, self.gid
        else:
            attr.st_mode, attr.st_uid, attr.st_gid = st.mode, st.uid, st.gid
        attr.st_nlink = st.nlink
        attr.st_rdev = st.rdev
        attr.st_size = st.size
        attr.st_blksize = 1 << 16
        attr.st_blocks = -(-st.size // 512)
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = st.atime_ns, st.mtime_ns, st.ctime_ns
        return attr

    def _waiting_limiter(self, node):
        """The limiter of a request to ``node`` (a Node or an inode): the
        VM's own for control files and touched snapshots, whose requests
        may wait for the VM's earlier operations."""
        if isinstance(node, int):
            try:
                node = self.vfs.node(node)
            except SnapfsError:
                node = None
        if node is None or node.vm is None or not (node.control or node.key == "creating"):
            return self._operations
        limiter = self._vm_waiting.get(node.vm.name)
        if limiter is None:
            limiter = self._vm_waiting[node.vm.name] = trio.CapacityLimiter(VM_WAITING_THREADS)
        return limiter

    def _new_fh(self, handle):
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh):
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _owner_only(self, ctx):
        # default_permissions checks modes; this also covers root-owned
        # mounts shared with allow_other.
        if ctx is not None and ctx.uid not in (0, self.uid):
            raise pyfuse3.FUSEError(errno.EACCES)

    # -- metadata -------------------------------------------------------

    # One worker call per request: a thread hop costs more than the work.

    async def lookup(self, parent_inode, name, ctx=None):
        return await self._run(lambda: self._attrs(self.vfs.lookup(parent_inode,
                                                                   os.fsdecode(name))))

    async def getattr(self, inode, ctx=None):
        return await self._run(lambda: self._attrs(self.vfs.node(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        # touch control/create is a change: only the owner (an open for
        # writing is checked in open(), but utimensat() needs no open).
        self._owner_only(ctx)
        size = attr.st_size if fields.update_size else None
        touch = fields.update_atime or fields.update_mtime
        other = fields.update_mode or fields.update_uid or fields.update_gid
        node = await self._run(self._operation(self.vfs.setattr, inode, size, touch, other,
                                               wait_for_kernel=True),
                               limiter=self._waiting_limiter(inode))
        return await self._run(self._attrs, node)

    async def readlink(self, inode, ctx):
        target = await self._run(self.vfs.readlink, inode)
        return os.fsencode(target)

    async def getxattr(self, inode, name, ctx):
        # In the event loop when a tree has the file's attributes at hand.
        try:
            value = self.vfs.getxattr(inode, name, wait=False)
        except (SnapfsError, OSError) as e:
            raise _fuse_error(e) from None
        if value is None:
            value = await self._run(self.vfs.getxattr, inode, name)
        return value

    async def listxattr(self, inode, ctx):
        return list(await self._run(self.vfs.listxattr, inode))

    async def opendir(self, inode, ctx):
        # A directory of a file tree seen before is answered here, without
        # a thread (fs/filetree.py): a warm find opens every directory.
        node = self._nowait(self.vfs.node_nowait, inode)
        if node is None:
            node = await self._run(self.vfs.node, inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        # pyfuse3 asks for readdirplus: each entry goes with its attributes,
        # and the kernel needs no lookup or getattr for it.  The kernel asks
        # for a page of entries at a time, then once more past the end.
        entries = self._nowait(self.vfs.tree_listing, fh, wait=False)
        first = 0
        if entries is None:
            first, entries = await self._run(self._listing, fh, start_id)
        for index in range(start_id, first + len(entries)):
            name, item = entries[index - first]
            attrs = item if isinstance(item, pyfuse3.EntryAttributes) else self._tree_attrs(item)
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    @staticmethod
    def _nowait(fn, *args, **kw):
        """A call in the event loop that may answer None (then a worker
        thread asks again): its failures are the worker's to report."""
        try:
            return fn(*args, **kw)
        except Exception:
            return None

    def _listing(self, inode, start_id):
        """(index of the first, [(name, GuestEntry or attributes)]) of a
        directory, in a worker thread: a tree's whole listing as it keeps
        it, or another directory's entries from ``start_id`` on, with their
        attributes made now (they may change)."""
        entries = self.vfs.tree_listing(inode)
        if entries is not None:
            return 0, entries
        entries = self.vfs.listdir(inode)[start_id:]
        return start_id, [(os.fsencode(name), self._attrs(node)) for name, node in entries]

    def _tree_attrs(self, entry):
        """The attributes of an entry of a tree's listing, kept with it: a
        snapshot never changes (and _attrs of a GuestEntry reads nothing)."""
        if entry.attrs is None:
            entry.attrs = self._attrs(entry)
        return entry.attrs

    async def releasedir(self, fh):
        pass

    async def forget(self, inode_list):
        # Nodes in the tree live as long as the mount; the ones that left it
        # are dropped once the kernel forgets them (counts need no tracking:
        # the kernel forgets a node only when it is done with it).
        self.vfs.forget([inode for inode, _ in inode_list])

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

    # -- the namespace as a command line ----------------------------------

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._owner_only(ctx)
        node = await self._run(self._operation(self.vfs.mkdir, parent_inode, os.fsdecode(name)),
                               limiter=self._operations)
        return await self._run(self._attrs, node)

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._owner_only(ctx)
        handle, node = await self._run(
            self._operation(self.vfs.create_file, parent_inode, os.fsdecode(name),
                            bool(flags & os.O_TRUNC)),
            limiter=self._operations)
        attrs = await self._run(self._attrs, node)
        return pyfuse3.FileInfo(fh=self._new_fh(handle)), attrs

    async def rmdir(self, parent_inode, name, ctx):
        self._owner_only(ctx)
        await self._run(self._operation(self.vfs.rmdir, parent_inode, os.fsdecode(name)),
                        limiter=self._operations)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._owner_only(ctx)
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._run(self._operation(self.vfs.rename, parent_inode_old, os.fsdecode(name_old),
                                        parent_inode_new, os.fsdecode(name_new)),
                        limiter=self._operations)

    # -- file contents --------------------------------------------------

    async def open(self, inode, flags, ctx):
        mode = flags & os.O_ACCMODE
        writable = mode != os.O_RDONLY
        if writable or flags & os.O_TRUNC:     # O_TRUNC asks for a change too
            self._owner_only(ctx)
        handle = await self._run(self.vfs.open, inode, writable, mode != os.O_WRONLY)
        node = handle.node
        # Immutable views may stay in the page cache across opens; status
        # is made at open and has no fixed size.  A throwaway overlay's
        # bytes must never enter the page cache that the view's other
        # readers share.
        private = handle.overlay is not None
        return pyfuse3.FileInfo(fh=self._new_fh(handle), keep_cache=node.immutable and not private,
                                direct_io=node.control is not None or private or node.shared)

    async def read(self, fh, off, size):
        handle = self._handle(fh)
        try:
            data = self.vfs.read_nowait(handle, off, size)
        except (SnapfsError, OSError) as e:
            raise _fuse_error(e) from None
        if data is None:
            data = await self._run(self.vfs.read, handle, off, size)
        return data

    async def write(self, fh, off, buf):
        handle = self._handle(fh)
        if handle.node.control:
            return await self._run(self._operation(self.vfs.write, handle, off, buf,
                                                   wait_for_kernel=True),
                                   limiter=self._waiting_limiter(handle.node))
        try:
            written = self.vfs.write_nowait(handle, off, buf)
        except (SnapfsError, OSError) as e:
            raise _fuse_error(e) from None
        if written is None:
            written = await self._run(self.vfs.write, handle, off, buf, limiter=self._writers)
        return written

    async def fsync(self, fh, datasync):
        await self._run(self.vfs.fsync, self._handle(fh), limiter=self._writers)

    async def flush(self, fh):
        # close(): runs a control command left without a newline, or creates
        # the snapshot a touch opened; the error is close()'s.
        handle = self._handle(fh)
        if self.vfs.needs_flush(handle):
            await self._run(self._operation(self.vfs.flush, handle, wait_for_kernel=True),
                            limiter=self._waiting_limiter(handle.node))

    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        self.vfs.closed(handle)
        if self.vfs.needs_release(handle):
            await self._run(self.vfs.release, handle, limiter=self._writers)


def _fuse_error(e):
    """The FUSEError for a domain or OS error; I/O errors are logged."""
    if isinstance(e, SnapfsError):
        if e.errno == errno.EIO:
            log.error("%s", e)
        return pyfuse3.FUSEError(e.errno)
    log.error("I/O error: %s", e)
    return pyfuse3.FUSEError(e.errno or errno.EIO)


def _invalidate_pages(inode):
    try:
        pyfuse3.invalidate_inode(inode, attr_only=False)
    except OSError:
        pass    # nothing cached


def mount_options(store_path, allow_other=False, extra=()):
    options = set(pyfuse3.default_options)
    options |= {f"fsname=snapfs:{store_path}", "subtype=snapfs"}
    if allow_other:
        options.add("allow_other")
    options |= set(extra)
    return options


_UNMOUNT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(vfs, mountpoint, options, ready=None, *, on_signal):
    """Mount and serve until unmounted.  ``ready()`` is called once the
    mount is visible.  Raises OSError / RuntimeError if mounting fails.

    SIGTERM, SIGINT and SIGHUP call ``on_signal(signum)`` in a thread while
    the loop goes on answering requests (an unmount needs them answered).
    It unmounts, never lazily, and returns True, or returns False when it
    cannot (the mount is busy) and serving goes on.  Only the kernel ending
    the connection, that is an unmount, ends serving."""
    # A signal that arrives before the loop listens (while mounting, in
    # ready()) waits for it, instead of killing the daemon and leaving the
    # mount attached and dead.
    early = []
    previous = {s: signal.signal(s, lambda signum, _frame: early.append(signum))
                for s in _UNMOUNT_SIGNALS}
    try:
        ops = SnapfsOperations(vfs)
        pyfuse3.init(ops, mountpoint, options)
        try:
            if ready is not None:
                ready()
            trio.run(_main, on_signal, early)
        finally:
            # Never unmount here: fuse_session_unmount() detaches lazily
            # (umount2 MNT_DETACH, or fusermount3 -u -z), which cuts open
            # files and loop devices off with ENOTCONN.  pyfuse3.main()
            # returns only once the kernel has ended the connection (the
            # mount is gone, or was aborted).  After an error the mount may
            # be in use; it stays visible (answering ENOTCONN) until
            # someone unmounts it, rather than vanishing under its users.
            pyfuse3.close(unmount=False)
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


async def _main(on_signal, early):
    """Serve until unmounted; SIGTERM/SIGINT/SIGHUP ask for an unmount."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_unmount_on_signal, on_signal, early)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _unmount_on_signal(on_signal, early):
    """Each signal is one attempt to unmount (``early`` holds signals that
    came before this listened; one attempt answers them all)."""
    with trio.open_signal_receiver(*_UNMOUNT_SIGNALS) as signals:
        if early and await _try_unmount(on_signal, early[-1]):
            await trio.sleep_forever()
        async for signum in signals:
            if await _try_unmount(on_signal, signum):
                # pyfuse3.main() returns as soon as the kernel ends the
                # connection, which cancels this task.  Until then the
                # receiver stays open, so that another signal cannot kill
                # the daemon half-way through its exit.
                await trio.sleep_forever()


async def _try_unmount(on_signal, signum):
    log.info("signal %d: unmounting", signum)
    try:
        return await trio.to_thread.run_sync(on_signal, signum)
    except Exception:   # a failed attempt must not take the mount down
        log.exception("signal %d: cannot unmount", signum)
        return False
