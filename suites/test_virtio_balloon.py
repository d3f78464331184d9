"""Handbook 1.x, virtio-balloon: the host takes memory back from a running guest.

The handbook starts the balloon with ``-balloon virtio`` (removed in QEMU 3.1); today it
is an ordinary PCI device, ``-device virtio-balloon-pci``. The guest must show the
device, bind the virtio_balloon driver, and give up (and get back) the memory the
monitor asks for.
"""
import time

from pytest_kvmcheck import VMSpec, vm_fixture, wait_until
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.qemu.legacy import describe, form

MEMORY_MIB = 512
TOLERANCE_MIB = 8  # MemTotal moves by the ballooned amount, give or take page-table rounding
BALLOON = "1af4:1002"  # virtio memory balloon (legacy device id)

balloon_guest = vm_fixture(VMSpec(memory_mib=MEMORY_MIB, balloon=True))


def mem_total_mib(vm) -> int:
    return vm.guest.meminfo()["MemTotal"] // 1024


def test_lspci_shows_the_balloon(balloon_guest):
    """Handbook 1.x: ``lspci`` in the guest lists the "Virtio memory balloon"."""
    balloon = balloon_guest.guest.pci(name="Virtio memory balloon")
    assert balloon, "expected 'Virtio memory balloon' in lspci; the guest showed:\n" + \
        "\n".join(map(str, balloon_guest.guest.pci_functions()))


def test_virtio_balloon_driver_is_bound(balloon_guest):
    """Handbook 1.x: the guest binds virtio-pci to the function and virtio_balloon to the device."""
    function = balloon_guest.guest.pci(vendor_device=BALLOON)
    assert function and function.driver == "virtio-pci", \
        f"expected virtio-pci on the balloon's PCI function, got {function}"
    bound = balloon_guest.guest.drivers_bound("virtio", "virtio_balloon")
    assert any(d.startswith("virtio") for d in bound), \
        f"expected a virtio device bound to virtio_balloon, the driver dir holds {bound}"


def test_qmp_and_hmp_agree_on_the_balloon(balloon_guest):
    """Handbook 1.x: ``info balloon`` (HMP) and query-balloon (QMP) both show the full guest size."""
    actual = balloon_guest.qmp.cmd("query-balloon")["actual"]
    hmp = balloon_guest.qmp.hmp("info balloon").strip()
    assert actual == MEMORY_MIB * MIB, f"expected query-balloon actual={MEMORY_MIB} MiB, got {actual / MIB} MiB"
    assert hmp == f"balloon: actual={MEMORY_MIB}", f"expected HMP 'balloon: actual={MEMORY_MIB}', got {hmp!r}"


STALL_S = 15.0  # the balloon must keep moving: a busy nested guest gives pages back slowly, but steadily


def balloon_changes_to(vm, target_mib: int, timeout: float = 180.0) -> None:
    """QEMU must report the guest reaching the target in a BALLOON_CHANGE event, the balloon
    moving all the while (no event for STALL_S: it is stuck)."""
    wait_until(lambda: [e["data"]["actual"] // MIB for e in vm.qmp.events("BALLOON_CHANGE")],
               timeout, f"a BALLOON_CHANGE event reporting {target_mib} MiB",
               show=lambda reported: f"the events reported {reported or 'nothing'} (MiB)",
               done=lambda reported: target_mib in reported, stall=STALL_S)


def test_shrink_and_grow_back(balloon_guest, kvm_metric):
    """Handbook 1.x: ``balloon N`` in the monitor; the guest's MemTotal shrinks by what it gave up, then grows back."""
    vm = balloon_guest
    before = mem_total_mib(vm)
    target = MEMORY_MIB // 2
    vm.qmp.clear_events()
    asked = time.monotonic()
    vm.qmp.cmd("balloon", value=target * MIB)
    balloon_changes_to(vm, target)
    kvm_metric("balloon_response", time.monotonic() - asked, "s")
    expected = before - (MEMORY_MIB - target)
    wait_until(lambda: mem_total_mib(vm), 20,
               f"MemTotal about {expected} MiB (+-{TOLERANCE_MIB}) after ballooning to {target} MiB (was {before} MiB)",
               done=lambda now: abs(now - expected) <= TOLERANCE_MIB, show=lambda now: f"the guest shows {now} MiB")
    assert vm.qmp.cmd("query-balloon")["actual"] == target * MIB

    vm.qmp.clear_events()
    vm.qmp.cmd("balloon", value=MEMORY_MIB * MIB)
    balloon_changes_to(vm, MEMORY_MIB)
    wait_until(lambda: mem_total_mib(vm), 20, f"MemTotal back at {before} MiB",
               done=lambda now: abs(now - before) <= TOLERANCE_MIB, show=lambda now: f"the guest shows {now} MiB")


def test_handbook_balloon_option(kvm_host, kvm_note):
    """Handbook 1.x: ``-balloon virtio`` is rejected since QEMU 3.1; ``-device virtio-balloon-pci`` is accepted."""
    row = form("-balloon virtio")
    kvm_note("handbook", describe(row))
    legacy = kvm_host.accepts(["-balloon", "virtio"])
    if row.removed_in(kvm_host.caps.qemu_version):
        assert not legacy.ok and "balloon" in legacy.stderr, \
            f"expected QEMU {kvm_host.caps.qemu_version_text} to reject -balloon, it said: {legacy.stderr.strip()}"
    else:
        assert legacy.ok, f"expected QEMU {kvm_host.caps.qemu_version_text} to accept -balloon: {legacy.stderr}"
    modern = kvm_host.accepts(["-machine", "pc", "-device", "virtio-balloon-pci"])
    assert modern.ok, f"expected '-device virtio-balloon-pci' to be accepted, QEMU said: {modern.stderr.strip()}"
