"""Capability parsing and requirement matching: every miss names host and capability."""
import pytest

from pytest_kvmcheck.capabilities import (Capabilities, parse_accel_help, parse_device_help, parse_machine_help,
                                          parse_qemu_version, unmet)
from pytest_kvmcheck.errors import HostError


def caps(**kw):
    base = dict(host="h1", qemu_version=(7, 2, 22), qemu_version_text="7.2.22", machines=["pc", "q35"],
                devices=["virtio-net-pci", "e1000"], accels=["tcg", "kvm"], accel="tcg",
                reasons={"kvm": "KVM not usable: guest hung", "vhost-net": "/dev/vhost-net is missing"})
    base.update(kw)
    return Capabilities(**base)


def test_parsers():
    assert parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u16)\n") == (7, 2, 22)
    with pytest.raises(HostError):
        parse_qemu_version("bash: qemu: not found")
    assert parse_device_help('Network devices:\nname "e1000", bus PCI, desc "Intel"\nname "virtio-net-pci", bus PCI\n') \
        == ["e1000", "virtio-net-pci"]
    assert parse_machine_help("Supported machines are:\npc  Standard PC (alias of pc-i440fx-7.2)\nq35 ...\n") == ["pc", "q35"]
    assert parse_accel_help("Accelerators supported in QEMU binary:\ntcg\nkvm\n") == ["tcg", "kvm"]


def test_all_met():
    c = caps(accel="kvm", vhost_net=True, tap=True, iommu_groups=3, sriov_pfs=["0000:01:00.0"], ksm=True,
             nested="1", mem_available_mib=4096)
    assert unmet(c, ["kvm", "vhost-net", "tap", "iommu", "sriov", "ksm", "nested", "device:e1000", "machine:q35",
                     "memory:2048", "qemu>=7.2"]) == []


@pytest.mark.parametrize("need, fragment", [
    ("kvm", "KVM not usable: guest hung"),
    ("vhost-net", "/dev/vhost-net is missing"),
    ("iommu", "no IOMMU groups"),
    ("sriov", "no SR-IOV physical function"),
    ("nested", "nested virtualization is off"),
    ("device:igb", "has no device 'igb'"),
    ("machine:microvm", "has no machine type 'microvm'"),
    ("memory:999999", "needs 999999 MiB free"),
    ("qemu>=9.1", "older than 9.1"),
])
def test_each_miss_names_host_and_capability(need, fragment):
    (reason,) = unmet(caps(), [need])
    assert reason.startswith(f"host h1: needs {need}: ") and fragment in reason


def test_unknown_need_is_an_error():
    with pytest.raises(ValueError, match="unknown capability 'warp-drive'"):
        unmet(caps(), ["warp-drive"])


def test_round_trip_through_json():
    c = caps(sriov_pfs=["x"])
    assert Capabilities.from_dict(c.to_dict()) == c
