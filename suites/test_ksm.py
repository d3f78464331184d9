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

from pytest_kvmcheck import VMSpec, wait_until
from pytest_kvmcheck.hosts.settings import HostLock, SysfsSettings

pytestmark = [pytest.mark.kvm_requires("ksm", "memory:1024"), pytest.mark.kvm_changes_host("KSM's knobs")]

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
        settings = SysfsSettings(kvm_host.transport, KSM, KNOBS, restore_first={"run": 2})  # 2: stop, unmerge all
        yield settings
        left = settings.restore()
    assert not left, f"host {kvm_host.name}: could not restore KSM settings (original, now): {left}"


def test_ksm_merges_identical_guests_only_while_running(ksm, boot_vm, kvm_host, kvm_note):
    """Handbook 6: QEMU marks guest RAM mergeable; identical guests share pages only while ksmd runs."""
    ksm.write("run", 0)
    guests = boot_vm.many(GUEST, GUESTS)
    unmarked = [vm.name for vm in guests if not vm.process.mergeable_kib()]
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
    sharing = wait_until(lambda: ksm.read_int("pages_sharing"), MERGE_DEADLINE_S,
                         f"host {kvm_host.name}: with KSM running, {GUESTS} identical guests sharing at least "
                         f"{MIN_NEW_SHARING} more pages than the {stopped_at} before",
                         done=lambda now: now - stopped_at >= MIN_NEW_SHARING, interval=0.5,
                         show=lambda now: f"pages_sharing {now} (full_scans {ksm.read('full_scans')})")
    kvm_note("ksm", f"pages_sharing {stopped_at} -> {sharing} in {time.monotonic() - started:.1f} s "
                    f"({GUESTS} guests of {GUEST.memory_mib} MiB), pages_shared {ksm.read('pages_shared')}")


def test_host_ksm_settings_are_restored(ksm, kvm_host):
    """Handbook 6: the suite changes host-wide KSM knobs; what it changes it writes back, and a fresh read agrees.

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
