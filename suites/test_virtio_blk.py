"""Handbook 1.x, virtio-blk: the paravirtual disk.

The handbook writes ``-drive file=IMG,if=virtio``; today's explicit form is a
``-blockdev`` pair plus ``-device virtio-blk-pci``. The guest must see /dev/vd*, driven
by virtio_blk, of the configured size, and read back exactly what it wrote; QEMU's own
block statistics must show the writes.
"""

import pytest

from pytest_kvmcheck import Disk, VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import MIB, block_device_by_serial, block_size_bytes, disk_round_trip, driver_of
from pytest_kvmcheck.handbook import describe, form, try_options

SIZE_MIB = 64
SERIAL = "kvmcheck0"
DISK_ID = "disk0"  # the qdev id vmspec gives the spec's first data disk

blk_guest = vm_fixture({
    fmt: VMSpec(disks=(Disk(size_mib=SIZE_MIB, interface="virtio-blk-pci", format=fmt, serial=SERIAL),))
    for fmt in ("qcow2", "raw")
})


@pytest.fixture(scope="module")
def data_disk(blk_guest) -> str:
    """The disk under test, found by its serial (a disk-image guest's boot disk is vda)."""
    return block_device_by_serial(blk_guest, SERIAL)


def test_disk_shows_as_vd(data_disk):
    assert data_disk.startswith("vd"), f"expected the virtio disk with serial {SERIAL} as /dev/vd*, it is {data_disk}"


def test_virtio_blk_driver_is_bound(blk_guest, data_disk):
    driver = driver_of(blk_guest, f"/sys/block/{data_disk}/device")
    assert driver == "virtio_blk", f"expected {data_disk} driven by virtio_blk, got {driver!r}"


def test_disk_has_the_configured_size(blk_guest, data_disk):
    size = block_size_bytes(blk_guest, data_disk)
    assert size == SIZE_MIB * MIB, f"expected {data_disk} of {SIZE_MIB} MiB, the guest sees {size / MIB:.1f} MiB"


def test_written_pattern_reads_back(blk_guest, data_disk):
    written, read = disk_round_trip(blk_guest, f"/dev/{data_disk}", mib=4)
    assert read == written, f"wrote 4 MiB with sha256 {written}, read back {read}"
    # QEMU's own count for this disk only (its qdev id), not any other disk's (a boot disk).
    stats = {s.get("qdev", ""): s["stats"] for s in blk_guest.qmp.cmd("query-blockstats")}
    qdev = next((q for q in stats if q == DISK_ID or q.startswith(f"/machine/peripheral/{DISK_ID}/")), None)
    assert qdev, f"query-blockstats has no entry for the disk {DISK_ID}: {sorted(stats)}"
    wr = stats[qdev]["wr_bytes"]
    assert wr >= 4 * MIB, f"expected QEMU's block stats for {DISK_ID} to count at least 4 MiB written, they show " \
                          f"{wr} bytes"


def test_handbook_drive_option(kvm_host, kvm_note, tmp_path_factory):
    """``-drive file=IMG,if=virtio``: still accepted; -blockdev + -device is the explicit form."""
    row = form("-drive file=IMG,if=virtio")
    kvm_note("handbook", describe(row))
    image = kvm_host.host_run.run_dir + "/handbook-drive.qcow2"
    kvm_host.transport.run([kvm_host.spec.qemu_img, "create", "-q", "-f", "qcow2", image, "16M"]).check()
    try:
        legacy = try_options(kvm_host, ["-machine", "pc", "-drive", f"file={image},if=virtio,format=qcow2"])
        assert legacy.ok, f"expected -drive ...,if=virtio to be accepted: {legacy.stderr.strip()}"
        modern = try_options(kvm_host, ["-machine", "pc",
                                         "-blockdev", f"driver=file,filename={image},node-name=f0",
                                         "-blockdev", "driver=qcow2,file=f0,node-name=d0",
                                         "-device", "virtio-blk-pci,drive=d0"])
        assert modern.ok, f"expected the -blockdev form to be accepted: {modern.stderr.strip()}"
    finally:
        kvm_host.transport.run(["rm", "-f", image])
