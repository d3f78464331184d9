"""Handbook 2.1, PCI device assignment (VT-d / AMD-Vi).

The handbook binds the device to pci-stub and starts QEMU with ``-device pci-assign``. Both
are gone as a way to assign: pci-assign was removed in QEMU 2.12, and today the host gives
the device to vfio-pci (``driver_override`` + ``drivers_probe``, per device rather than by
vendor:device ID as pci-stub's ``new_id`` did) and QEMU takes it with ``-device vfio-pci``.
The host must have its IOMMU on, and every device in the device's IOMMU group must be bound
to vfio-pci or to nothing. Only devices the host's inventory lists as ``assignable`` are
ever touched, and each goes back to its own driver afterwards (the handbook's "let the host
use the device again").
"""
import re

import pytest

from pytest_kvmcheck import VMSpec, wait_until
from pytest_kvmcheck.hosts.settings import NotAssignable, VfioBinding, link_name
from pytest_kvmcheck.qemu.legacy import describe, form

needs_assignment = pytest.mark.kvm_requires("kvm", "iommu", "assignable")
rebinds = pytest.mark.kvm_changes_host("a device's driver binding")

IOMMU_ON = re.compile(r"DMAR: IOMMU enabled|AMD-Vi: .*(Interrupt remapping|IOMMU performance counters)|"
                      r"iommu: Default domain type", re.I)
GUEST_DRIVER_S = 30.0


@pytest.fixture
def binding(kvm_host):
    """The first assignable device that is not an SR-IOV PF (the SR-IOV suite's), back on its driver afterwards."""
    device = VfioBinding(kvm_host.transport, kvm_host.caps.plain_assignable()[0], kvm_host.caps.assignable)
    yield device
    now = device.restore()
    assert now == device.original_driver, \
        f"host {kvm_host.name}: {device.bdf} should be back on {device.original_driver or 'no driver'}, it is on {now or 'none'}"


@pytest.mark.kvm_requires("iommu")
def test_host_iommu_is_on(kvm_host):
    """Handbook 2.1: the host booted with its IOMMU on (dmesg says so) and has IOMMU groups."""
    dmesg = kvm_host.transport.run(["dmesg"], timeout=60).check("dmesg").stdout
    lines = [line for line in dmesg.splitlines() if re.search(r"DMAR|AMD-Vi|iommu", line, re.I)]
    assert any(IOMMU_ON.search(line) for line in lines), \
        f"host {kvm_host.name}: dmesg shows no enabled IOMMU; its IOMMU lines:\n" + "\n".join(lines[:20])
    assert kvm_host.transport.listdir("/sys/kernel/iommu_groups"), "/sys/kernel/iommu_groups is empty"


@needs_assignment
@rebinds
def test_iommu_group_is_viable_once_bound(binding, kvm_host):
    """Handbook 2.1: once the device is on vfio-pci its IOMMU group is viable and /dev/vfio/GROUP exists."""
    assert binding.iommu_group, f"{binding.bdf} has no IOMMU group"
    with binding:
        members = binding.group_members()
        blocking = {bdf: drv for bdf, drv in members.items() if drv not in ("", "vfio-pci", "pcieport")}
        assert not blocking, f"IOMMU group {binding.iommu_group} of {binding.bdf} is not viable: members bound to " \
                             f"host drivers: {blocking}"
        assert kvm_host.transport.exists(f"/dev/vfio/{binding.iommu_group}"), \
            f"vfio-pci holds {binding.bdf} but /dev/vfio/{binding.iommu_group} is missing"


@needs_assignment
@rebinds
def test_guest_sees_assigned_device_and_binds_its_driver(binding, boot_vm, kvm_host, kvm_note):
    """Handbook 2.1: a device given to vfio-pci and assigned with ``-device vfio-pci,host=BDF`` shows in the
    guest's lspci and gets a guest driver; afterwards the host's own driver has it back."""
    kvm_note("handbook", describe(form("-device pci-assign,host=BDF")))
    ids = binding.ids
    with binding:
        vm = boot_vm(VMSpec(host_devices=(binding.bdf,)))
        listed = vm.guest.pci(vendor_device=ids)
        assert listed, f"the guest's lspci does not show the assigned {ids} ({binding.bdf} on the host)"
        function = wait_until(lambda: vm.guest.pci(vendor_device=ids), GUEST_DRIVER_S,
                              f"a guest driver bound to the assigned {ids}", done=lambda f: f and f.driver,
                              interval=0.5)
        kvm_note("passthrough", f"{binding.bdf} ({ids}) from host driver {binding.original_driver} -> guest: "
                                f"{function}")
        assert binding.driver() == "vfio-pci", "the device left vfio-pci while the guest held it"
        vm.destroy()
    assert binding.driver() == binding.original_driver, \
        f"after the guest, {binding.bdf} should be back on {binding.original_driver}, it is on {binding.driver() or 'none'}"


@pytest.mark.kvm_requires("pci-unlisted")
def test_unlisted_devices_are_never_touched(kvm_host):
    """Handbook 2.1, safety: binding a device missing from assignable= is refused before anything is written.

    Needs nothing but a PCI bus: it checks kvmcheck's own guard, on every host.
    """
    unlisted = [d for d in kvm_host.caps.pci_devices if d not in kvm_host.caps.assignable]
    device = f"/sys/bus/pci/devices/{unlisted[0]}"
    before = {name: kvm_host.transport.read_text(f"{device}/{name}", default="")
              for name in ("driver_override", "uevent")}
    before["driver"] = link_name(kvm_host.transport, f"{device}/driver")
    binding = VfioBinding(kvm_host.transport, unlisted[0], kvm_host.caps.assignable)
    with pytest.raises(NotAssignable, match="not listed as assignable"):
        binding.bind()
    after = {name: kvm_host.transport.read_text(f"{device}/{name}", default="")
             for name in ("driver_override", "uevent")}
    after["driver"] = link_name(kvm_host.transport, f"{device}/driver")
    assert after == before, f"refusing {unlisted[0]} still changed it: {before} -> {after}"
    assert not binding.bound, "a refused binding counts itself as bound"
