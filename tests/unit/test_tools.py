"""The host vocabulary: qemu-img, ip and process readers build the argv they should and parse what they get."""
import os
import subprocess
import time
from dataclasses import dataclass

import pytest

from pytest_kvmcheck.errors import HostError
from pytest_kvmcheck.hosts.local import LocalHost
from pytest_kvmcheck.hosts.spec import HostSpec
from pytest_kvmcheck.hosts.tools import (Ip, QemuImg, hugetlb_kib, mergeable_kib, open_to_others, parse_ss, parse_status, path_access,
                                         rss_outside_kib)
from pytest_kvmcheck.hosts.transport import CommandResult


@dataclass
class RecordingHost:
    """Records argv and answers with a canned result: the unit under test is the argv."""

    stdout: str = ""
    exit_status: int = 0

    def __post_init__(self):
        self.name, self.spec, self.calls = "h1", HostSpec(name="h1", qemu_img="/opt/qemu/bin/qemu-img"), []

    def run(self, argv, timeout=60.0, input=None, root=False):
        self.calls.append(["(root)", *argv] if root else list(argv))
        return CommandResult(tuple(argv), self.exit_status, self.stdout, "boom" if self.exit_status else "")


def test_qemu_img_create_and_overlay():
    host = RecordingHost()
    img = QemuImg(host)
    assert img.create("/w/d.qcow2", 32) == "/w/d.qcow2"
    img.create("/w/o.qcow2", backing="/w/base.raw", backing_fmt="raw")
    img.create("/w/d.raw", 16, fmt="raw")
    assert host.calls == [
        ["/opt/qemu/bin/qemu-img", "create", "-q", "-f", "qcow2", "/w/d.qcow2", "32M"],
        ["/opt/qemu/bin/qemu-img", "create", "-q", "-f", "qcow2", "-b", "/w/base.raw", "-F", "raw", "/w/o.qcow2"],
        ["/opt/qemu/bin/qemu-img", "create", "-q", "-f", "raw", "/w/d.raw", "16M"]]


def test_qemu_img_convert_compare_and_map():
    host = RecordingHost(stdout='[{"start": 0, "length": 4096, "depth": 0, "data": true},'
                                ' {"start": 4096, "length": 8192, "depth": 1, "data": true},'
                                ' {"start": 12288, "length": 512, "depth": 0, "data": false}]')
    img = QemuImg(host)
    img.convert("/w/a.vmdk", "/w/a.qcow2", "qcow2", source_fmt="vmdk")
    img.convert("/w/a.raw", "/w/b.vmdk", "vmdk", options="subformat=streamOptimized")
    img.compare("/w/a.vmdk", "/w/a.qcow2", "vmdk", "qcow2")
    assert img.allocated_bytes("/w/a.qcow2") == 4096
    assert host.calls[:3] == [
        ["/opt/qemu/bin/qemu-img", "convert", "-q", "-f", "vmdk", "-O", "qcow2", "/w/a.vmdk", "/w/a.qcow2"],
        ["/opt/qemu/bin/qemu-img", "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized", "/w/a.raw",
         "/w/b.vmdk"],
        ["/opt/qemu/bin/qemu-img", "compare", "-f", "vmdk", "-F", "qcow2", "/w/a.vmdk", "/w/a.qcow2"]]
    assert host.calls[3][1:4] == ["map", "-U", "--output=json"]


def test_a_failed_step_names_the_host_and_qemu_img():
    with pytest.raises(HostError, match="qemu-img create on h1 failed with exit status 1: boom"):
        QemuImg(RecordingHost(exit_status=1)).create("/w/d.qcow2", 1)


def test_ip():
    host = RecordingHost()
    Ip(host).add_address("kc0001n1", "10.201.0.1/30")
    Ip(host).link_up("kc0001n1", master="br0")
    assert host.calls == [["(root)", "ip", "addr", "add", "10.201.0.1/30", "dev", "kc0001n1"],
                          ["(root)", "ip", "link", "set", "kc0001n1", "master", "br0", "up"]]
    assert Ip(RecordingHost(stdout="5: br0    inet 10.77.0.1/24 brd 10.77.0.255 scope global br0\n")).ipv4_cidr("br0") \
        == "10.77.0.1/24"


def test_listeners_of_one_process():
    tcp = ('LISTEN 0 1 127.0.0.1:40147 0.0.0.0:* users:(("qemu-system-x86",pid=4242,fd=12))\n'
           'LISTEN 0 1 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=1,fd=3))\n'
           'LISTEN 0 1 127.0.0.1:5900 0.0.0.0:* users:(("qemu-system-x86",pid=42420,fd=9))\n')
    assert parse_ss(tcp, 4242, "tcp") == ["127.0.0.1:40147"]
    unix = 'u_str LISTEN 0 1 /run/k/qmp.sock 123 * 0 users:(("qemu-system-x86",pid=4242,fd=5))\n'
    assert parse_ss(unix, 4242, "unix") == ["/run/k/qmp.sock"]


def test_status_and_mergeable_memory():
    assert parse_status("Name:\tqemu\nSeccomp:\t2\nUid:\t65534\t65534\t65534\t65534\n")["Seccomp"] == "2"
    smaps = ("7f00-7f10 rw-p 0 0:0 0\nSize:  1024 kB\nVmFlags: rd wr mr mw me ac sd mg\n"
             "7f20-7f30 rw-p 0 0:0 0\nSize:  2048 kB\nVmFlags: rd wr mr mw me ac sd\n"
             "7f40-7f50 rw-p 0 0:0 0\nSize:  4096 kB\nVmFlags: mg rd\n")
    assert mergeable_kib(smaps) == 5120


def test_resident_memory_outside_guest_ram():
    smaps = ("7f00-7f10 rw-p 0 0:0 0\nSize:  524288 kB\nRss:  300000 kB\nVmFlags: rd wr mg\n"  # the guest's RAM
             "7f20-7f30 rw-p 0 0:0 0\nSize:  2048 kB\nRss:  1000 kB\nVmFlags: rd wr\n"
             "7f40-7f50 r-xp 0 0:0 0\nSize:  8192 kB\nRss:  5000 kB\nVmFlags: rd ex\n")
    assert rss_outside_kib(smaps, 524288) == 6000
    assert rss_outside_kib(smaps, 1024) == 306000  # no mapping of that size: everything counts


STAT = ("755 root root socket|/tmp/kc/vm-1/qmp.sock\n755 root root directory|/tmp/kc/vm-1\n"
        "755 root root directory|/tmp/kc\n1777 root root directory|/tmp\n755 root root directory|/\n")


def test_path_access_stats_the_path_and_every_directory_above():
    host = RecordingHost(stdout=STAT)
    chain = path_access(host, "/tmp/kc/vm-1/qmp.sock")
    assert host.calls == [["(root)", "stat", "-c", "%a %U %G %F|%n", "/tmp/kc/vm-1/qmp.sock", "/tmp/kc/vm-1",
                           "/tmp/kc", "/tmp", "/"]]
    assert (chain[0].kind, chain[0].mode, chain[0].owner) == ("socket", 0o755, "root")
    assert open_to_others(chain) == ""  # others may not write to the socket


def test_a_world_writable_socket_is_open_only_if_every_directory_lets_others_through():
    chain = path_access(RecordingHost(stdout=STAT.replace("755 root root socket", "777 root root socket")), "/x")
    assert "mode 777 (root:root)" in open_to_others(chain)
    closed = STAT.replace("755 root root socket", "777 root root socket").replace(
        "755 root root directory|/tmp/kc\n", "700 root root directory|/tmp/kc\n")
    assert open_to_others(path_access(RecordingHost(stdout=closed), "/x")) == ""


def test_a_zombie_is_not_alive():
    """A process that exited but was not reaped yet (a daemonized QEMU waits for init) is gone."""
    child = subprocess.Popen(["true"])
    host = LocalHost(HostSpec(name="local", transport="local"))
    deadline = time.monotonic() + 5
    while "Z" not in open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[:1] and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    assert not host.pid_alive(child.pid)
    child.wait()
    assert not host.pid_alive(child.pid) and host.pid_alive(os.getpid())


def test_huge_page_mappings_are_counted_by_their_flag():
    smaps = ("7f00-7f10 rw-s 0 00:0f 1 /memfd:kvmcheck-ram (deleted)\nSize: 262144 kB\nRss: 0 kB\n"
             "KernelPageSize: 2048 kB\nVmFlags: rd wr sh mr mw me ms ht sd\n"
             "7f20-7f30 rw-p 0 00:00 0\nSize: 1024 kB\nRss: 512 kB\nVmFlags: rd wr mr mw me ac sd\n")
    assert hugetlb_kib(smaps) == 262144
    assert hugetlb_kib(smaps.replace(" ht ", " ")) == 0


def test_a_scratch_dir_is_made_and_removed(tmp_path):
    host = LocalHost(HostSpec(name="local"))
    with host.scratch_dir(str(tmp_path / "scratch")) as path:
        assert os.path.isdir(path)
    assert not os.path.exists(path)


def test_a_scratch_dir_that_cannot_be_removed_does_not_hide_the_checks_error(tmp_path, monkeypatch):
    """A power cycle the host did not come back from: its error is the one raised, not the
    failed removal's 'cannot connect'."""
    host = LocalHost(HostSpec(name="local"))

    def unreachable(path, settle=30.0):
        raise HostError("host local: cannot connect")
    monkeypatch.setattr(host, "remove_tree", unreachable)
    with pytest.raises(HostError, match="did not come back"):
        with host.scratch_dir(str(tmp_path / "scratch")):
            raise HostError("host local: not back within 600 s of its power cycle (did not come back)")
    with pytest.raises(HostError, match="cannot connect"):  # alone, the failed removal is an error
        with host.scratch_dir(str(tmp_path / "other")):
            pass
