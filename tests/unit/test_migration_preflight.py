"""The seed's pre-flight checks (4.3.2) as pure logic: what each mismatch is called."""
from types import SimpleNamespace

from pytest_kvmcheck.hosts.capabilities import Capabilities
from pytest_kvmcheck.qemu.migration import layout_mismatch, preflight, qom_layout
from pytest_kvmcheck.qemu.spec import VMSpec

FLAGS = ["fpu", "lm", "nx", "sse2", "svm"]


def caps(**changes) -> Capabilities:
    base = dict(host="h", qemu_version=(7, 2, 0), qemu_version_text="7.2.0", machines=["pc", "q35"],
                cpu_flags=FLAGS, accel="tcg")
    return Capabilities(**{**base, **changes})


def guest(machine="pc", disks=("/shared/run/vm/disk0.qcow2",)):
    return SimpleNamespace(spec=VMSpec(machine=machine), boot_disk="", disk_paths=disks)


def everywhere(path: str) -> bool:
    return True


def test_a_matching_pair_has_no_problems():
    assert preflight(guest(), caps(), caps(), everywhere) == {}


def test_older_destination_qemu():
    problems = preflight(guest(), caps(qemu_version=(8, 2, 0), qemu_version_text="8.2.0"), caps(), everywhere)
    assert "older than the source's 8.2.0" in problems["qemu-version"]


def test_missing_machine_type():
    assert "'q35'" in preflight(guest(machine="q35"), caps(), caps(machines=["pc"]), everywhere)["machine-type"]


def test_nx_and_long_mode_must_agree():
    problems = preflight(guest(), caps(), caps(cpu_flags=["fpu", "sse2"]), everywhere)
    assert set(problems) == {"cpu-nx", "cpu-lm"}


def test_every_flag_counts_under_kvm_only():
    fewer = caps(cpu_flags=["fpu", "lm", "nx"])
    assert "cpu-flags" not in preflight(guest(), caps(), fewer, everywhere)
    assert "sse2 svm" in preflight(guest(), caps(accel="kvm"), fewer, everywhere)["cpu-flags"]


def test_images_not_at_the_same_path():
    problems = preflight(guest(), caps(), caps(), lambda path: False)
    assert "/shared/run/vm/disk0.qcow2" in problems["shared-storage"]


def test_layout_mismatch_names_the_device():
    def vm(*devices):
        return SimpleNamespace(argv=[a for d in devices for a in ("-device", d)], alive=lambda: False)
    assert layout_mismatch(vm("virtio-net-pci,id=n0", "e1000,id=n1"), vm("e1000,id=n1", "virtio-net-pci,id=n0")) == ""
    assert "lacks virtio-balloon-pci#b0" in layout_mismatch(vm("virtio-balloon-pci,id=b0"), vm())
    assert "has extra virtio-rng-pci#r0" in layout_mismatch(vm(), vm("virtio-rng-pci,id=r0"))


def test_qemus_own_layout_counts_hot_plugged_devices():
    listed = [{"name": "type", "type": "string"}, {"name": "hpblk", "type": "child<virtio-blk-pci>"},
              {"name": "nic0", "type": "child<virtio-net-pci>"}]
    assert qom_layout(listed) == ["virtio-blk-pci#hpblk", "virtio-net-pci#nic0"]
