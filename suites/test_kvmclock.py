"""Handbook 1.x, kvm-clock: the paravirtual clock a guest uses under KVM.

kvm-clock exists only under KVM (the hypervisor publishes time through MSRs); under TCG
the guest has tsc, hpet and acpi_pm, so these tests skip there with the reason.
"""
import time

import pytest

from pytest_kvmcheck import VMSpec, vm_fixture

WALL_CLOCK_TOLERANCE_S = 2.0

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
