"""Handbook 2.2, SR-IOV: one physical function (PF), several virtual functions (VFs) for guests.

The handbook creates VFs with the driver's ``max_vfs`` module parameter (``modprobe igb
max_vfs=7``). Since Linux 3.8 the generic way is ``sriov_numvfs`` in the PF's sysfs dir, and
``max_vfs`` is deprecated or gone in most drivers; a VF is then assigned like any device,
through vfio-pci (see the passthrough suite). The PF must be listed as ``assignable`` in
the host's inventory; the suite turns off VF driver autoprobe while it works so the host's
own driver does not grab the VFs, and leaves sriov_numvfs and autoprobe as it found them.
"""
import pytest

from pytest_kvmcheck import VMSpec, wait_until
from pytest_kvmcheck.hosts.settings import SysfsSettings, VfioBinding, link_name

pytestmark = [pytest.mark.kvm_requires("kvm", "iommu", "sriov"), pytest.mark.kvm_changes_host("sriov_numvfs")]

VFS = 2
SETTLE_S = 20.0


@pytest.fixture
def pf(kvm_host):
    """The first idle SR-IOV PF listed as assignable; its sriov_numvfs and autoprobe as found, afterwards."""
    device = kvm_host.caps.idle_assignable_pfs()[0]
    settings = SysfsSettings(kvm_host.transport, f"/sys/bus/pci/devices/{device}",
                             ("sriov_drivers_autoprobe", "sriov_numvfs"), restore_first={"sriov_numvfs": 0})
    yield settings
    left = settings.restore()
    assert not left, f"host {kvm_host.name}: could not restore {device} (original, now): {left}"


def bdf(pf) -> str:
    return pf.directory.rsplit("/", 1)[-1]


def virtfns(pf) -> list[str]:
    return sorted(name for name in pf.host.listdir(pf.directory) if name.startswith("virtfn"))


def wait_for_vfs(pf, count: int, what: str) -> list[str]:
    return wait_until(lambda: virtfns(pf), SETTLE_S, what, done=lambda links: len(links) == count, interval=0.2)


def test_pf_shows_sriov_capability(pf, kvm_host):
    """Handbook 2.2: the PF has the SR-IOV capability (lspci -vvv) and offers enough VFs."""
    lspci = kvm_host.transport.run(["lspci", "-vvv", "-s", bdf(pf)], timeout=30).check().stdout
    assert "Single Root I/O Virtualization (SR-IOV)" in lspci, f"lspci -vvv -s {bdf(pf)} shows no SR-IOV capability:\n{lspci}"
    assert pf.read_int("sriov_totalvfs") >= VFS, f"{bdf(pf)} offers {pf.read('sriov_totalvfs')} VFs, the suite needs {VFS}"


def test_numvfs_creates_and_removes_vfs(pf):
    """Handbook 2.2: writing N to sriov_numvfs (today's ``max_vfs``) makes N VFs; writing 0 removes them."""
    pf.write("sriov_drivers_autoprobe", 0)
    pf.write("sriov_numvfs", VFS)
    links = wait_for_vfs(pf, VFS, f"{VFS} VFs after writing {VFS} to sriov_numvfs")
    assert links == [f"virtfn{i}" for i in range(VFS)], f"writing {VFS} to sriov_numvfs made {links}"
    pf.write("sriov_numvfs", 0)
    wait_for_vfs(pf, 0, "no VFs after writing 0 to sriov_numvfs")


def test_vf_assigned_to_guest_is_visible_there(pf, kvm_host, boot_vm, kvm_note):
    """Handbook 2.2: a VF is assigned like any device (vfio-pci) and shows in the guest's lspci."""
    pf.write("sriov_drivers_autoprobe", 0)
    pf.write("sriov_numvfs", VFS)
    wait_for_vfs(pf, VFS, f"{VFS} VFs")
    vf = link_name(kvm_host.transport, f"{pf.directory}/virtfn0")
    # A VF is assignable because its PF is: the inventory names PFs, the VFs come and go.
    with VfioBinding(kvm_host.transport, vf, (*kvm_host.caps.assignable, vf)) as binding:
        ids = binding.ids
        vm = boot_vm(VMSpec(host_devices=(vf,)))
        listed = vm.guest.pci(vendor_device=ids)
        kvm_note("sriov", f"VF {vf} ({ids}) of PF {bdf(pf)} -> guest: {listed or 'not listed'}")
        assert listed, f"the guest's lspci does not show the assigned VF {vf} ({ids})"
        vm.destroy()
    pf.write("sriov_numvfs", 0)
    wait_for_vfs(pf, 0, "no VFs after writing 0 to sriov_numvfs")
