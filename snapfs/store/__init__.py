"""The store on disk: its directory and writer lock, each VM's manifest,
names, volumes opened read-only and flattened into chains, writers for
merges, copies into the store, crash points, the QEMU image-lock probe,
and ``snapfs check``.

May import ``snapfs.qcow2`` and ``snapfs.errors``; nothing above it.
"""
