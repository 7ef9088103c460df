"""Operations on a VM, each atomic across its disks and safe against
crashes: create, delete by merge, rename, preview, commit, undo
(``operations``), the steps that finish them (``finish``, ``merge``),
recovery after a crash (``recovery``), importing images (``importer``,
``discover``, ``disk_kinds``), and cloning a VM from a snapshot (``clone``).

May import ``snapfs.store``, ``snapfs.qcow2`` and ``snapfs.errors``.  What it
needs of a mount it asks through ``users.Users``; it knows no FUSE.
"""
