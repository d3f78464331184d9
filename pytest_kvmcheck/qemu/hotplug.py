"""Hot-plugging a disk into a running guest and pulling it out: QMP's moves, and the guest's view.

``blockdev-add`` + ``device_add`` (virtio-blk-pci), then the guest must show the disk by its
serial; ``device_del`` must end in QEMU's DEVICE_DELETED (the guest acknowledged the ACPI
eject), then ``blockdev-del``, and the disk must be gone from the guest. The hot-plug suite,
migration's hot-plugged disks and v2v's converted disks all plug through here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..guests.shows import BlockDevice
from ..waiting import wait_until
from .vm import VM

APPEAR_S = 15.0  # deadline for the guest to see a plugged device, or let one go (ACPI hot-plug under TCG)


def unplug(vm: VM, device_id: str, timeout: float = APPEAR_S) -> None:
    """device_del, then DEVICE_DELETED: the guest acknowledged the ACPI eject."""
    vm.qmp.clear_events()
    vm.qmp.cmd("device_del", id=device_id)
    vm.qmp.wait_event("DEVICE_DELETED", timeout=timeout, match={"data": {"device": device_id}})


@dataclass
class PluggedDisk:
    """A disk plugged by :func:`plug_disk`: ``disk`` is the guest's view of it."""

    vm: VM
    image: str
    fmt: str
    serial: str
    addr: str | None
    disk: BlockDevice

    @property
    def node(self) -> str:
        return f"{self.serial}-node"

    @property
    def device(self) -> str:
        return f"{self.serial}-dev"

    def argv(self) -> tuple[str, ...]:
        """The same disk on a command line: what a migration destination starts with."""
        where = f",addr={self.addr}" if self.addr else ""
        direct = ",cache.direct=on" if self.vm.disk_cache == "none" else ""
        return ("-blockdev", f"driver=file,filename={self.image},node-name={self.node}-file{direct}",
                "-blockdev", f"driver={self.fmt},file={self.node}-file,node-name={self.node}{direct}",
                "-device", f"virtio-blk-pci,drive={self.node},id={self.device},serial={self.serial}{where}")

    def unplug(self, timeout: float = APPEAR_S) -> None:
        """Out of QEMU (DEVICE_DELETED, the block node deleted) and out of the guest."""
        unplug(self.vm, self.device, timeout)
        self.vm.qmp.cmd("blockdev-del", node_name=self.node)
        wait_until(lambda: self.vm.guest.find_block_device(self.serial), timeout,
                   f"disk {self.serial} gone from the guest after device_del", done=lambda found: found is None)


def plug_disk(vm: VM, image: str, serial: str, fmt: str = "qcow2", addr: str | None = None,
              timeout: float = APPEAR_S) -> PluggedDisk:
    """Plug ``image`` into ``vm`` as a virtio-blk disk with ``serial`` (its node and device
    named after it; ``addr``: its PCI slot), cached as the VM's own disks are; returns once
    the guest shows it."""
    plugged = PluggedDisk(vm, image, fmt, serial, addr, disk=None)  # type: ignore[arg-type]
    # The cache of the VM's own disks: on shared storage, past the page cache (spec.AUTO_CACHE).
    cache = {"cache": {"direct": True}} if vm.disk_cache == "none" else {}
    vm.qmp.cmd("blockdev-add", driver=fmt, node_name=plugged.node, **cache,
               file={"driver": "file", "filename": image, **cache})
    where = {"addr": addr} if addr else {}
    vm.qmp.cmd("device_add", driver="virtio-blk-pci", id=plugged.device, drive=plugged.node, serial=serial, **where)
    plugged.disk = wait_until(lambda: bound(vm.guest.find_block_device(serial)), timeout,
                              f"the plugged disk (serial {serial}), its driver bound",
                              show=lambda _: f"the guest's disks: {vm.guest.serials()}")
    return plugged


def bound(disk):
    """``disk`` once a driver is bound to its device, else None: the guest lists the disk
    (virtio-blk's probe adds it) a moment before the driver's sysfs link exists (a loaded lab
    host read the plugged disk's driver as '' and failed the v2v check)."""
    return disk if disk is not None and disk.driver else None
