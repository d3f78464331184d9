"""Handbook 1.x, virtio-blk: the paravirtual disk.

The handbook writes ``-drive file=IMG,if=virtio``; today's explicit form is a
``-blockdev`` pair plus ``-device virtio-blk-pci``. The guest must see /dev/vd*, driven
by virtio_blk, of the configured size, and read back exactly what it wrote; QEMU's own
block statistics must show the writes. What the guest fsync'd must outlast QEMU.
"""

import secrets
import statistics

import pytest

from pytest_kvmcheck import Disk, VMSpec, poll, vm_fixture
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.hosts.power import power_cycle
from pytest_kvmcheck.qemu.spec import CACHE_MODES
from pytest_kvmcheck.qemu.legacy import describe, form

SIZE_MIB = 64
SERIAL = "kvmcheck0"
DISK_ID = "disk0"  # the qdev id vmspec gives the spec's first data disk

blk_guest = vm_fixture({
    fmt: VMSpec(disks=(Disk(size_mib=SIZE_MIB, interface="virtio-blk-pci", format=fmt, serial=SERIAL),))
    for fmt in ("qcow2", "raw")
})


@pytest.fixture
def data_disk(blk_guest):
    """The disk under test, found by its serial (a disk-image guest's boot disk is vda)."""
    return blk_guest.guest.block_device(SERIAL)


def test_disk_shows_as_vd(data_disk):
    """Handbook 1.x: a virtio disk appears in the guest as /dev/vd*."""
    assert data_disk.name.startswith("vd"), \
        f"expected the virtio disk with serial {SERIAL} as /dev/vd*, it is {data_disk.name}"


def test_virtio_blk_driver_is_bound(data_disk):
    """Handbook 1.x: the guest drives the disk with virtio_blk."""
    assert data_disk.driver == "virtio_blk", f"expected {data_disk.name} driven by virtio_blk, got {data_disk.driver!r}"


def test_disk_has_the_configured_size(data_disk):
    """Handbook 1.x: the guest sees the image's size (64 MiB), in qcow2 and raw alike."""
    size = data_disk.size_bytes
    assert size == SIZE_MIB * MIB, f"expected {data_disk.name} of {SIZE_MIB} MiB, the guest sees {size / MIB:.1f} MiB"


def test_written_pattern_reads_back(blk_guest, data_disk):
    """Handbook 1.x: 4 MiB written through virtio-blk read back intact, and QEMU counted the writes."""
    written = data_disk.write_pattern(4)
    read = data_disk.checksum(4)
    assert read == written, f"wrote 4 MiB with sha256 {written}, read back {read}"
    # QEMU's own count for this disk only (its qdev id), not any other disk's (a boot disk).
    stats = {s.get("qdev", ""): s["stats"] for s in blk_guest.qmp.cmd("query-blockstats")}
    qdev = next((q for q in stats if q == DISK_ID or q.startswith(f"/machine/peripheral/{DISK_ID}/")), None)
    assert qdev, f"query-blockstats has no entry for the disk {DISK_ID}: {sorted(stats)}"
    wr = stats[qdev]["wr_bytes"]
    assert wr >= 4 * MIB, f"expected QEMU's block stats for {DISK_ID} to count at least 4 MiB written, they show " \
                          f"{wr} bytes"


def test_handbook_drive_option(kvm_host, kvm_note):
    """Handbook 1.x: ``-drive file=IMG,if=virtio`` is still accepted; -blockdev + -device is the explicit form."""
    kvm_note("handbook", describe(form("-drive file=IMG,if=virtio")))
    image = kvm_host.transport.qemu_img.create(f"{kvm_host.run_dir}/handbook-drive-{kvm_host.name}.qcow2", 16)
    try:
        legacy = kvm_host.accepts(["-machine", "pc", "-drive", f"file={image},if=virtio,format=qcow2"])
        assert legacy.ok, f"expected -drive ...,if=virtio to be accepted: {legacy.stderr.strip()}"
        modern = kvm_host.accepts(["-machine", "pc", "-blockdev", f"driver=file,filename={image},node-name=f0",
                                   "-blockdev", "driver=qcow2,file=f0,node-name=d0",
                                   "-device", "virtio-blk-pci,drive=d0"])
        assert modern.ok, f"expected the -blockdev form to be accepted: {modern.stderr.strip()}"
    finally:
        kvm_host.transport.run(["rm", "-f", image])


PERF_ROUNDS = 3  # alternating rounds: a slow spell of the host hurts both disks alike
PERF_SECONDS = 1.0  # 900-1000 random reads a run on virtio-blk in the lab; 2 s runs kept the machine 25 s
# The handbook's direction, with margins from measurements (nested KVM in the lab, one request
# at a time): random 4 KiB reads 4.8x as many on virtio-blk as on IDE, sequential 1 MiB reads
# 1.6x as fast. Asserted: at least 2x and 1x. Under TCG both devices are emulated in software
# and measure within 30 % of each other, so the claim is not checked there (needs kvm).
MIN_RANDOM_RATIO, MIN_SEQUENTIAL_RATIO = 2.0, 1.0


@pytest.mark.kvm_requires("kvm", "tiny-guest")
def test_virtio_blk_outperforms_ide(boot_vm, kvm_metric, kvm_note, kvm_alone):
    """Handbook 1.x: virtio-blk "improves block device I/O": against an IDE disk on the same
    guest, host and image format, with O_DIRECT and one request at a time, it does at least
    twice the random 4 KiB reads per second and reads sequentially at least as fast."""
    # Both on the same backend, a null one (reads return zeros at once): what is measured is the
    # device's cost, not the storage under it (NFS in the lab, which hid it at about 1.7x).
    null = "driver=null-co,size=268435456,read-zeroes=on,node-name="
    vm = boot_vm(VMSpec(extra_args=("-blockdev", null + "perfvirtio", "-blockdev", null + "perfide",
                                    "-device", "virtio-blk-pci,drive=perfvirtio,id=perfvirtio,serial=perfvirtio",
                                    "-device", "ide-hd,drive=perfide,id=perfide,bus=ide.0")))
    disks = {"virtio-blk": vm.guest.block_device("perfvirtio"),
             "ide": vm.guest.block(next(n for n in vm.guest.block_devices() if n.startswith("sd")))}
    samples: dict[tuple[str, str], list[float]] = {}
    with kvm_alone():
        for _ in range(PERF_ROUNDS):
            for name, disk in disks.items():
                samples.setdefault((name, "randread"), []).append(disk.direct_reads("randread", PERF_SECONDS).iops)
                samples.setdefault((name, "seqread"), []).append(disk.direct_reads("seqread", PERF_SECONDS).mb_per_s)
    for (name, pattern), values in samples.items():
        kvm_metric(f"{name.replace('-', '_')}_{pattern}", values, "IOPS" if pattern == "randread" else "MB/s", "higher")
    median = {key: statistics.median(values) for key, values in samples.items()}
    random_ratio = median["virtio-blk", "randread"] / median["ide", "randread"]
    sequential_ratio = median["virtio-blk", "seqread"] / median["ide", "seqread"]
    said = (f"random 4 KiB: virtio-blk {median['virtio-blk', 'randread']:.0f} IOPS, IDE {median['ide', 'randread']:.0f}"
            f" ({random_ratio:.1f}x); sequential 1 MiB: virtio-blk {median['virtio-blk', 'seqread']:.0f} MB/s, IDE "
            f"{median['ide', 'seqread']:.0f} ({sequential_ratio:.1f}x); medians of {PERF_ROUNDS} runs of {PERF_SECONDS:g} s")
    kvm_note("virtio-blk vs IDE", said)
    assert random_ratio >= MIN_RANDOM_RATIO and sequential_ratio >= MIN_SEQUENTIAL_RATIO, \
        f"virtio-blk is not faster than IDE by the handbook's margin ({MIN_RANDOM_RATIO}x random, " \
        f"{MIN_SEQUENTIAL_RATIO}x sequential): {said}"


DURABLE_MIB = 4


def durable_images(host, directory: str) -> dict[str, str]:
    """A qcow2 image per cache mode, in ``directory`` on the host (made here)."""
    host.makedirs(directory)
    return {mode: host.qemu_img.create(f"{directory}/durable-{mode}.qcow2", DURABLE_MIB * 4) for mode in CACHE_MODES}


def write_and_fsync(boot_vm, images: dict[str, str]):
    """A guest with one disk per cache mode writes a pattern to each and fsyncs it; returns
    the guest and each pattern's sha256."""
    writer = boot_vm(VMSpec(memory_mib=256, disks=tuple(Disk(path=path, serial=f"dur-{mode}", cache=mode)
                                                        for mode, path in images.items())))
    return writer, {mode: writer.guest.block_device(f"dur-{mode}").write_pattern(DURABLE_MIB) for mode in images}


def modes_that_lost(boot_vm, images: dict[str, str], written: dict[str, str]) -> list[str]:
    """A new guest reads each image: the cache modes whose fsync'd pattern is not there."""
    reader = boot_vm(VMSpec(memory_mib=256, disks=tuple(Disk(path=path, serial=f"dur-{mode}")
                                                        for mode, path in images.items())))
    return [mode for mode in images if reader.guest.block_device(f"dur-{mode}").checksum(DURABLE_MIB) != written[mode]]


def test_fsynced_writes_outlast_a_killed_qemu(boot_vm, kvm_host, kvm_note):
    """Handbook 1.x: what a guest wrote to a virtio-blk disk and fsync'd is in the image after
    QEMU is killed right away (SIGKILL: QEMU writes nothing on its way out), in every cache mode.

    Even ``unsafe``: it skips only the host's own flush to its disk; each guest flush still
    hands QEMU's caches (qcow2's tables) to the host kernel. This is the weaker half of
    durability: a host losing power also takes its page cache (the next check)."""
    images = durable_images(kvm_host.transport, f"{kvm_host.run_dir}/durable-{secrets.token_hex(3)}")
    writer, written = write_and_fsync(boot_vm, images)
    writer.host.kill(writer.pid, "KILL")
    assert poll(lambda: not writer.alive(), 10), f"QEMU {writer.pid} outlived SIGKILL"
    lost = modes_that_lost(boot_vm, images, written)
    kvm_note("durability", f"QEMU killed after the guest fsync'd {DURABLE_MIB} MiB to one disk per cache mode; "
                           f"lost in: {', '.join(lost) or 'none'}")
    assert not lost, f"data the guest fsync'd is not in the image after QEMU was killed, cache mode(s): " \
                     f"{', '.join(lost)}"


@pytest.mark.kvm_requires("power-cycle", "local-disk")
def test_fsynced_writes_outlast_a_power_loss(boot_vm, kvm_host, kvm_note, kvm_metric):
    """Handbook 1.x: what a guest fsync'd to a virtio-blk disk whose image is on the host's own
    disk is there after the host loses power, in every cache mode but ``unsafe`` (which skips
    the host's flushes, so its data may still sit in the page cache the power loss takes);
    the report says whether unsafe lost it."""
    host = kvm_host.transport
    with host.scratch_dir(f"{kvm_host.caps.local_dir}/kvmcheck-{secrets.token_hex(4)}") as directory:
        images = durable_images(host, directory)
        writer, written = write_and_fsync(boot_vm, images)
        took = power_cycle(host)
        writer.lost()
        kvm_metric("power_cycle", took, "s")
        lost = modes_that_lost(boot_vm, images, written)
        kvm_note("durability", f"host {kvm_host.name} power-cycled ({took:.0f} s) after the guest fsync'd "
                               f"{DURABLE_MIB} MiB to one disk per cache mode; lost in: {', '.join(lost) or 'none'}"
                               + ("" if "unsafe" in lost else " (unsafe's data had reached the disk anyway)"))
        must_keep = [mode for mode in lost if mode != "unsafe"]
        assert not must_keep, f"data the guest fsync'd is not on the disk after host {kvm_host.name} lost power, " \
                              f"cache mode(s): {', '.join(must_keep)}"
