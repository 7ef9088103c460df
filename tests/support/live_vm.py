"""A store's VM running in a real QEMU (CPUs stopped, TCG) for the tests of
live operations: guest writes go through QEMU's own qemu-io on the guest
device (HMP), and a byte model of each disk says what every view must
hold.

QEMU gets a second QMP monitor (``ctl``) for the test's own commands (the
guest's writes, ``job-pause``): QEMU serves one client per monitor at a
time, and snapfs may hold the attached one for as long as a merge runs."""

import contextlib
import json
from pathlib import Path

from snapfs.qemu.args import disk_id, opt
from snapfs.qemu.qmp import QmpSession
from tests.support.mounting import snapfs
from tests.support.qemu import check, info_chain, is_clean, to_raw
from tests.support.qemu_vm import qemu_running


class LiveVm:
    """VM ``name`` of ``store``; ``model[disk]`` is what the guest wrote."""

    def __init__(self, store, name, tmp, sizes):
        self.store, self.name, self.tmp = Path(store), name, Path(tmp)
        self.qmp = self.tmp / f"{name}.qmp"
        self.agent = self.tmp / f"{name}.qga"
        self.ctl = self.tmp / f"{name}.ctl.qmp"
        self.model = {disk: bytearray(size) for disk, size in sizes.items()}
        self.proc = None

    @property
    def dir(self):
        return self.store / "vms" / self.name

    def manifest(self):
        return json.loads((self.dir / "manifest.json").read_text())

    @contextlib.contextmanager
    def running(self, agent=False, boot=()):
        """QEMU started with ``vm qemu-args`` and attached; stopped by PID on
        exit.  Its CPUs stay stopped unless ``boot`` gives the arguments of
        a guest to boot; without one, an agent channel has nobody on it."""
        extra = ["--guest-agent", self.agent] if agent else []
        args = snapfs("vm", "qemu-args", self.store, self.name, "--qmp", self.qmp,
                      *extra).stdout.splitlines()
        args += ["-chardev", f"socket,id=test-ctl,path={opt(str(self.ctl))},server=on,wait=off",
                 "-mon", "chardev=test-ctl,mode=control"]
        with qemu_running([*args, *boot], self.qmp, self.tmp / f"{self.name}.qemu.log",
                          stopped=not boot) as proc:
            self.proc = proc
            self.attach(agent)
            try:
                yield proc
            finally:
                self.proc = None

    def attach(self, agent):
        """(Re-)attach the running QEMU, with or without its agent channel."""
        extra = ["--guest-agent", self.agent] if agent else []
        snapfs("vm", "attach", self.store, self.name, "--qmp", self.qmp, *extra)

    def hmp(self, command):
        with QmpSession(self.ctl) as q:
            return q.execute("human-monitor-command", {"command-line": command})

    def io(self, disk, command):
        # Its output is not reliable (QEMU 7.2 loses it once another QMP
        # client has come and gone): the views checked later are the proof.
        self.hmp(f'qemu-io -d /machine/peripheral/{disk_id(disk)}/virtio-backend "{command}"')

    def write(self, disk, pattern, offset, length, flush=False):
        """The guest writes ``pattern`` at ``offset``; with ``flush``, it
        also flushes (QEMU writes its qcow2 metadata out)."""
        # QEMU's qemu-io refuses a write past the end, silently here (see io).
        assert offset + length <= len(self.model[disk]), (disk, offset, length)
        self.io(disk, f"write -P {pattern:#x} {offset} {length}")
        self.model[disk][offset:offset + length] = bytes([pattern]) * length
        if flush:
            self.io(disk, "flush")

    def snapshot_model(self):
        return {disk: bytes(data) for disk, data in self.model.items()}

    def tops(self):
        """{disk: the file QEMU's device of that disk writes}."""
        with QmpSession(self.ctl) as q:
            devices = {d["qdev"]: d["inserted"] for d in q.execute("query-block")}
        out = {}
        for disk in self.model:
            node = devices[f"/machine/peripheral/{disk_id(disk)}/virtio-backend"]
            out[disk] = node["file"] if not node["file"].startswith("json:") else \
                json.loads(node["file"][5:])["file"]["filename"]
        return out

    # -- oracles (after QEMU quit, or its image locks refuse) ---------------

    def view(self, vid):
        m = self.manifest()
        return to_raw(self.dir / vid, fmt=m["volumes"][vid]["format"])

    def check_volumes(self):
        """Every volume qemu-img-clean, every backing name bare, no file the
        manifest doesn't name."""
        m = self.manifest()
        for vid, vol in m["volumes"].items():
            if vol["format"] == "qcow2":
                report = check(self.dir / vid)
                assert is_clean(report), (vid, report)
        for vid in m["active"].values():
            for image in info_chain(self.dir / vid):
                backing = image.get("backing-filename")
                assert backing is None or "/" not in backing, image
        files = {p.name for p in self.dir.iterdir() if p.name != "manifest.json"}
        assert files == set(m["volumes"]), files ^ set(m["volumes"])
