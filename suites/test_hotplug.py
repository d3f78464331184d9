"""Handbook ch. 3, hot-plug: devices plugged into and pulled out of a running guest.

PCI devices are plugged with QMP ``device_add`` and with the handbook's HMP form
(``netdev_add``/``drive_add`` then ``device_add ...,id=...``); the guest must see each
one appear within a deadline and use it (the NIC passes traffic, the disk reads back what
was written), and ``device_del`` must end in DEVICE_DELETED with the device gone from the
guest and ``query-pci`` as before. vCPUs and DIMMs are plugged too, and onlined by the
guest. The handbook's assigned-device hot-plug (``device_add pci-assign``, today
``vfio-pci``) needs an IOMMU and an assignable device on the host.
"""
import hashlib
import os

import pytest

from pytest_kvmcheck import VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import (MIB, block_device_by_serial, disk_round_trip, driver_of, iface_by_mac,
                                       meminfo, nic_counters)
from pytest_kvmcheck.vm import poll

APPEAR_S = 15.0  # deadline for the guest to see a plugged device (ACPI hot-plug under TCG)
DIMM_MIB = 256

HOTPLUG_SPEC = VMSpec(max_cpus=2, max_memory_mib=1024, memory_slots=2)
hotplug_guest = vm_fixture(HOTPLUG_SPEC)  # PCI tests: each unplugs what it plugged


def pci_slots(vm) -> list[tuple[int, str]]:
    return sorted((d["slot"], d.get("qdev_id", "")) for bus in vm.qmp.cmd("query-pci") for d in bus["devices"])


def unplug(vm, device_id: str) -> None:
    """device_del, then DEVICE_DELETED: the guest acknowledged the ACPI eject."""
    vm.qmp.clear_events()
    vm.qmp.cmd("device_del", id=device_id)
    vm.qmp.wait_event("DEVICE_DELETED", timeout=APPEAR_S, match=lambda e: e["data"].get("device") == device_id)


@pytest.mark.parametrize("form", ["qmp", "hmp"])
def test_virtio_net_hotplug(hotplug_guest, form):
    vm = hotplug_guest
    n = 1 if form == "qmp" else 2
    netdev, nic, mac, guest_ip = f"hpnet{n}", f"hpnic{n}", f"52:54:00:aa:00:0{n}", f"10.0.{n + 2}.15"
    port = 7770 + n
    forward = f"tcp:127.0.0.1:0-{guest_ip}:{port}"
    before = pci_slots(vm)
    if form == "qmp":
        vm.qmp.cmd("netdev_add", type="user", id=netdev, net=f"10.0.{n + 2}.0/24", restrict=True,
                   hostfwd=[{"str": forward}])
        vm.qmp.cmd("device_add", driver="virtio-net-pci", id=nic, netdev=netdev, mac=mac)
    else:
        vm.qmp.hmp(f"netdev_add user,id={netdev},net=10.0.{n + 2}.0/24,restrict=on,hostfwd={forward}")
        out = vm.qmp.hmp(f"device_add virtio-net-pci,netdev={netdev},id={nic},mac={mac}")
        assert out.strip() == "", f"HMP device_add answered {out!r}"
    try:
        appeared = poll(lambda: mac in vm.run("cat /sys/class/net/*/address").stdout, APPEAR_S, 0.1)
        assert appeared, f"the plugged NIC {mac} did not appear in the guest within {APPEAR_S:.0f} s"
        iface = iface_by_mac(vm, mac)
        assert driver_of(vm, f"/sys/class/net/{iface}/device") == "virtio_net"
        vm.run(f"ip link set {iface} up && ip addr add {guest_ip}/24 dev {iface}", check=True)
        assert poll(lambda: vm.run(["cat", f"/sys/class/net/{iface}/carrier"]).stdout.strip() == "1", 5), \
            f"no link on the plugged NIC {iface}"
        rx0, _ = nic_counters(vm, iface)
        received = f"/tmp/hotplug-{nic}.bin"
        listener = vm.run(f"nc -l -p {port} > {received} 2>/dev/null </dev/null & echo $!",
                          check=True).stdout.strip()
        try:
            # slirp accepts on the host side before the guest listens: wait for the guest's listener.
            assert poll(lambda: f":{port} " in vm.run("ss -ltn").stdout, 5, 0.1), "nc did not listen"
            payload = os.urandom(256 * 1024)
            with vm.host.connect_tcp("127.0.0.1", vm.hostfwd_port(guest_ip, port)) as sock:
                sock.sendall(payload)
            size = lambda: vm.run(f"wc -c < {received}").stdout.strip()  # noqa: E731
            arrived = poll(lambda: size() == str(len(payload)), 10, 0.1)
            got = vm.run(["sha256sum", received], check=True).stdout.split()[0]
            assert arrived and got == hashlib.sha256(payload).hexdigest(), \
                f"256 KiB sent through the plugged NIC arrived as {size()} bytes with sha256 {got}"
            assert nic_counters(vm, iface)[0] - rx0 >= len(payload), "the NIC's rx counter did not move"
        finally:
            vm.run(f"kill {listener} 2>/dev/null; rm -f {received}")
    finally:
        unplug(vm, nic)
        if form == "qmp":
            vm.qmp.cmd("netdev_del", id=netdev)
        else:
            vm.qmp.hmp(f"netdev_del {netdev}")
    gone = poll(lambda: mac not in vm.run("cat /sys/class/net/*/address").stdout, APPEAR_S, 0.1)
    assert gone, f"the NIC {mac} is still in the guest after device_del"
    assert pci_slots(vm) == before, "query-pci after the unplug differs from before the plug"


@pytest.mark.parametrize("form", ["qmp", "hmp"])
def test_virtio_blk_hotplug(hotplug_guest, form):
    vm = hotplug_guest
    n = 1 if form == "qmp" else 2
    node, dev, serial = f"hpdisk{n}", f"hpblk{n}", f"hotplug{n}"
    image = vm.path(f"hotplug{n}.qcow2")
    vm.host.run([vm.host.spec.qemu_img, "create", "-q", "-f", "qcow2", image, "32M"]).check()
    before = pci_slots(vm)
    if form == "qmp":
        vm.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": node},
                   file={"driver": "file", "filename": image})
        vm.qmp.cmd("device_add", driver="virtio-blk-pci", id=dev, drive=node, serial=serial)
    else:
        out = vm.qmp.hmp(f"drive_add 0 if=none,file={image},format=qcow2,id={node}")
        assert "OK" in out, f"HMP drive_add answered {out!r}"
        vm.qmp.hmp(f"device_add virtio-blk-pci,drive={node},id={dev},serial={serial}")
    try:
        name = poll(lambda: _disk(vm, serial), APPEAR_S, 0.1)
        assert name, f"the plugged disk (serial {serial}) did not appear within {APPEAR_S:.0f} s"
        assert driver_of(vm, f"/sys/block/{name}/device") == "virtio_blk"
        written, read = disk_round_trip(vm, f"/dev/{name}", mib=2)
        assert read == written, f"the plugged disk read back sha256 {read}, wrote {written}"
    finally:
        unplug(vm, dev)
        if form == "qmp":
            vm.qmp.cmd("blockdev-del", **{"node-name": node})
    assert poll(lambda: not _disk(vm, serial), APPEAR_S, 0.1), f"disk {serial} still in the guest after device_del"
    assert pci_slots(vm) == before, "query-pci after the unplug differs from before the plug"


def _disk(vm, serial: str) -> str | None:
    try:
        return block_device_by_serial(vm, serial)
    except AssertionError:
        return None


def test_vcpu_hotplug(boot_vm):
    """A plugged vCPU stays (unplug needs the guest's help): a guest of its own, not the module's."""
    vm = boot_vm(HOTPLUG_SPEC)
    free = [c for c in vm.qmp.cmd("query-hotpluggable-cpus") if "qom-path" not in c]
    assert free, "expected a free vCPU slot (maxcpus=2)"
    vm.qmp.cmd("device_add", driver=free[0]["type"], id="hpcpu1", **free[0]["props"])
    cpu = "/sys/devices/system/cpu/cpu1"
    assert poll(lambda: vm.run(["test", "-e", f"{cpu}/online"]).ok, APPEAR_S, 0.1), \
        f"the plugged vCPU did not appear as {cpu} within {APPEAR_S:.0f} s"
    vm.run(f"echo 1 > {cpu}/online", check=True)
    online = vm.run("cat /sys/devices/system/cpu/online", check=True).stdout.strip()
    assert online == "0-1", f"expected CPUs 0-1 online after onlining the plugged vCPU, the guest shows {online}"
    assert len([c for c in vm.qmp.cmd("query-cpus-fast")]) == 2


def test_memory_hotplug(boot_vm):
    """A plugged DIMM stays (onlined memory rarely unplugs): a guest of its own, not the module's."""
    vm = boot_vm(HOTPLUG_SPEC)
    before = meminfo(vm)["MemTotal"] // 1024
    blocks = lambda: len(vm.run("ls -d /sys/devices/system/memory/memory*").stdout.split())  # noqa: E731
    blocks_before = blocks()
    vm.qmp.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "hpmem1", "size": DIMM_MIB * MIB})
    vm.qmp.cmd("device_add", driver="pc-dimm", id="hpdimm1", memdev="hpmem1")
    assert poll(lambda: blocks() > blocks_before, APPEAR_S, 0.1), \
        f"the plugged DIMM's memory blocks did not appear within {APPEAR_S:.0f} s"
    # Some guests online new memory themselves (udev rules); the tiny guest leaves it to us.
    vm.run("for s in $(grep -l offline /sys/devices/system/memory/memory*/state); do echo online > $s; done",
           check=True)
    after = meminfo(vm)["MemTotal"] // 1024
    assert abs(after - before - DIMM_MIB) <= 4, \
        f"expected MemTotal to grow by {DIMM_MIB} MiB (from {before}), the guest shows {after} MiB"
    dimms = [d for d in vm.qmp.cmd("query-memory-devices") if d["data"].get("id") == "hpdimm1"]
    assert dimms and dimms[0]["data"]["size"] == DIMM_MIB * MIB


@pytest.mark.kvm_requires("iommu", "assignable")
def test_assigned_device_hotplug(hotplug_guest, kvm_host, kvm_note):
    """Handbook 3.1: ``device_add pci-assign,host=BDF`` is ``device_add vfio-pci,host=BDF`` today."""
    from pytest_kvmcheck.handbook import describe, form
    kvm_note("handbook", describe(form("-device pci-assign,host=BDF")))
    from pytest_kvmcheck.hostsettings import VfioBinding
    devices = [d for d in kvm_host.caps.assignable if d not in kvm_host.caps.sriov_pfs] or kvm_host.caps.assignable
    vm, binding = hotplug_guest, VfioBinding(kvm_host.transport, devices[0], kvm_host.caps.assignable)
    ids = binding.ids
    with binding:  # the device goes to vfio-pci and, after the unplug, back to its own driver
        vm.qmp.cmd("device_add", driver="vfio-pci", host=binding.bdf, id="hpvfio")
        try:
            seen = poll(lambda: vm.run(f"lspci -n -d {ids}").stdout.strip(), APPEAR_S, 0.2)
            assert seen, f"the assigned device {binding.bdf} ({ids}) did not appear in the guest's lspci"
        finally:
            unplug(vm, "hpvfio")
