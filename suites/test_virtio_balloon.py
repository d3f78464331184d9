"""Handbook 1.x, virtio-balloon: the host takes memory back from a running guest.

The handbook starts the balloon with ``-balloon virtio`` (removed in QEMU 3.1); today it
is an ordinary PCI device, ``-device virtio-balloon-pci``. The guest must show the
device, bind the virtio_balloon driver, and give up (and get back) the memory the
monitor asks for. Beyond the handbook, what production hosts lean on: the guest's memory
statistics polled through the balloon, free page reporting (memory the guest frees goes
back to the host), and deflate-on-oom (a guest under pressure takes pages back from the
balloon instead of killing a process).
"""
import time

import pytest

from pytest_kvmcheck import VMSpec, premise, vm_fixture, wait_until
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.qemu.legacy import describe, form

MEMORY_MIB = 512
TOLERANCE_MIB = 8  # MemTotal moves by the ballooned amount, give or take page-table rounding
BALLOON = "1af4:1002"  # virtio memory balloon (legacy device id)

STATS_INTERVAL_S = 1
balloon_guest = vm_fixture(VMSpec(memory_mib=MEMORY_MIB, balloon=True,
                                  balloon_options=(f"guest-stats-polling-interval={STATS_INTERVAL_S}",)))


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


def guest_stats(vm) -> dict:
    """The balloon's last report of the guest's memory: ``last-update`` (s) and MiB free and available."""
    got = vm.qmp.cmd("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
    return {"last-update": got["last-update"], "free": got["stats"]["stat-free-memory"] // MIB,
            "available": got["stats"]["stat-available-memory"] // MIB}


STATS_MOVE_MIB = 96  # of the 128 MiB the guest takes and gives back


def settled(vm, show) -> dict:
    """A statistics report taken after this call, and agreeing with the one before it within
    8 MiB: not a report from before (QEMU keeps the last), nor one mid-way through the guest
    getting memory back from the balloon."""
    reports: list[dict] = []

    def fresh_pair():
        now = guest_stats(vm)
        if not reports or now["last-update"] != reports[-1]["last-update"]:
            reports.append(now)
        return reports[1:]

    return wait_until(fresh_pair, 20 * STATS_INTERVAL_S, f"two fresh statistics reports (guest-stats-polling-interval={STATS_INTERVAL_S}: "
                      f"one every {STATS_INTERVAL_S} s) that agree within 8 MiB",
                      done=lambda r: len(r) >= 2 and abs(r[-1]["free"] - r[-2]["free"]) <= 8,
                      show=lambda r: "; ".join(map(show, r)) or "no fresh report")[-1]


def test_guest_memory_statistics_follow_the_guest(balloon_guest):
    """Handbook 1.x, beyond it: balloon statistics (guest-stats-polling-interval): the free and available memory
    QEMU reports fall when the guest takes 128 MiB of RAM and rise when it gives them back."""
    vm = balloon_guest
    show = lambda s: f"{s['free']} MiB free, {s['available']} MiB available (update at {s['last-update']})"  # noqa: E731
    before = settled(vm, show)
    held = vm.guest.hold_memory(128)
    try:
        low = wait_until(lambda: guest_stats(vm), 10 * STATS_INTERVAL_S,
                         f"statistics showing at least {STATS_MOVE_MIB} MiB less free and available memory "
                         f"after the guest took 128 MiB (before: {show(before)})",
                         done=lambda s: before["free"] - s["free"] >= STATS_MOVE_MIB
                         and before["available"] - s["available"] >= STATS_MOVE_MIB, show=show)
    finally:
        held.release()
    # Free or available: on a busy host the guest's own page cache can take a few MiB of what
    # came back (CI once saw free rise by 95 MiB, one short of the mark).
    wait_until(lambda: guest_stats(vm), 20 * STATS_INTERVAL_S,
               f"statistics showing the 128 MiB free again (while taken: {show(low)})",
               done=lambda s: max(s["free"] - low["free"], s["available"] - low["available"]) >= STATS_MOVE_MIB,
               show=show)


REPORTED_MIB = 256  # the guest fills and frees this much; reporting must hand most of it back


@pytest.mark.kvm_requires("qemu>=5.1")
def test_free_page_reporting_returns_freed_memory(boot_vm, kvm_metric):
    """Handbook 1.x, beyond it: free-page-reporting=on: after the guest frees a large allocation, the
    QEMU process's resident memory shrinks by most of it (the guest reports the free pages
    and QEMU discards them), without the monitor asking for anything."""
    vm = boot_vm(VMSpec(memory_mib=MEMORY_MIB, balloon=True, balloon_options=("free-page-reporting=on",)))
    rss = lambda: int(vm.process.status()["VmRSS"].split()[0]) // 1024  # noqa: E731  (MiB)
    baseline = rss()
    # Held until measured, then freed: measuring after a short-lived allocation races the report
    # itself (the guest reports free pages 2 s after they are freed; a busy host answers later).
    held = vm.guest.hold_memory(REPORTED_MIB)
    try:
        filled = rss()
        premise(filled - baseline >= REPORTED_MIB // 2, f"the guest's {REPORTED_MIB} MiB allocation must raise "
                f"QEMU's RSS (from {baseline} MiB; {filled} MiB while the guest held it)")
    finally:
        held.release()
    freed = time.monotonic()
    # The guest reports 2 s after the free (measured: 2.0 s under TCG); 20 s is ten times that.
    wait_until(rss, 20, f"QEMU's RSS down by at least {REPORTED_MIB // 2} MiB from {filled} MiB after the guest "
                        f"freed {REPORTED_MIB} MiB", done=lambda now: filled - now >= REPORTED_MIB // 2,
               show=lambda now: f"{now} MiB", interval=0.5)
    kvm_metric("free_page_reporting_response", time.monotonic() - freed, "s")


# A disk-image guest pages its own programs out and back in long before the kernel's OOM path
# (where the balloon gives memory back) is reached: minutes under TCG. The tiny guest's root is RAM.
@pytest.mark.kvm_requires("tiny-guest")
def test_deflate_on_oom_spares_the_guests_processes(boot_vm):
    """Handbook 1.x, beyond it: deflate-on-oom=on: a guest squeezed by the balloon, then asked for more
    memory than it has left, takes pages back from the balloon; the OOM killer does not fire."""
    vm = boot_vm(VMSpec(memory_mib=MEMORY_MIB, balloon=True, balloon_options=("deflate-on-oom=on",)))
    target = MEMORY_MIB // 2
    vm.qmp.clear_events()
    vm.qmp.cmd("balloon", value=target * MIB)
    balloon_changes_to(vm, target)
    want = vm.guest.meminfo()["MemAvailable"] // 1024 + 64  # more than the guest has left
    # dd holds one buffer of bs bytes, all of it touched: an anonymous allocation of want MiB.
    result = vm.guest.run(["dd", "if=/dev/zero", "of=/dev/null", f"bs={want}M", "count=1"], timeout=120)
    killed = vm.guest.dmesg(r"Out of memory|oom-kill|invoked oom-killer")
    assert result.ok and not killed, (f"the guest's {want} MiB allocation {'ended' if result.ok else 'was killed'} "
                                      f"(exit {result.exit_status}) with the balloon at {target} MiB: the OOM killer "
                                      f"fired instead of the balloon deflating: {killed[:3]}")
    actual = vm.qmp.cmd("query-balloon")["actual"] // MIB
    assert actual > target, f"the balloon still holds the guest at {actual} MiB: it did not deflate"
