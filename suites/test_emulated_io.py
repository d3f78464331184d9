"""Handbook 1.1, emulated I/O: the baseline the paravirtual devices are compared against.

A guest with an emulated Intel e1000 NIC (its SSH runs over it) and an IDE disk on the
PIIX IDE controller boots, and both devices work: the NIC carries traffic both ways and
the disk reads back what was written.
"""
from pytest_kvmcheck import Disk, Nic, VMSpec, vm_fixture
from pytest_kvmcheck.guests.shows import MIB

SIZE_MIB = 32
IDE_DISK = "sda"  # the tiny guest boots from RAM: the IDE disk is the first disk

emulated_guest = vm_fixture(VMSpec(nics=(Nic("e1000"),), disks=(Disk(size_mib=SIZE_MIB, interface="ide-hd"),)))


def test_lspci_shows_the_emulated_devices(emulated_guest):
    """Handbook 1.1: lspci lists the Intel 82540EM NIC and the PIIX3 IDE controller, and no virtio NIC."""
    functions = emulated_guest.guest.pci_functions()
    for name in ("82540EM Gigabit Ethernet Controller", "PIIX3 IDE"):
        assert any(name in f.name for f in functions), \
            f"expected {name!r} in lspci, the guest showed:\n" + "\n".join(map(str, functions))
    virtio_nic = [f for f in functions if "Virtio network device" in f.name]
    assert not virtio_nic, f"expected no virtio NIC in the emulated baseline, lspci shows {virtio_nic}"


def test_e1000_driver_carries_traffic(emulated_guest):
    """Handbook 1.1: the e1000 driver runs the NIC, and 1 MiB each way arrives intact."""
    nic = emulated_guest.guest.nic(emulated_guest.mac(0))
    assert nic.driver == "e1000", f"expected {nic.name} driven by e1000, got {nic.driver!r}"
    moved = emulated_guest.guest.transfer(MIB)
    assert moved["guest_received_sha256"] == moved["sent_sha256"] and \
        moved["received_sha256"] == moved["guest_sent_sha256"], f"1 MiB each way over e1000 was corrupted: {moved}"


def test_ide_disk_is_seen(emulated_guest):
    """Handbook 1.1: the IDE disk is sda, behind ata_piix, of the configured size."""
    disk = emulated_guest.guest.block(IDE_DISK)
    controller = emulated_guest.guest.driver_of(f"/sys/block/{disk.name}/device/../../../..")
    assert controller == "ata_piix", f"expected {disk.name} behind ata_piix, got {controller!r}"
    assert disk.size_bytes == SIZE_MIB * MIB, \
        f"expected {disk.name} of {SIZE_MIB} MiB, the guest sees {disk.size_bytes / MIB:.1f} MiB"


def test_ide_disk_reads_back_what_was_written(emulated_guest):
    """Handbook 1.1: 4 MiB written to the IDE disk read back with the same checksum."""
    disk = emulated_guest.guest.block(IDE_DISK)
    written = disk.write_pattern(4)
    read = disk.checksum(4)
    assert read == written, f"wrote 4 MiB with sha256 {written}, read back {read}"
