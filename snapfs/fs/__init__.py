"""The mounted namespace: plain objects that answer "what is at this path,
what are its bytes" (``vfs``, ``listings``, ``nodes``, ``views``,
partitions, snapshot.json, control files), the pyfuse3 adapter (``fuse``,
the only module that imports pyfuse3), and mounting (``mount``).

May import ``snapfs.ops``, ``snapfs.store``, ``snapfs.qcow2`` and
``snapfs.errors``.  Only ``fuse`` imports pyfuse3 or trio.
"""
