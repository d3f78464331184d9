"""Handbook 6, KSM: the host merges identical guest pages.

QEMU marks guest RAM mergeable (``-machine mem-merge=on``, the default); ksmd, controlled
through /sys/kernel/mm/ksm, scans it and maps identical pages once. Three identical tiny
guests hold the same kernel and initramfs, so with KSM running the host's pages_sharing
must grow; with KSM stopped it must not. The handbook drives KSM through the ksm/ksmtuned
services; on today's hosts those are thin wrappers over the same sysfs knobs used here.
The knobs are host-wide: the suite records them first and writes them back at the end
(unmerging what it merged), and checks that they took.
"""
import time

import pytest

from pytest_kvmcheck import VMSpec
from pytest_kvmcheck.hostsettings import HostLock, SysfsSettings
from pytest_kvmcheck.vm import poll

pytestmark = pytest.mark.kvm_requires("ksm", "memory:1024")

KSM = "/sys/kernel/mm/ksm"
KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
GUESTS = 3
GUEST = VMSpec(memory_mib=256)
IDLE_WINDOW_S = 5.0  # KSM stopped: how long pages_sharing must stay flat
MERGE_DEADLINE_S = 120.0
MIN_NEW_SHARING = 2048  # pages (8 MiB): far less than three identical initramfs copies


@pytest.fixture
def ksm(kvm_host):
    with HostLock(kvm_host.transport, "ksm"):  # KSM is one per kernel: one test at a time drives it
        settings = SysfsSettings(kvm_host.transport, KSM, KNOBS)
        yield settings
        left = settings.restore(before={"run": 2})  # 2: stop and unmerge everything, then the original values
    assert not left, f"host {kvm_host.name}: could not restore KSM settings (original, now): {left}"


def mergeable_kib(vm) -> int:
    """KiB of the QEMU process's memory marked MADV_MERGEABLE ('mg' in smaps' VmFlags)."""
    total, size = 0, 0
    for line in vm.host.read_text(f"/proc/{vm.pid}/smaps").splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("VmFlags:") and " mg" in f" {line[8:]}":
            total += size
    return total


def test_ksm_merges_identical_guests_only_while_running(ksm, boot_vm, kvm_host, kvm_note):
    ksm.write("run", 0)
    guests = boot_vm.many(GUEST, GUESTS)
    unmarked = [vm.name for vm in guests if not mergeable_kib(vm)]
    assert not unmarked, f"host {kvm_host.name}: QEMU did not mark guest RAM mergeable (no mapping of " \
                         f"{', '.join(unmarked)} has the 'mg' VmFlag in smaps): KSM has nothing to merge"
    stopped_at = ksm.read_int("pages_sharing")
    scans = ksm.read_int("full_scans")
    time.sleep(IDLE_WINDOW_S)  # a negative check needs a window: nothing may merge in it
    assert ksm.read_int("pages_sharing") <= stopped_at and ksm.read_int("full_scans") == scans, \
        f"host {kvm_host.name}: with KSM stopped (run=0) pages_sharing went from {stopped_at} to " \
        f"{ksm.read('pages_sharing')} and full_scans from {scans} to {ksm.read('full_scans')}"

    ksm.write("pages_to_scan", 4096)
    ksm.write("sleep_millisecs", 10)
    ksm.write("run", 1)
    started = time.monotonic()
    grew = poll(lambda: ksm.read_int("pages_sharing") - stopped_at >= MIN_NEW_SHARING, MERGE_DEADLINE_S, 0.5)
    sharing = ksm.read_int("pages_sharing")
    kvm_note("ksm", f"pages_sharing {stopped_at} -> {sharing} in {time.monotonic() - started:.1f} s "
                    f"({GUESTS} guests of {GUEST.memory_mib} MiB), pages_shared {ksm.read('pages_shared')}")
    assert grew, f"host {kvm_host.name}: with KSM running, {GUESTS} identical guests should share at least " \
                 f"{MIN_NEW_SHARING} more pages within {MERGE_DEADLINE_S:.0f} s; pages_sharing went from " \
                 f"{stopped_at} to {sharing} (full_scans {ksm.read('full_scans')})"


def test_host_ksm_settings_are_restored(ksm, kvm_host):
    """The suite changes host-wide knobs; what it changes it writes back, and a fresh read agrees.

    Stands alone (any order, any worker): it changes the scan knobs itself, leaving ``run``
    (and so the host's merged pages) alone.
    """
    before = dict(ksm.original)
    ksm.write("pages_to_scan", int(before["pages_to_scan"]) + 1)
    ksm.write("sleep_millisecs", int(before["sleep_millisecs"]) + 1)
    assert ksm.read_int("pages_to_scan") == int(before["pages_to_scan"]) + 1, "the knob did not take the new value"
    left = ksm.restore()
    now = SysfsSettings(kvm_host.transport, KSM, KNOBS).original
    assert not left and now == before, \
        f"host {kvm_host.name}: KSM settings were {before} before the change and are {now} after the restore"
