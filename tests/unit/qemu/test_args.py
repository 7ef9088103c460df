"""QEMU ids of disks and the qemu-system arguments of a VM."""

import re

import pytest

from snapfs.errors import InvalidArgument
from snapfs.qemu.args import ID_MAX, disk_id, disk_ids, opt, qemu_args

VALID_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def test_a_plain_disk_name_keeps_its_name():
    assert disk_id("sda") == "snapfs-sda"
    assert disk_id("data-1.x_y") == "snapfs-data-1.x_y"


@pytest.mark.parametrize("name", ["data disk", "ü", "a:b,c=d", "1", "x" * 200,
                                  "x" * (ID_MAX - len("snapfs-") + 1), "-", "'; rm -rf /"])
def test_every_disk_name_maps_to_a_valid_short_id(name):
    ident = disk_id(name)
    assert VALID_ID.match(ident) and len(ident) <= ID_MAX, ident
    assert disk_id(name) == ident                       # deterministic


def test_names_that_clean_up_alike_stay_apart():
    names = ["data disk", "data:disk", "data_disk", "x" * 40, "x" * 41, "x" * 40 + "y"]
    ids = disk_ids(names)
    assert len(set(ids.values())) == len(names)
    assert ids["data_disk"] == "snapfs-data_disk"
    assert ids["data disk"].startswith("snapfs-data_disk-")


def test_commas_in_values_are_doubled_and_newlines_refused():
    assert opt("/a,b/c") == "/a,,b/c"
    with pytest.raises(InvalidArgument):
        opt("/a\nb")


def test_arguments_per_disk_then_qmp_then_agent():
    args = qemu_args({"sda": ("/s/vms/web/u1", "qcow2"), "data disk": ("/s/v,x/u2", "qcow2")},
                     qmp="/run/q.sock", guest_agent="/run/ga.sock")
    assert args[:8] == [
        "-blockdev", "driver=qcow2,node-name=snapfs-sda,file.driver=file,"
                     "file.filename=/s/vms/web/u1",
        "-device", "virtio-blk-pci,drive=snapfs-sda,id=snapfs-sda",
        "-blockdev", f"driver=qcow2,node-name={disk_id('data disk')},file.driver=file,"
                     f"file.filename=/s/v,,x/u2",
        "-device", f"virtio-blk-pci,drive={disk_id('data disk')},id={disk_id('data disk')}"]
    assert args[8:] == [
        "-chardev", "socket,id=snapfs-qmp,path=/run/q.sock,server=on,wait=off",
        "-mon", "chardev=snapfs-qmp,mode=control",
        "-chardev", "socket,id=snapfs-qga,path=/run/ga.sock,server=on,wait=off",
        "-device", "virtio-serial",
        "-device", "virtserialport,chardev=snapfs-qga,name=org.qemu.guest_agent.0"]


def test_no_monitor_unless_asked():
    args = qemu_args({"sda": ("/s/u1", "qcow2")})
    assert args == ["-blockdev", "driver=qcow2,node-name=snapfs-sda,file.driver=file,"
                                 "file.filename=/s/u1",
                    "-device", "virtio-blk-pci,drive=snapfs-sda,id=snapfs-sda"]
