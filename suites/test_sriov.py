"""Handbook 2.2, SR-IOV: one physical function (PF), several virtual functions (VFs) for guests.

The handbook creates VFs with the driver's ``max_vfs`` module parameter (``modprobe igb
max_vfs=7``). Since Linux 3.8 the generic way is ``sriov_numvfs`` in the PF's sysfs dir, and
``max_vfs`` is deprecated or gone in most drivers; a VF is then assigned like any device,
through vfio-pci (see the passthrough suite). The PF must be listed as ``assignable`` in
the host's inventory; the suite turns off VF driver autoprobe while it works so the host's
own driver does not grab the VFs, and leaves sriov_numvfs and autoprobe as it found them.
"""
import pytest

from pytest_kvmcheck import VMSpec
from pytest_kvmcheck.hostsettings import SysfsSettings, VfioBinding, link_name
from pytest_kvmcheck.vm import poll

pytestmark = pytest.mark.kvm_requires("kvm", "iommu", "sriov", "assignable")

VFS = 2
SETTLE_S = 20.0


@pytest.fixture
def pf(kvm_host):
    listed = [d for d in kvm_host.caps.sriov_pfs if d in kvm_host.caps.assignable]
    if not listed:
        pytest.skip(f"host {kvm_host.name}: needs sriov: no SR-IOV PF is listed as assignable "
                    f"(PFs: {', '.join(kvm_host.caps.sriov_pfs)})")
    settings = SysfsSettings(kvm_host.transport, f"/sys/bus/pci/devices/{listed[0]}",
                             ("sriov_drivers_autoprobe", "sriov_numvfs"))
    if settings.read_int("sriov_numvfs"):
        pytest.skip(f"host {kvm_host.name}: needs an idle SR-IOV PF: {listed[0]} already has VFs in use")
    yield settings
    left = settings.restore(before={"sriov_numvfs": 0})
    assert not left, f"host {kvm_host.name}: could not restore {listed[0]} (original, now): {left}"


def bdf(pf) -> str:
    return pf.directory.rsplit("/", 1)[-1]


def virtfns(pf) -> list[str]:
    return sorted(name for name in pf.host.listdir(pf.directory) if name.startswith("virtfn"))


def test_pf_shows_sriov_capability(pf, kvm_host):
    lspci = kvm_host.transport.run(["lspci", "-vvv", "-s", bdf(pf)], timeout=30).check().stdout
    assert "Single Root I/O Virtualization (SR-IOV)" in lspci, f"lspci -vvv -s {bdf(pf)} shows no SR-IOV capability:\n{lspci}"
    assert pf.read_int("sriov_totalvfs") >= VFS, f"{bdf(pf)} offers {pf.read('sriov_totalvfs')} VFs, the suite needs {VFS}"


def test_numvfs_creates_and_removes_vfs(pf):
    pf.write("sriov_drivers_autoprobe", 0)
    pf.write("sriov_numvfs", VFS)
    links = poll(lambda: len(virtfns(pf)) == VFS and virtfns(pf), SETTLE_S, 0.2)
    assert links == [f"virtfn{i}" for i in range(VFS)], f"writing {VFS} to sriov_numvfs made {virtfns(pf)}"
    pf.write("sriov_numvfs", 0)
    assert poll(lambda: not virtfns(pf), SETTLE_S, 0.2), f"writing 0 to sriov_numvfs left {virtfns(pf)}"


def test_vf_assigned_to_guest_is_visible_there(pf, kvm_host, boot_vm, kvm_note):
    pf.write("sriov_drivers_autoprobe", 0)
    pf.write("sriov_numvfs", VFS)
    assert poll(lambda: len(virtfns(pf)) == VFS, SETTLE_S, 0.2), f"no VFs appeared: {virtfns(pf)}"
    vf = link_name(kvm_host.transport, f"{pf.directory}/virtfn0")
    # A VF is assignable because its PF is: the inventory names PFs, the VFs come and go.
    with VfioBinding(kvm_host.transport, vf, (*kvm_host.caps.assignable, vf)) as binding:
        ids = binding.ids
        vm = boot_vm(VMSpec(host_devices=(vf,)))
        listed = vm.run(f"lspci -n -d {ids}", check=True).stdout.strip()
        kvm_note("sriov", f"VF {vf} ({ids}) of PF {bdf(pf)} -> guest: {listed or 'not listed'}")
        assert listed, f"the guest's lspci does not show the assigned VF {vf} ({ids})"
        vm.destroy()
    pf.write("sriov_numvfs", 0)
    assert poll(lambda: not virtfns(pf), SETTLE_S, 0.2), f"writing 0 to sriov_numvfs left {virtfns(pf)}"
