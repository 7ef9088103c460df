"""A small Linux guest that really boots in QEMU (TCG), for the tests and
the bench of live snapshots: Debian's own kernel, busybox-static and
qemu-guest-agent, fetched with ``apt-get download`` once and cached.

The guest's initramfs:

- loads the virtio and ext4 modules from the kernel package (in the order
  their ``depends=`` fields give: the package has no modules.dep, depmod
  writes that at install);
- mounts every virtio disk that holds ext4 at ``/mnt/vdX``;
- starts qemu-ga on the ``org.qemu.guest_agent.0`` port (its libraries
  are the host's, which runs the same distribution's QEMU);
- says ``SNAPFS-GUEST-READY`` on the serial console, then writes numbered
  files ``f<i>`` to each disk in turn, each one fsynced before the next
  begins, so that every disk always holds a prefix of the sequence.
"""

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

CACHE_ENV = "SNAPFS_TEST_CACHE"
DEFAULT_CACHE = "/var/cache/snapfs-tests/guest"
READY = "SNAPFS-GUEST-READY"
PACKAGES = ("busybox-static", "qemu-guest-agent")
# Loaded in dependency order; crc32c_generic serves ext4's checksums (the
# kernel would ask modprobe for it, and the guest has no modules.dep).
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
disks=""
for dev in /dev/vd?; do
    name=${dev#/dev/}
    mkdir -p /mnt/$name
    if mount -t ext4 $dev /mnt/$name 2>/dev/null; then disks="$disks $name"; fi
done
for p in /sys/class/virtio-ports/*; do
    if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
        mkdir -p /run /var/run /tmp
        /usr/sbin/qemu-ga -m virtio-serial -p /dev/${p##*/} -t /tmp -f /tmp/qga.pid -d
    fi
done
echo "SNAPFS-GUEST-READY disks:$disks" > /dev/ttyS0
i=0
while :; do
    for d in $disks; do
        echo "file $i of $d" | dd of=/mnt/$d/f$i conv=fsync 2>/dev/null
    done
    i=$((i + 1))
done
"""


def cache_dir():
    path = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _kernel_package():
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True,
                         capture_output=True, text=True).stdout
    found = re.findall(r"Depends: (linux-image-\S+)", out)
    if not found:
        raise RuntimeError(f"apt-cache depends linux-image-amd64 names no kernel: {out}")
    return found[0]


def _download(packages, into):
    """``apt-get download`` each package not in ``into`` yet; -> {name: deb}."""
    debs = {}
    for name in packages:
        have = sorted(into.glob(f"{name}_*.deb"))
        if not have:
            subprocess.run(["apt-get", "download", "-q", name], cwd=into, check=True,
                           capture_output=True)
            have = sorted(into.glob(f"{name}_*.deb"))
        debs[name] = have[-1]
    return debs


def _depends(ko):
    """The ``depends=`` field of a module's .modinfo strings."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9:data.index(b"\0", at + 1)].decode()
    return [d for d in value.split(",") if d]


def _modules(tree):
    """[(name, path)] of MODULES and what they need, dependencies first."""
    by_name = {ko.name[:-3].replace("-", "_"): ko for ko in tree.rglob("*.ko")}
    order = []

    def visit(name):
        name = name.replace("-", "_")
        if name in (n for n, _ in order):
            return
        for dep in _depends(by_name[name]):
            visit(dep)
        order.append((name, by_name[name]))

    for name in MODULES:
        visit(name)
    return order


def _libraries(binary):
    """The shared libraries ``binary`` needs, as the host resolves them."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True,
                         text=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise RuntimeError(f"{binary} needs {missing}, which this host lacks")
    return [Path(p) for p in re.findall(r"(/\S+) \(0x", out)]


def _cpio(root, out):
    listing = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing,
                             check=True, capture_output=True).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(archive)


def build_guest():
    """(kernel, initrd) paths, built into the cache on first use."""
    cache = cache_dir()
    kernel_pkg = _kernel_package()
    debs = _download((kernel_pkg, *PACKAGES), cache)
    key = hashlib.sha256("\n".join([INIT, *MODULES, *(d.name for d in debs.values())])
                         .encode()).hexdigest()[:16]
    kernel, initrd = cache / f"vmlinuz-{key}", cache / f"initrd-{key}.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    work = cache / f"build-{key}"
    shutil.rmtree(work, ignore_errors=True)
    tree, root = work / "tree", work / "root"
    tree.mkdir(parents=True)
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    for sub in ("bin", "modules", "usr/sbin", "proc", "sys", "dev", "mnt", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(tree / "bin/busybox", root / "bin/busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    modules = _modules(tree / "lib/modules")
    for name, ko in modules:
        shutil.copy2(ko, root / "modules" / f"{name}.ko")
    (root / "modules/order").write_text("\n".join(n for n, _ in modules) + "\n")
    agent = tree / "usr/sbin/qemu-ga"
    shutil.copy2(agent, root / "usr/sbin/qemu-ga")
    for lib in _libraries(agent):
        dest = root / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    _cpio(root, work / "initrd.gz")
    shutil.copy2(next((tree / "boot").glob("vmlinuz-*")), work / "vmlinuz")
    os.replace(work / "initrd.gz", initrd)
    os.replace(work / "vmlinuz", kernel)
    shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd


def boot_args(kernel, initrd, serial_log, memory="256"):
    """The arguments that boot the guest (to add to ``vm qemu-args``'s):
    its console goes to ``serial_log``; a panic stops QEMU."""
    return ["-m", memory, "-kernel", kernel, "-initrd", initrd, "-no-reboot",
            "-append", "console=ttyS0 quiet panic=-1", "-serial", f"file:{serial_log}"]


def wait_ready(serial_log, proc, timeout=120):
    """Wait for the guest's ready line; -> the names of the disks it writes.
    TCG boots it in a few seconds; a slow machine gets ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = Path(serial_log).read_text(errors="replace") if Path(serial_log).exists() else ""
        for line in text.splitlines():
            if line.startswith(READY):
                return line.split("disks:", 1)[1].split()
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the guest did not come up (QEMU {proc.poll()}): {text[-2000:]}")
        time.sleep(0.1)


def written_files(root, device):
    """Check what the guest wrote to its disk ``device`` (vda, ...), mounted
    here at ``root``: files
    f0 .. f<n-1> complete, each with its own line, and at most one more,
    f<n>, that the guest was writing (empty or complete).  -> n."""
    names = {p.name for p in Path(root).iterdir() if p.name != "lost+found"}
    numbers = sorted(int(n[1:]) for n in names if re.fullmatch(r"f\d+", n))
    assert len(numbers) == len(names), sorted(names)
    assert numbers == list(range(len(numbers))), f"a gap in {numbers[:5]}..{numbers[-5:]}"
    complete = 0
    for i in numbers:
        data = (Path(root) / f"f{i}").read_bytes()
        if data == f"file {i} of {device}\n".encode():
            complete += 1
            continue
        assert i == numbers[-1] and data == b"", (i, data, len(numbers))
    return complete
