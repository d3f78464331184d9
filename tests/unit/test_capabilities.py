"""Capability parsing and requirement matching: every miss names host and capability."""
import pytest

from pytest_kvmcheck.hosts import capabilities
from pytest_kvmcheck.hosts.capabilities import (NEEDS, Capabilities, find_binaries, first_present, parse_accel_help,
                                                parse_device_help, parse_machine_help, parse_object_help, parse_qemu_version,
                                                unmet)
from pytest_kvmcheck.errors import HostError, QemuNotFound
from pytest_kvmcheck.hosts.local import LocalHost
from pytest_kvmcheck.hosts.spec import HostSpec


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
    assert parse_object_help("List of user creatable objects:\n  authz-simple\n  tls-creds-x509\n") == \
        ["authz-simple", "tls-creds-x509"]


def test_all_met():
    c = caps(accel="kvm", vhost_net=True, tap=True, iommu_groups=3, sriov_pfs=["0000:01:00.0"], ksm=True,
             nested="1", mem_available_mib=4096, assignable=["0000:00:03.0", "0000:01:00.0"],
             pci_devices=["0000:00:00.0", "0000:00:03.0", "0000:01:00.0"], root=True, seccomp=True,
             migration=["multifd", "postcopy-ram"], guest="disk-image", bridge_cidr="10.0.0.1/24",
             power_cycle=True, local_dir="/var/lib/kc", other_qemu="/opt/qemu-10/bin/qemu-system-x86_64")
    assert unmet(c, ["kvm", "vhost-net", "tap", "bridge", "iommu", "assignable", "sriov", "pci-unlisted", "ksm",
                     "power-cycle", "local-disk", "other-qemu",
                     "nested", "root", "seccomp", "multifd", "postcopy", "disk-image-guest", "device:e1000",
                     "machine:q35", "memory:2048", "qemu>=7.2"]) == []


def test_every_need_is_checked_here():
    """NEEDS lists what kvm_requires accepts; each has a check (libvirt is never met: kvmcheck runs QEMU itself)."""
    c = caps(guest="")  # neither the tiny guest nor a disk image: both guest needs unmet
    for need in NEEDS:
        ok, why = c.has(need)
        assert not ok and why, need


@pytest.mark.parametrize("changes, reason", [
    ({}, "no assignable PCI device configured"),
    ({"assignable": ["0000:01:00.0"], "sriov_pfs": ["0000:01:00.0"]}, "every assignable device is an SR-IOV PF"),
])
def test_assignable_means_a_plain_device(changes, reason):
    (why,) = unmet(caps(**changes), ["assignable"])
    assert reason in why


@pytest.mark.parametrize("changes, reason", [
    ({"sriov_pfs": ["0000:01:00.0"]}, "no SR-IOV PF is listed as assignable"),
    ({"sriov_pfs": ["0000:01:00.0"], "assignable": ["0000:01:00.0"], "busy_pfs": ["0000:01:00.0"]},
     "every assignable SR-IOV PF has VFs in use"),
])
def test_sriov_means_an_idle_listed_pf(changes, reason):
    (why,) = unmet(caps(**changes), ["sriov"])
    assert reason in why


def test_a_probe_reason_wins():
    c = caps(reasons={"postcopy": "QEMU 7.2.22 refused the postcopy-ram capability: Userfaultfd not available"})
    (why,) = unmet(c, ["postcopy"])
    assert why.endswith("Userfaultfd not available")


@pytest.mark.parametrize("need, fragment", [
    ("kvm", "KVM not usable: guest hung"),
    ("vhost-net", "/dev/vhost-net is missing"),
    ("iommu", "no IOMMU groups"),
    ("sriov", "no SR-IOV physical function"),
    ("nested", "nested virtualization is off"),
    ("device:igb", "has no device 'igb'"),
    ("machine:microvm", "has no machine type 'microvm'"),
    ("object:authz-simple", "cannot create -object 'authz-simple'"),
    ("tls", "cannot make TLS credentials"),
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


def test_the_first_executable_candidate_is_the_hosts_binary(tmp_path):
    qemu_kvm = tmp_path / "libexec" / "qemu-kvm"
    qemu_kvm.parent.mkdir()
    qemu_kvm.write_text("#!/bin/sh\n")
    not_executable = tmp_path / "qemu-system-x86_64"
    not_executable.write_text("")
    host = LocalHost(HostSpec(name="local"))
    assert first_present(host, ("kc-no-such-qemu", str(not_executable), str(qemu_kvm))) == ""  # not executable yet
    qemu_kvm.chmod(0o755)
    assert first_present(host, ("kc-no-such-qemu", str(not_executable), str(qemu_kvm))) == str(qemu_kvm)
    assert first_present(host, ("sh", str(qemu_kvm))) == "sh"  # a name on PATH comes as it was given


def test_no_qemu_says_what_to_install_per_distribution(monkeypatch):
    host = LocalHost(HostSpec(name="h1"))
    monkeypatch.setattr(capabilities, "QEMU_CANDIDATES", ("kc-no-such-qemu", "/nonexistent/qemu-kvm"))
    with pytest.raises(QemuNotFound) as info:
        find_binaries(host)
    message = str(info.value)
    assert "host h1: no QEMU found (looked for kc-no-such-qemu, /nonexistent/qemu-kvm)" in message
    assert "apt-get install qemu-system-x86 qemu-utils" in message and "dnf install qemu-kvm qemu-img" in message
    assert "or set qemu= for the host" in message


def test_a_given_binary_is_not_looked_for():
    spec = find_binaries(LocalHost(HostSpec(name="h1", qemu="/opt/q/qemu", qemu_img="/opt/q/qemu-img")))
    assert (spec.qemu, spec.qemu_img) == ("/opt/q/qemu", "/opt/q/qemu-img")
