"""Handbook 5, nested virtualization: a guest that is itself a KVM host.

With the host's kvm_amd/kvm_intel ``nested`` parameter on, a guest given the host's CPU
(``-cpu host``) sees svm (AMD) or vmx (Intel), loads kvm and runs its own guest through
/dev/kvm. The handbook enables it with ``modprobe kvm_intel nested=1``; that is still the
switch on today's kernels (on by default since 4.20 for AMD and 5.0 for Intel). The same
host can withhold it per guest: ``-cpu host,svm=off,vmx=off`` is how QEMU (and libvirt's
``<feature policy='disable' name='svm'/>``) turns nesting off for one guest, without
reloading the module under the host's other guests.

Running a guest inside the guest is done by ``kvmcheck-kvm-probe`` (built into the tiny
image): it creates a VM and a vCPU through /dev/kvm and runs three real-mode instructions,
so a pass means a third-level guest really executed, not only that a device node exists.
"""
import pytest

from pytest_kvmcheck import VMSpec, vm_fixture

pytestmark = pytest.mark.kvm_requires("kvm", "nested")

VIRT_FLAGS = ("svm", "vmx")

nested_guest = vm_fixture({
    "nested-on": VMSpec(cpu="host", guest_kvm=True),
    "nested-off": VMSpec(cpu="host,svm=off,vmx=off", guest_kvm=True),
})


def cpu_virt_flags(vm) -> set[str]:
    return {f for f in vm.guest.cpu_flags() if f in VIRT_FLAGS}


def test_guest_cpu_shows_virtualization_extensions(nested_guest, kvm_caps):
    """Handbook 5: with nesting on, the guest's CPU shows the host's svm/vmx; with svm=off,vmx=off, neither."""
    host_flags = {f for f in kvm_caps.cpu_flags if f in VIRT_FLAGS}
    seen = cpu_virt_flags(nested_guest)
    if nested_guest.mode == "nested-on":
        assert seen == host_flags, \
            f"with nested={kvm_caps.nested} on the host ({', '.join(sorted(host_flags))}), the guest's CPU " \
            f"should show the same extension; it shows {sorted(seen) or 'none'}"
    else:
        assert not seen, f"with svm=off,vmx=off the guest's CPU should show neither; it shows {sorted(seen)}"


def test_guest_kvm_module_and_device(nested_guest):
    """Handbook 5: the nested guest loads kvm and kvm_amd/kvm_intel and has /dev/kvm; without svm/vmx it cannot."""
    loaded = nested_guest.guest.modules()
    has_dev = nested_guest.guest.exists("/dev/kvm")
    if nested_guest.mode == "nested-on":
        assert {"kvm"} <= loaded and loaded & {"kvm_amd", "kvm_intel"}, \
            f"the guest should have loaded kvm and kvm_amd/kvm_intel at boot; loaded: {sorted(loaded)}"
        assert has_dev, "the guest loaded kvm but has no /dev/kvm"
    else:
        assert not (loaded & {"kvm_amd", "kvm_intel"}), \
            f"without svm/vmx, kvm_amd/kvm_intel must refuse to load; loaded: {sorted(loaded)}"
        assert not has_dev, "without svm/vmx the guest must have no /dev/kvm"


def test_guest_runs_its_own_guest(nested_guest, kvm_note):
    """Handbook 5: the guest runs a guest of its own through /dev/kvm (kvmcheck-kvm-probe halts it)."""
    result = nested_guest.run(["kvmcheck-kvm-probe"], timeout=60)
    kvm_note("kvm-probe", f"exit {result.exit_status}: {result.stdout.strip()} {result.stderr.strip()}")
    if nested_guest.mode == "nested-on":
        assert result.ok and "guest-halted" in result.stdout, \
            f"a VM created through the guest's /dev/kvm should run and halt; the probe said (exit " \
            f"{result.exit_status}):\n{result.stdout}{result.stderr}"
    else:
        assert not result.ok and "vm-created" not in result.stdout, \
            f"with nesting off the guest must not be able to create a VM; the probe said:\n{result.stdout}"
