"""Handbook 1.x, virtio-balloon: the host takes memory back from a running guest.

The handbook starts the balloon with ``-balloon virtio`` (removed in QEMU 3.1); today it
is an ordinary PCI device, ``-device virtio-balloon-pci``. The guest must show the
device, bind the virtio_balloon driver, and give up (and get back) the memory the
monitor asks for.
"""

from pytest_kvmcheck import VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import MIB, lspci, lspci_line, meminfo, pci_driver
from pytest_kvmcheck.handbook import describe, form, try_options
from pytest_kvmcheck.vm import poll

MEMORY_MIB = 512
TOLERANCE_MIB = 8  # MemTotal moves by the ballooned amount, give or take page-table rounding

balloon_guest = vm_fixture(VMSpec(memory_mib=MEMORY_MIB, balloon=True))


def test_lspci_shows_the_balloon(balloon_guest):
    line = lspci_line(balloon_guest, "Virtio memory balloon")
    assert line, "expected 'Virtio memory balloon' in lspci; the guest showed:\n" + "\n".join(lspci(balloon_guest))


def test_virtio_balloon_driver_is_bound(balloon_guest):
    driver = pci_driver(balloon_guest, "1af4:1002")
    assert driver == "virtio-pci", f"expected virtio-pci on the balloon's PCI function, got {driver!r}"
    drivers = balloon_guest.run("ls /sys/bus/virtio/drivers/virtio_balloon", check=True).stdout.split()
    assert any(d.startswith("virtio") for d in drivers), \
        f"expected a virtio device bound to virtio_balloon, the driver dir holds {drivers}"


def test_qmp_and_hmp_agree_on_the_balloon(balloon_guest):
    actual = balloon_guest.qmp.cmd("query-balloon")["actual"]
    hmp = balloon_guest.qmp.hmp("info balloon").strip()
    assert actual == MEMORY_MIB * MIB, f"expected query-balloon actual={MEMORY_MIB} MiB, got {actual / MIB} MiB"
    assert hmp == f"balloon: actual={MEMORY_MIB}", f"expected HMP 'balloon: actual={MEMORY_MIB}', got {hmp!r}"


def balloon_changes_to(vm, target_mib: int, timeout: float = 20.0) -> None:
    """QEMU must report the guest reaching the target in a BALLOON_CHANGE event."""
    reached = poll(lambda: any(e["data"]["actual"] == target_mib * MIB for e in vm.qmp.events("BALLOON_CHANGE")),
                   timeout, 0.1)
    reported = [e["data"]["actual"] // MIB for e in vm.qmp.events("BALLOON_CHANGE")]
    assert reached, f"no BALLOON_CHANGE event reported {target_mib} MiB within {timeout:.0f} s; " \
                    f"the events reported {reported or 'nothing'} (MiB)"


def test_shrink_and_grow_back(balloon_guest):
    """Handbook: ``balloon N`` in the monitor; the guest's MemTotal shrinks by what it gave up, then grows back."""
    vm = balloon_guest
    before = meminfo(vm)["MemTotal"] // 1024
    target = MEMORY_MIB // 2
    vm.qmp.clear_events()
    vm.qmp.cmd("balloon", value=target * MIB)
    balloon_changes_to(vm, target)
    expected = before - (MEMORY_MIB - target)
    shrunk = poll(lambda: (m := meminfo(vm)["MemTotal"] // 1024) <= expected + TOLERANCE_MIB and m, 20, interval=0.2)
    now = meminfo(vm)["MemTotal"] // 1024
    assert shrunk and abs(now - expected) <= TOLERANCE_MIB, \
        f"expected MemTotal about {expected} MiB (+-{TOLERANCE_MIB}) after ballooning to {target} MiB, " \
        f"the guest shows {now} MiB (was {before} MiB)"
    assert vm.qmp.cmd("query-balloon")["actual"] == target * MIB

    vm.qmp.clear_events()
    vm.qmp.cmd("balloon", value=MEMORY_MIB * MIB)
    balloon_changes_to(vm, MEMORY_MIB)
    grown = poll(lambda: abs(meminfo(vm)["MemTotal"] // 1024 - before) <= TOLERANCE_MIB, 20, interval=0.2)
    assert grown, f"expected MemTotal back at {before} MiB, the guest shows {meminfo(vm)['MemTotal'] // 1024} MiB"


def test_handbook_balloon_option(kvm_host, kvm_note):
    """``-balloon virtio``: rejected since QEMU 3.1, the modern device is accepted."""
    row = form("-balloon virtio")
    kvm_note("handbook", describe(row))
    legacy = try_options(kvm_host, ["-balloon", "virtio"])
    if row.removed_in(kvm_host.caps.qemu_version):
        assert not legacy.ok and "balloon" in legacy.stderr, \
            f"expected QEMU {kvm_host.caps.qemu_version_text} to reject -balloon, it said: {legacy.stderr.strip()}"
    else:
        assert legacy.ok, f"expected QEMU {kvm_host.caps.qemu_version_text} to accept -balloon: {legacy.stderr}"
    modern = try_options(kvm_host, ["-machine", "pc", "-device", "virtio-balloon-pci"])
    assert modern.ok, f"expected '-device virtio-balloon-pci' to be accepted, QEMU said: {modern.stderr.strip()}"
