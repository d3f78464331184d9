"""Handbook ch. 8, the QEMU monitor: each HMP command the handbook uses, checked against QMP.

The handbook types commands into the human monitor (``info status``, ``info balloon``,
``balloon N``, ``info pci``, ``device_add``/``device_del``, ``savevm``/``loadvm``,
``migrate``). Today tools speak QMP, and HMP is a thin layer over it; each test runs the
HMP form through ``human-monitor-command`` and asserts that QMP reports the same state
(and, where it can, that the guest sees it too).
"""
import re

import pytest

from pytest_kvmcheck import Disk, VMSpec, vm_fixture, wait_until
from pytest_kvmcheck.guests.shows import MIB

MEMORY_MIB = 512

monitored = vm_fixture(VMSpec(memory_mib=MEMORY_MIB, balloon=True))


SNAPSHOT_S = 120  # savevm/loadvm (and QMP snapshot-save) answer once the guest's RAM is written or
#                   read: the lab's NFS with the page cache bypassed took over 30 s for 512 MiB under a busy run


def hmp_ok(vm, command: str, timeout: float | None = None) -> str:
    """Run an HMP command; HMP reports errors as text, so fail on one."""
    out = vm.qmp.hmp(command, timeout)
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
    """Handbook 8: ``stop``, ``info status``, ``cont``: HMP and query-status agree, and the guest carries on."""
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
    assert vm.run(["true"]).ok, "the guest did not carry on after cont"


def balloon_bytes(vm) -> int:
    return vm.qmp.cmd("query-balloon")["actual"]


def test_info_balloon_and_balloon_n(monitored):
    """Handbook 8: ``balloon N`` (MiB) moves what query-balloon (bytes) and ``info balloon`` report."""
    vm = monitored
    assert hmp_ok(vm, "info balloon").strip() == f"balloon: actual={MEMORY_MIB}"
    hmp_ok(vm, "balloon 384")  # HMP takes MiB, QMP bytes
    try:
        wait_until(lambda: balloon_bytes(vm), 20, "query-balloon at 384 MiB after HMP 'balloon 384'",
                   done=lambda actual: actual == 384 * MIB)
        assert hmp_ok(vm, "info balloon").strip() == "balloon: actual=384"
    finally:
        hmp_ok(vm, f"balloon {MEMORY_MIB}")
        wait_until(lambda: balloon_bytes(vm), 20, f"the balloon back at {MEMORY_MIB} MiB",
                   done=lambda actual: actual == MEMORY_MIB * MIB)


def test_info_pci_agrees_with_query_pci_and_the_guest(monitored):
    """Handbook 8: ``info pci``, query-pci and the guest's lspci list the same functions."""
    vm = monitored
    hmp, qmp = hmp_pci(vm), qmp_pci(vm)
    assert hmp == qmp, f"info pci and query-pci differ: only HMP {sorted(hmp - qmp)}, only QMP {sorted(qmp - hmp)}"
    guest = set(vm.guest.pci_ids())
    missing = {vd for *_, vd in qmp} - guest
    assert not missing, f"the guest's lspci lacks {sorted(missing)} that QMP lists"


def test_device_add_and_device_del(monitored):
    """Handbook 8: ``device_add``/``device_del`` in HMP: QEMU and the guest see the device come and go."""
    vm = monitored
    hmp_ok(vm, "device_add virtio-rng-pci,id=hmprng0")
    vm.qmp.clear_events()
    try:
        assert "1af4:1005" in {vd for *_, vd in qmp_pci(vm)}, "query-pci does not list the device HMP added"
        wait_until(vm.guest.pci_ids, 15, "the guest's lspci showing the added 1af4:1005",
                   done=lambda ids: "1af4:1005" in ids)
    finally:
        hmp_ok(vm, "device_del hmprng0")
    vm.qmp.wait_event("DEVICE_DELETED", timeout=20, match={"data": {"device": "hmprng0"}})
    assert "1af4:1005" not in {vd for *_, vd in qmp_pci(vm)}
    wait_until(vm.guest.pci_ids, 15, "the guest's lspci without the deleted 1af4:1005",
               done=lambda ids: "1af4:1005" not in ids)


def test_savevm_loadvm_and_their_qmp_jobs(boot_vm):
    """Handbook 8: ``savevm``/``loadvm`` (HMP) and ``snapshot-save`` (a QMP job) see one snapshot list."""
    vm = boot_vm(VMSpec(disks=(Disk(size_mib=16, serial="snap0"),)))  # the snapshots live in its qcow2
    vm.guest.write("/tmp/snapshot-marker", "before")
    hmp_ok(vm, "savevm kvmcheck-hmp", SNAPSHOT_S)
    vm.qmp.cmd_within(SNAPSHOT_S, "snapshot-save", job_id="save-qmp", tag="kvmcheck-qmp", vmstate="disk0",
                      devices=["disk0"])
    wait_until(lambda: [j for j in vm.qmp.cmd("query-jobs") if j["status"] != "concluded"], SNAPSHOT_S,
               "snapshot-save to conclude", done=lambda running: not running)
    jobs = {j["id"]: j for j in vm.qmp.cmd("query-jobs")}
    assert "error" not in jobs["save-qmp"], f"snapshot-save failed: {jobs['save-qmp']}"
    vm.qmp.cmd("job-dismiss", id="save-qmp")
    listed = hmp_ok(vm, "info snapshots")
    qmp_tags = {snap["name"] for node in vm.qmp.cmd("query-block") if node.get("inserted")
                for snap in node["inserted"]["image"].get("snapshots", [])}
    for tag in ("kvmcheck-hmp", "kvmcheck-qmp"):
        assert tag in listed, f"HMP info snapshots lacks {tag}:\n{listed}"
        assert tag in qmp_tags, f"QMP query-block lacks snapshot {tag}: {sorted(qmp_tags)}"
    vm.guest.write("/tmp/snapshot-marker", "after")
    hmp_ok(vm, "loadvm kvmcheck-hmp", SNAPSHOT_S)
    vm.reconnect_guest()  # the guest's TCP state went back in time with its RAM
    assert vm.guest.read("/tmp/snapshot-marker").strip() == "before", \
        "loadvm did not bring back the guest's RAM as it was at savevm"
    for tag in ("kvmcheck-hmp", "kvmcheck-qmp"):
        hmp_ok(vm, f"delvm {tag}", SNAPSHOT_S)


def test_migrate_and_info_migrate(boot_vm, kvm_note):
    """Handbook 8: ``migrate`` (HMP) to a file; ``info migrate`` and query-migrate tell the same end."""
    vm = boot_vm(VMSpec())
    target = vm.path("hmp-migrate.bin")
    hmp_ok(vm, f"migrate exec:cat>{target}")
    wait_until(lambda: vm.qmp.cmd("query-migrate"), 60, "HMP migrate to complete",
               done=lambda info: info.get("status") == "completed")
    info = hmp_ok(vm, "info migrate")
    assert re.search(r"Migration status: completed", info), f"info migrate disagrees with QMP:\n{info}"
    assert vm.qmp.cmd("query-status")["status"] == "postmigrate"
    size = vm.host.size(target)
    kvm_note("hmp migrate", f"{size} bytes of migration stream written by HMP migrate")
    assert size > MIB, f"the migration stream is only {size} bytes"


@pytest.mark.parametrize("command", ["info kvm", "info cpus", "info network", "info version", "info mtree -f"])
def test_info_commands_answer(monitored, command):
    """Handbook 8: the informational commands the handbook's readers type answer, without an error."""
    assert hmp_ok(monitored, command).strip(), f"HMP {command!r} printed nothing"
