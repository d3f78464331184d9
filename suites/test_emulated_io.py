"""Handbook 1.1, emulated I/O: the baseline the paravirtual devices are compared against.

A guest with an emulated Intel e1000 NIC (its SSH runs over it) and an IDE disk on the
PIIX IDE controller boots, and both devices work: the NIC carries traffic both ways and
the disk reads back what was written.
"""
from pytest_kvmcheck import Disk, Nic, VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import (MIB, block_size_bytes, disk_round_trip, driver_of, iface_by_mac, lspci,
                                       lspci_line, transfer_through_guest)
from pytest_kvmcheck.vmspec import nic_mac

SIZE_MIB = 32

emulated_guest = vm_fixture(VMSpec(nics=(Nic("e1000"),), disks=(Disk(size_mib=SIZE_MIB, interface="ide-hd"),)))


def test_lspci_shows_the_emulated_devices(emulated_guest):
    shown = lspci(emulated_guest)
    for name in ("82540EM Gigabit Ethernet Controller", "PIIX3 IDE"):
        assert any(name in line for line in shown), \
            f"expected {name!r} in lspci, the guest showed:\n" + "\n".join(shown)
    virtio_nic = lspci_line(emulated_guest, "Virtio network device")
    assert not virtio_nic, f"expected no virtio NIC in the emulated baseline, lspci shows {virtio_nic!r}"


def test_e1000_driver_carries_traffic(emulated_guest):
    iface = iface_by_mac(emulated_guest, nic_mac(emulated_guest.spec, 0, emulated_guest.seed))
    driver = driver_of(emulated_guest, f"/sys/class/net/{iface}/device")
    assert driver == "e1000", f"expected {iface} driven by e1000, got {driver!r}"
    moved = transfer_through_guest(emulated_guest, MIB)
    assert moved["guest_received_sha256"] == moved["sent_sha256"] and \
        moved["received_sha256"] == moved["guest_sent_sha256"], f"1 MiB each way over e1000 was corrupted: {moved}"


def test_ide_disk_is_seen(emulated_guest):
    disks = emulated_guest.run("ls /sys/block", check=True).stdout.split()
    assert "sda" in disks, f"expected the IDE disk as sda, the guest's block devices are {disks}"
    host_driver = driver_of(emulated_guest, "/sys/block/sda/device/../../../..")
    assert host_driver == "ata_piix", f"expected sda behind ata_piix, got {host_driver!r}"
    size = block_size_bytes(emulated_guest, "sda")
    assert size == SIZE_MIB * MIB, f"expected sda of {SIZE_MIB} MiB, the guest sees {size / MIB:.1f} MiB"


def test_ide_disk_reads_back_what_was_written(emulated_guest):
    written, read = disk_round_trip(emulated_guest, "/dev/sda", mib=4)
    assert read == written, f"wrote 4 MiB with sha256 {written}, read back {read}"
