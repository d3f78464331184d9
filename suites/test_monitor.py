"""Handbook ch. 8, the QEMU monitor: each HMP command the handbook uses, checked against QMP.

The handbook types commands into the human monitor (``info status``, ``info balloon``,
``balloon N``, ``info pci``, ``device_add``/``device_del``, ``savevm``/``loadvm``,
``migrate``). Today tools speak QMP, and HMP is a thin layer over it; each test runs the
HMP form through ``human-monitor-command`` and asserts that QMP reports the same state
(and, where it can, that the guest sees it too).
"""
import re

import pytest

from pytest_kvmcheck import Disk, VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import MIB, pci_ids
from pytest_kvmcheck.vm import poll

MEMORY_MIB = 512

monitored = vm_fixture(VMSpec(memory_mib=MEMORY_MIB, balloon=True))


def hmp_ok(vm, command: str) -> str:
    """Run an HMP command; HMP reports errors as text, so fail on one."""
    out = vm.qmp.hmp(command)
    assert not re.search(r"^(Error|.*: error)", out, re.M | re.I), f"HMP {command!r} failed: {out.strip()}"
    return out


def hmp_pci(vm) -> set[tuple[int, int, int, str]]:
    """``info pci`` as (bus, slot, function, vendor:device)."""
    text = hmp_ok(vm, "info pci").replace("\r", "")
    found = re.findall(r"Bus\s+(\d+), device\s+(\d+), function (\d+):\n[^\n]*PCI device ([0-9a-f]{4}:[0-9a-f]{4})",
                       text)
    return {(int(b), int(d), int(f), vd) for b, d, f, vd in found}


def qmp_pci(vm) -> set[tuple[int, int, int, str]]:
    return {(d["bus"], d["slot"], d["function"], f"{d['id']['vendor']:04x}:{d['id']['device']:04x}")
            for bus in vm.qmp.cmd("query-pci") for d in bus["devices"]}


def test_info_status_stop_cont(monitored):
    vm = monitored
    assert "VM status: running" in hmp_ok(vm, "info status")
    assert vm.qmp.cmd("query-status")["status"] == "running"
    hmp_ok(vm, "stop")
    try:
        assert "VM status: paused" in hmp_ok(vm, "info status")
        assert vm.qmp.cmd("query-status")["status"] == "paused"
    finally:
        hmp_ok(vm, "cont")
    assert vm.qmp.cmd("query-status")["status"] == "running"
    assert vm.run("true").ok, "the guest did not carry on after cont"


def test_info_balloon_and_balloon_n(monitored):
    vm = monitored
    assert hmp_ok(vm, "info balloon").strip() == f"balloon: actual={MEMORY_MIB}"
    hmp_ok(vm, "balloon 384")  # HMP takes MiB, QMP bytes
    try:
        assert poll(lambda: vm.qmp.cmd("query-balloon")["actual"] == 384 * MIB, 20, 0.2), \
            f"HMP 'balloon 384' left QMP query-balloon at {vm.qmp.cmd('query-balloon')}"
        assert hmp_ok(vm, "info balloon").strip() == "balloon: actual=384"
    finally:
        hmp_ok(vm, f"balloon {MEMORY_MIB}")
        poll(lambda: vm.qmp.cmd("query-balloon")["actual"] == MEMORY_MIB * MIB, 20, 0.2)


def test_info_pci_agrees_with_query_pci_and_the_guest(monitored):
    vm = monitored
    hmp, qmp = hmp_pci(vm), qmp_pci(vm)
    assert hmp == qmp, f"info pci and query-pci differ: only HMP {sorted(hmp - qmp)}, only QMP {sorted(qmp - hmp)}"
    guest = set(pci_ids(vm))
    missing = {vd for *_, vd in qmp} - guest
    assert not missing, f"the guest's lspci lacks {sorted(missing)} that QMP lists"


def test_device_add_and_device_del(monitored):
    vm = monitored
    hmp_ok(vm, "device_add virtio-rng-pci,id=hmprng0")
    vm.qmp.clear_events()
    try:
        assert "1af4:1005" in {vd for *_, vd in qmp_pci(vm)}, "query-pci does not list the device HMP added"
        assert poll(lambda: "1af4:1005" in pci_ids(vm), 15, 0.2), "the guest never saw it"
    finally:
        hmp_ok(vm, "device_del hmprng0")
    vm.qmp.wait_event("DEVICE_DELETED", timeout=20, match=lambda e: e["data"].get("device") == "hmprng0")
    assert "1af4:1005" not in {vd for *_, vd in qmp_pci(vm)}
    assert poll(lambda: "1af4:1005" not in pci_ids(vm), 15, 0.2), "the guest still shows it"


def test_savevm_loadvm_and_their_qmp_jobs(boot_vm):
    """``savevm``/``loadvm`` (HMP) and ``snapshot-save`` (a QMP job) see one snapshot list."""
    vm = boot_vm(VMSpec(disks=(Disk(size_mib=16, serial="snap0"),)))  # the snapshots live in its qcow2
    vm.run("echo before > /tmp/snapshot-marker", check=True)
    hmp_ok(vm, "savevm kvmcheck-hmp")
    vm.qmp.cmd("snapshot-save", **{"job-id": "save-qmp", "tag": "kvmcheck-qmp", "vmstate": "disk0",
                                   "devices": ["disk0"]})
    assert poll(lambda: not [j for j in vm.qmp.cmd("query-jobs") if j["status"] != "concluded"], 60, 0.2)
    jobs = {j["id"]: j for j in vm.qmp.cmd("query-jobs")}
    assert "error" not in jobs["save-qmp"], f"snapshot-save failed: {jobs['save-qmp']}"
    vm.qmp.cmd("job-dismiss", id="save-qmp")
    listed = hmp_ok(vm, "info snapshots")
    qmp_tags = {snap["name"] for node in vm.qmp.cmd("query-block") if node.get("inserted")
                for snap in node["inserted"]["image"].get("snapshots", [])}
    for tag in ("kvmcheck-hmp", "kvmcheck-qmp"):
        assert tag in listed, f"HMP info snapshots lacks {tag}:\n{listed}"
        assert tag in qmp_tags, f"QMP query-block lacks snapshot {tag}: {sorted(qmp_tags)}"
    vm.run("echo after > /tmp/snapshot-marker", check=True)
    hmp_ok(vm, "loadvm kvmcheck-hmp")
    vm.reconnect_guest()  # the guest's TCP state went back in time with its RAM
    assert vm.run("cat /tmp/snapshot-marker", check=True).stdout.strip() == "before", \
        "loadvm did not bring back the guest's RAM as it was at savevm"
    for tag in ("kvmcheck-hmp", "kvmcheck-qmp"):
        hmp_ok(vm, f"delvm {tag}")


def test_migrate_and_info_migrate(boot_vm, kvm_note):
    """``migrate`` (HMP) to a file; ``info migrate`` and query-migrate tell the same end."""
    vm = boot_vm(VMSpec())
    target = vm.path("hmp-migrate.bin")
    hmp_ok(vm, f"migrate exec:cat>{target}")
    assert poll(lambda: vm.qmp.cmd("query-migrate").get("status") == "completed", 60, 0.1), \
        f"HMP migrate did not complete: {vm.qmp.cmd('query-migrate')}"
    info = hmp_ok(vm, "info migrate")
    assert re.search(r"Migration status: completed", info), f"info migrate disagrees with QMP:\n{info}"
    assert vm.qmp.cmd("query-status")["status"] == "postmigrate"
    size = int(vm.host.run(["stat", "-c", "%s", target], timeout=10).check().stdout)
    kvm_note("hmp migrate", f"{size} bytes of migration stream written by HMP migrate")
    assert size > MIB, f"the migration stream is only {size} bytes"


@pytest.mark.parametrize("command", ["info kvm", "info cpus", "info network", "info version", "info mtree -f"])
def test_info_commands_answer(monitored, command):
    """Informational commands the handbook's readers type: they answer, without an error."""
    assert hmp_ok(monitored, command).strip(), f"HMP {command!r} printed nothing"
