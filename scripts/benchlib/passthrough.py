#!/usr/bin/env python3
"""A minimal pyfuse3 passthrough of one file: the FUSE ceiling for reads.

    passthrough.py SOURCE MOUNTPOINT     (serves MOUNTPOINT/file until unmounted)

Buffered, keep_cache, reads answered in the event loop with one pread:
whatever snapfs cannot beat here is the cost of the kernel's FUSE path and
of pyfuse3, not of snapfs.  Used by the reads group as a second reference.
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio

NAME = b"file"


class Passthrough(pyfuse3.Operations):
    def __init__(self, source):
        super().__init__()
        self.fd = os.open(source, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attrs(self, inode):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o444, 1, self.size
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(2)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(2), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)


def main():
    source, mountpoint = sys.argv[1:3]
    pyfuse3.init(Passthrough(source), mountpoint, set(pyfuse3.default_options))
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
