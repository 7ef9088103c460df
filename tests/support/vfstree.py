"""Walking a Vfs by names, as the kernel's lookups would."""

from snapfs.fs.vfs import ROOT_INODE


def path(vfs, *names):
    """The node at ``names`` below the root."""
    node = vfs.node(ROOT_INODE)
    for name in names:
        node = vfs.lookup(node.inode, name)
    return node
