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
import time

import pytest

from pytest_kvmcheck import Disk, VMSpec, vm_fixture, wait_until
from pytest_kvmcheck.errors import QMPCommandError
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.hosts.settings import VfioBinding
from pytest_kvmcheck.qemu.hotplug import APPEAR_S, unplug
from pytest_kvmcheck.qemu.migration import DiskWriter
from pytest_kvmcheck.qemu.legacy import describe, form

OOPS = r"Oops|BUG:|general protection|Kernel panic|Call Trace"  # the guest kernel hurt itself
DIMM_MIB = 256

HOTPLUG_SPEC = VMSpec(max_cpus=2, max_memory_mib=1024, memory_slots=2)
hotplug_guest = vm_fixture(HOTPLUG_SPEC)  # PCI tests: each unplugs what it plugged


def pci_slots(vm) -> list[tuple[int, str]]:
    return sorted((d["slot"], d.get("qdev_id", "")) for bus in vm.qmp.cmd("query-pci") for d in bus["devices"])


@pytest.mark.parametrize("form", ["qmp", "hmp"])
def test_virtio_net_hotplug(hotplug_guest, form, kvm_metric):
    """Handbook 3: a virtio NIC plugged (QMP ``device_add``, or the handbook's HMP ``netdev_add`` +
    ``device_add``) appears in the guest, carries 256 KiB intact, and leaves without a trace."""
    vm = hotplug_guest
    n = 1 if form == "qmp" else 2
    netdev, nic_id, mac, guest_ip = f"hpnet{n}", f"hpnic{n}", f"52:54:00:aa:00:0{n}", f"10.0.{n + 2}.15"
    port = 7770 + n
    forward = f"tcp:127.0.0.1:0-{guest_ip}:{port}"
    before = pci_slots(vm)
    plugged = time.monotonic()
    if form == "qmp":
        vm.qmp.cmd("netdev_add", type="user", id=netdev, net=f"10.0.{n + 2}.0/24", restrict=True,
                   hostfwd=[{"str": forward}])
        vm.qmp.cmd("device_add", driver="virtio-net-pci", id=nic_id, netdev=netdev, mac=mac)
    else:
        vm.qmp.hmp(f"netdev_add user,id={netdev},net=10.0.{n + 2}.0/24,restrict=on,hostfwd={forward}")
        out = vm.qmp.hmp(f"device_add virtio-net-pci,netdev={netdev},id={nic_id},mac={mac}")
        assert out.strip() == "", f"HMP device_add answered {out!r}"
    try:
        nic = wait_until(lambda: vm.guest.find_nic(mac), APPEAR_S, f"the plugged NIC {mac} in the guest",
                         show=lambda _: f"the guest's MACs: {vm.guest.macs()}")
        kvm_metric("hotplug_appear", time.monotonic() - plugged, "s")
        assert nic.driver == "virtio_net", f"the plugged NIC {nic.name} is driven by {nic.driver!r}"
        nic.up(f"{guest_ip}/24")
        wait_until(nic.carrier, 5, f"link on the plugged NIC {nic.name}", done=lambda c: c == "1")
        rx0, _ = nic.counters()
        received = f"/tmp/hotplug-{nic_id}.bin"
        listener = vm.guest.start(f"exec nc -l -p {port} > {received}")
        try:
            # slirp accepts on the host side before the guest listens: wait for the guest's listener.
            wait_until(lambda: vm.guest.listening(port), 5, f"nc listening on port {port} in the guest")
            payload = os.urandom(256 * 1024)
            with vm.host.connect_tcp("127.0.0.1", vm.hostfwd_port(guest_ip, port)) as sock:
                sock.sendall(payload)
            wait_until(lambda: vm.guest.size(received), 10, f"256 KiB through the plugged NIC in {received}",
                       done=lambda size: size == len(payload))
            assert vm.guest.sha256(received) == hashlib.sha256(payload).hexdigest(), \
                "256 KiB sent through the plugged NIC arrived with another checksum"
            assert nic.counters()[0] - rx0 >= len(payload), "the NIC's rx counter did not move"
        finally:
            vm.guest.stop(listener)
            vm.run(["rm", "-f", received])
    finally:
        unplugged = time.monotonic()
        unplug(vm, nic_id)
        if form == "qmp":
            vm.qmp.cmd("netdev_del", id=netdev)
        else:
            vm.qmp.hmp(f"netdev_del {netdev}")
    wait_until(lambda: vm.guest.find_nic(mac), APPEAR_S, f"the NIC {mac} gone from the guest after device_del",
               done=lambda found: found is None)
    kvm_metric("hotplug_disappear", time.monotonic() - unplugged, "s")
    assert pci_slots(vm) == before, "query-pci after the unplug differs from before the plug"


@pytest.mark.parametrize("form", ["qmp", "hmp"])
def test_virtio_blk_hotplug(hotplug_guest, form):
    """Handbook 3: a virtio disk plugged (QMP ``blockdev-add`` + ``device_add``, or HMP ``drive_add`` +
    ``device_add``) appears, reads back what was written, and leaves without a trace."""
    vm = hotplug_guest
    n = 1 if form == "qmp" else 2
    node, dev, serial = f"hpdisk{n}", f"hpblk{n}", f"hotplug{n}"
    image = vm.host.qemu_img.create(vm.path(f"hotplug{n}.qcow2"), 32)
    before = pci_slots(vm)
    if form == "qmp":
        vm.qmp.cmd("blockdev-add", driver="qcow2", node_name=node, file={"driver": "file", "filename": image})
        vm.qmp.cmd("device_add", driver="virtio-blk-pci", id=dev, drive=node, serial=serial)
    else:
        out = vm.qmp.hmp(f"drive_add 0 if=none,file={image},format=qcow2,id={node}")
        assert "OK" in out, f"HMP drive_add answered {out!r}"
        vm.qmp.hmp(f"device_add virtio-blk-pci,drive={node},id={dev},serial={serial}")
    try:
        disk = wait_until(lambda: vm.guest.find_block_device(serial), APPEAR_S,
                          f"the plugged disk (serial {serial}) in the guest",
                          show=lambda _: f"the guest's disks: {vm.guest.serials()}")
        assert disk.driver == "virtio_blk", f"the plugged disk {disk.name} is driven by {disk.driver!r}"
        written = disk.write_pattern(2)
        read = disk.checksum(2)
        assert read == written, f"the plugged disk read back sha256 {read}, wrote {written}"
    finally:
        unplug(vm, dev)
        if form == "qmp":
            vm.qmp.cmd("blockdev-del", node_name=node)
    wait_until(lambda: vm.guest.find_block_device(serial), APPEAR_S,
               f"disk {serial} gone from the guest after device_del", done=lambda found: found is None)
    assert pci_slots(vm) == before, "query-pci after the unplug differs from before the plug"


def test_vcpu_hotplug(boot_vm):
    """Handbook 3: a plugged vCPU appears and the guest onlines it. It stays (unplug needs the
    guest's help): a guest of its own, not the module's."""
    vm = boot_vm(HOTPLUG_SPEC)
    free = [c for c in vm.qmp.cmd("query-hotpluggable-cpus") if "qom-path" not in c]
    assert free, "expected a free vCPU slot (maxcpus=2)"
    vm.qmp.cmd("device_add", free[0]["props"], driver=free[0]["type"], id="hpcpu1")
    wait_until(lambda: vm.guest.cpus("present"), APPEAR_S, "the plugged vCPU as cpu1 in the guest",
               done=lambda present: 1 in present)
    vm.guest.online_cpu(1)
    online = vm.guest.cpus("online")
    assert online == {0, 1}, f"expected CPUs 0-1 online after onlining the plugged vCPU, the guest shows {online}"
    assert len(vm.qmp.cmd("query-cpus-fast")) == 2


def test_memory_hotplug(boot_vm):
    """Handbook 3: a plugged DIMM's memory appears, and MemTotal grows by it once onlined. It stays
    (onlined memory rarely unplugs): a guest of its own, not the module's."""
    vm = boot_vm(HOTPLUG_SPEC)
    before = vm.guest.meminfo()["MemTotal"] // 1024
    blocks_before = vm.guest.memory_blocks()
    vm.qmp.cmd("object-add", qom_type="memory-backend-ram", id="hpmem1", size=DIMM_MIB * MIB)
    vm.qmp.cmd("device_add", driver="pc-dimm", id="hpdimm1", memdev="hpmem1")
    blocks = wait_until(vm.guest.memory_blocks, APPEAR_S, "the plugged DIMM's memory blocks in the guest",
                        done=lambda now: len(now) > len(blocks_before), show=lambda now: f"{len(now)} blocks")
    # Some guests online new memory themselves (udev rules); the tiny guest leaves it to us.
    vm.guest.online_memory(name for name, state in blocks.items() if state == "offline")
    after = vm.guest.meminfo()["MemTotal"] // 1024
    assert abs(after - before - DIMM_MIB) <= 4, \
        f"expected MemTotal to grow by {DIMM_MIB} MiB (from {before}), the guest shows {after} MiB"
    dimms = [d for d in vm.qmp.cmd("query-memory-devices") if d["data"].get("id") == "hpdimm1"]
    assert dimms and dimms[0]["data"]["size"] == DIMM_MIB * MIB


@pytest.mark.kvm_requires("iommu", "assignable")
@pytest.mark.kvm_changes_host("a device's driver binding")
def test_assigned_device_hotplug(hotplug_guest, kvm_host, kvm_note):
    """Handbook 3.1: ``device_add pci-assign,host=BDF`` is ``device_add vfio-pci,host=BDF`` today: the
    plugged device appears in the guest's lspci, and goes back to its host driver after the unplug."""
    kvm_note("handbook", describe(form("-device pci-assign,host=BDF")))
    vm = hotplug_guest
    binding = VfioBinding(kvm_host.transport, kvm_host.caps.plain_assignable()[0], kvm_host.caps.assignable)
    ids = binding.ids
    with binding:  # the device goes to vfio-pci and, after the unplug, back to its own driver
        vm.qmp.cmd("device_add", driver="vfio-pci", host=binding.bdf, id="hpvfio")
        try:
            wait_until(lambda: vm.guest.pci(vendor_device=ids), APPEAR_S,
                       f"the assigned device {binding.bdf} ({ids}) in the guest's lspci", interval=0.2)
        finally:
            unplug(vm, "hpvfio")


CYCLES = 20
CYCLE_MAC = "52:54:00:aa:00:20"
# What twenty cycles may leave behind: no fd (each plug's eventfds and image go with its unplug);
# a few threads (QEMU's I/O worker pool grows with use and shrinks after 10 s idle); a little
# memory outside guest RAM (malloc keeps freed memory in its arenas).
LEAK_TOLERANCE = {"fds": 0, "threads": 4, "rss_mib": 8.0}


def plug_and_unplug_disk_and_nic(vm, image: str) -> None:
    """One cycle: a virtio disk and a virtio NIC plugged, seen by the guest, unplugged and gone."""
    vm.qmp.cmd("blockdev-add", driver="qcow2", node_name="cycdisk", file={"driver": "file", "filename": image})
    vm.qmp.cmd("device_add", driver="virtio-blk-pci", id="cycblk", drive="cycdisk", serial="cycle")
    vm.qmp.cmd("netdev_add", type="user", id="cycnet", restrict=True)
    vm.qmp.cmd("device_add", driver="virtio-net-pci", id="cycnic", netdev="cycnet", mac=CYCLE_MAC)
    wait_until(lambda: (vm.guest.find_block_device("cycle"), vm.guest.find_nic(CYCLE_MAC)), APPEAR_S,
               "the plugged disk (serial cycle) and NIC in the guest", done=all)
    vm.qmp.clear_events()
    for device in ("cycblk", "cycnic"):
        vm.qmp.cmd("device_del", id=device)
    for device in ("cycblk", "cycnic"):
        vm.qmp.wait_event("DEVICE_DELETED", timeout=APPEAR_S, match={"data": {"device": device}})
    vm.qmp.cmd("blockdev-del", node_name="cycdisk")
    vm.qmp.cmd("netdev_del", id="cycnet")


def test_repeated_hotplug_leaks_nothing(hotplug_guest, kvm_metric, kvm_note):
    """Handbook 3, beyond it (tp-qemu's hotplug_unplug repeat): twenty plug/unplug cycles of a virtio disk and a virtio NIC leave QEMU's
    open file descriptors, threads and memory where they were (within LEAK_TOLERANCE), and no
    device behind in the guest or in query-pci."""
    vm = hotplug_guest
    image = vm.host.qemu_img.create(vm.path("cycle.qcow2"), 16)
    slots = pci_slots(vm)
    plug_and_unplug_disk_and_nic(vm, image)  # the first plug allocates what later ones reuse
    before = vm.process.footprint(vm.spec.memory_mib)
    started = time.monotonic()
    for _ in range(CYCLES):
        plug_and_unplug_disk_and_nic(vm, image)
    kvm_metric("hotplug_cycle", (time.monotonic() - started) / CYCLES, "s")
    left = wait_until(lambda: (vm.guest.find_block_device("cycle"), vm.guest.find_nic(CYCLE_MAC)), APPEAR_S,
                      "no plugged disk or NIC left in the guest", done=lambda found: found == (None, None))
    assert left == (None, None) and pci_slots(vm) == slots, "query-pci after the cycles differs from before"
    grown = vm.process.footprint(vm.spec.memory_mib).grown(before)
    kvm_note("hotplug cycles", f"after {CYCLES} cycles QEMU grew by {grown} (tolerance {LEAK_TOLERANCE})")
    over = {k: v for k, v in grown.items() if v > LEAK_TOLERANCE[k]}
    assert not over, f"after {CYCLES} plug/unplug cycles QEMU holds more: {over} (tolerance {LEAK_TOLERANCE})"


def test_disk_unplugged_while_the_guest_writes(boot_vm, kvm_note):
    """Handbook 3, beyond it (tp-qemu's unplug_block_during_io): a virtio disk pulled out while the guest writes to it, synced write by
    write: the unplug completes (DEVICE_DELETED) or is refused with an error, the guest's kernel
    does not oops, and the last write the guest completed is on the image."""
    vm = boot_vm(VMSpec(disks=(Disk(size_mib=16, format="raw", serial="unplug0"),)))
    disk = vm.guest.block_device("unplug0")
    oopses = vm.guest.dmesg(OOPS)
    writer = DiskWriter(vm, disk.path)
    wait_until(lambda: vm.guest.exists(DiskWriter.DONE) and writer.completed(vm), 20,
               "the guest's writer completing its first writes", done=lambda n: n >= 3)
    vm.qmp.clear_events()
    pulled = time.monotonic()
    try:
        vm.qmp.cmd("device_del", id="disk0")
        vm.qmp.wait_event("DEVICE_DELETED", timeout=APPEAR_S, match={"data": {"device": "disk0"}})
        wait_until(lambda: vm.guest.find_block_device("unplug0"), APPEAR_S, "the unplugged disk gone from the guest",
                   done=lambda found: found is None)
        outcome = f"unplugged in {time.monotonic() - pulled:.1f} s"
    except QMPCommandError as exc:  # refused cleanly: the guest keeps the disk, and keeps writing to it
        outcome = f"unplug refused: {exc.desc}"
    writer.stop(vm)
    completed = writer.completed(vm)
    kvm_note("unplug during writes", f"{outcome}; the guest completed {completed} synced writes")
    assert vm.guest.dmesg(OOPS) == oopses, "the guest's kernel oopsed when its disk was pulled out:\n" + \
        "\n".join(vm.guest.dmesg(OOPS)[len(oopses):][:20])
    vm.stop()  # QEMU has let go of the image: read what it holds
    on_image = int((vm.host.read_sector(vm.disk_paths[0], DiskWriter.SECTOR).split() or ["0"])[0])
    assert on_image >= completed, \
        f"the guest completed write {completed} (synced), the image holds write {on_image}: completed writes were lost"


def test_multifunction_slot_hotplug(hotplug_guest):
    """Handbook 3, beyond it: a multifunction slot plugged function by function (function 1,
    then function 0 with multifunction=on): the guest sees both functions in the one slot,
    and unplugging function 0 takes the whole slot away."""
    vm = hotplug_guest
    before = pci_slots(vm)
    for fn in (1, 0):  # QEMU takes no new function once function 0 is in the slot
        image = vm.host.qemu_img.create(vm.path(f"multifunction{fn}.qcow2"), 16)
        vm.qmp.cmd("blockdev-add", driver="qcow2", node_name=f"mfdisk{fn}",
                   file={"driver": "file", "filename": image})
        vm.qmp.cmd("device_add", driver="virtio-blk-pci", id=f"mfblk{fn}", drive=f"mfdisk{fn}", serial=f"mf{fn}",
                   addr=f"0x11.{fn}", multifunction=fn == 0)
    try:
        disks = wait_until(lambda: [vm.guest.find_block_device(f"mf{fn}") for fn in (0, 1)], APPEAR_S,
                           "both functions' disks (serials mf0, mf1) in the guest", done=all,
                           show=lambda _: f"the guest's disks: {vm.guest.serials()}")
        functions = sorted(f.address for f in vm.guest.pci_functions() if f.address.startswith("0000:00:11."))
        assert functions == ["0000:00:11.0", "0000:00:11.1"], f"the guest's slot 0x11 holds functions {functions}"
        assert all(d.driver == "virtio_blk" for d in disks), f"the functions' disks are driven by {disks}"
    finally:
        vm.qmp.clear_events()
        vm.qmp.cmd("device_del", id="mfblk0")
        for fn in (0, 1):
            vm.qmp.wait_event("DEVICE_DELETED", timeout=APPEAR_S, match={"data": {"device": f"mfblk{fn}"}})
            vm.qmp.cmd("blockdev-del", node_name=f"mfdisk{fn}")
    wait_until(lambda: [vm.guest.find_block_device(f"mf{fn}") for fn in (0, 1)], APPEAR_S,
               "both functions gone from the guest", done=lambda found: found == [None, None])
    assert pci_slots(vm) == before, "query-pci after the unplug differs from before the plug"
