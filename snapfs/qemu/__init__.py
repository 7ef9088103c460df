"""Running VMs: reaching the QEMU that runs a VM (QMP, later its guest
agent), the host-local records that say where it is, the arguments that
start it on the store's volumes, and the check that it really runs them.

A layer between ``ops`` (which decides what an operation does) and
``store`` (manifests and volumes).  Nothing here imports trio or pyfuse3:
everything is synchronous and runs in the thread of the operation.
"""
