"""Handbook 1.x, kvm-clock: the paravirtual clock a guest uses under KVM, for "accurate
system time and wall time".

kvm-clock exists only under KVM (the hypervisor publishes time through MSRs); under TCG
the guest has tsc, hpet and acpi_pm, so these tests skip there with the reason.

Clocks on two machines are compared the way NTP does it: each remote reading is bracketed
by this machine's clock, and of five the one with the shortest round trip counts
(pytest_kvmcheck/clock.py); a check fails only when the difference exceeds its bound by
more than that uncertainty.
"""
import time

import pytest

from pytest_kvmcheck import VMSpec, premise, vm_fixture
from pytest_kvmcheck.clock import measure_offset
from pytest_kvmcheck.qemu.migration import guest_pause, migrate, stats

WALL_CLOCK_TOLERANCE_S = 2.0
DRIFT_WINDOW_S = 30
# Over the window. kvm-clock follows the host's clock, so a sound host shows drift of a few
# milliseconds at most (lab, over 60 s: 6-10 ms); a guest whose clock stops while its vCPUs are
# held (the sensitivity mutant pauses it 0.5 s in every 2.5) loses seconds. 50 ms in 30 s is the
# rate 100 ms in 60 s allowed: the window was halved, not the bound loosened.
DRIFT_BOUND_MS = 50
# Beyond the time the guest stood still (STOP to RESUME), when its clock stands still too.
STEP_TOLERANCE_MS = 200
# A looser measurement says nothing: the checks fail only by more than their uncertainty, so a
# host that answers slowly (a busy lab host: up to 60 ms) cannot fail them wrongly, only pass.
MAX_UNCERTAINTY_MS = 250

pytestmark = pytest.mark.kvm_requires("kvm")

clock_guest = vm_fixture(VMSpec())


def test_current_clocksource_is_kvm_clock(clock_guest):
    """Handbook 1.x: a guest under KVM keeps time with kvm-clock (its current clocksource)."""
    current, available = clock_guest.guest.clocksource()
    assert current == "kvm-clock", f"expected clocksource kvm-clock, the guest uses {current!r} (has: {available})"


def test_dmesg_shows_kvm_clock_msrs(clock_guest):
    """Handbook 1.x: the guest kernel found kvm-clock's MSRs ("kvm-clock: Using msrs ...")."""
    lines = clock_guest.guest.dmesg("kvm-clock")
    assert any("Using msrs" in line for line in lines), \
        "expected 'kvm-clock: Using msrs ...' in dmesg, kvm-clock lines were:\n" + ("\n".join(lines) or "(none)")


def test_guest_and_host_wall_clocks_agree(clock_guest, kvm_host):
    """Handbook 1.x: with kvm-clock the guest's wall clock follows the host's (within 2 s)."""
    host_before = float(kvm_host.transport.run(["date", "+%s.%N"]).check().stdout)
    guest = float(clock_guest.run(["date", "+%s"], check=True).stdout)
    host_after = float(kvm_host.transport.run(["date", "+%s.%N"]).check().stdout)
    skew = max(host_before - guest - 1, guest - host_after, 0.0)
    assert skew <= WALL_CLOCK_TOLERANCE_S, \
        f"expected guest and host wall clocks within {WALL_CLOCK_TOLERANCE_S} s, the guest is off by {skew:.1f} s " \
        f"(host {time.ctime(host_before)}, guest {time.ctime(guest)})"


def guest_minus_host(vm, host):
    """The guest's wall clock minus its host's, both against this machine's clock."""
    with host.transport.clock() as host_clock:
        offset = measure_offset(vm.guest.wall_clock) - measure_offset(host_clock)
    premise(offset.uncertainty * 1000 <= MAX_UNCERTAINTY_MS,
            f"clock readings from host {host.name} and its guest took too long to compare clocks: {offset}")
    return offset


def test_guest_clock_keeps_pace_with_the_host(clock_guest, kvm_host, kvm_metric):
    """Handbook 1.x: kvm-clock keeps the guest's wall clock with the host's: over DRIFT_WINDOW_S seconds
    with its vCPU kept busy, the guest's clock drifts from its host's by less than DRIFT_BOUND_MS.

    The clocks are read while the guest is idle: a busy vCPU slows the readings' round trips
    (on a small host, by tens of milliseconds), and with them the measurement."""
    first = guest_minus_host(clock_guest, kvm_host)
    busy = clock_guest.guest.start("while :; do :; done")
    try:
        time.sleep(DRIFT_WINDOW_S)  # the window is what is measured
    finally:
        clock_guest.guest.stop(busy)
    last = guest_minus_host(clock_guest, kvm_host)
    drift = last - first
    kvm_metric(f"clock_drift_{DRIFT_WINDOW_S}s", abs(drift.seconds) * 1000, "ms")
    assert abs(drift.seconds) * 1000 - drift.uncertainty * 1000 <= DRIFT_BOUND_MS, \
        f"over {DRIFT_WINDOW_S} s the guest's clock moved {drift} against host {kvm_host.name}'s " \
        f"(from {first} to {last}); the bound is {DRIFT_BOUND_MS} ms"


@pytest.mark.kvm_requires("kvm", on="peer")
def test_clock_across_live_migration(boot_vm, kvm_host, kvm_peer, kvm_note, kvm_metric):
    """Handbook 1.x and 4.3: after a live migration the guest still keeps time with kvm-clock,
    and its wall clock has not stepped by more than the time the guest stood still (its STOP
    on the source to its RESUME on the destination) plus STEP_TOLERANCE_MS.

    kvm-clock stands still while the guest is stopped, so the guest's clock falls behind by
    that pause. QEMU's downtime is the source's measure, not the pause: in a CI run a healthy
    guest's clock fell 3.6 s behind across a move QEMU gave 701 ms of downtime (in the lab, a
    healthy guest stood still 405 ms and its clock fell 335 ms behind). Every reading is
    against this machine's clock, one reference for both hosts."""
    source = boot_vm(VMSpec(memory_mib=256))
    clocksource, available = source.guest.clocksource()
    premise(clocksource == "kvm-clock", f"the source guest keeps time with {clocksource!r} (has {available}), "
                                        "not kvm-clock: test_current_clocksource_is_kvm_clock says why")
    before = measure_offset(source.guest.wall_clock)
    dest, uri = boot_vm.destination(source, kvm_peer)
    numbers = stats(migrate(source, uri, timeout=120, destination=dest))
    after = measure_offset(dest.guest.wall_clock)
    step = after - before
    with kvm_host.transport.clock() as source_clock, kvm_peer.transport.clock() as dest_clock:
        pause = guest_pause(source, dest, measure_offset(source_clock), measure_offset(dest_clock))
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name}: {numbers}; the guest stood still {pause}, "
                          f"its clock moved {step}")
    kvm_metric("clock_step_at_migration", abs(step.seconds) * 1000, "ms")
    uncertainty = step.uncertainty + pause.uncertainty
    premise(uncertainty * 1000 <= MAX_UNCERTAINTY_MS, f"the clock readings were too slow: the guest's clock "
                                                      f"moved {step}, the guest stood still {pause}")
    clocksource, available = dest.guest.clocksource()
    assert clocksource == "kvm-clock", \
        f"after the migration to {kvm_peer.name} the guest keeps time with {clocksource!r} (has {available})"
    bound = pause.seconds * 1000 + STEP_TOLERANCE_MS
    assert abs(step.seconds) * 1000 - uncertainty * 1000 <= bound, \
        f"the guest's wall clock stepped {step} across the migration; the guest stood still {pause} " \
        f"(QEMU's downtime {numbers['downtime_ms']} ms), the bound {bound:.0f} ms"
