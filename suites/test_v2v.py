"""Handbook ch. 10, migrating guests to KVM: another hypervisor's disk, converted, works here.

The handbook converts a VMware or VirtualBox disk with ``qemu-img convert -O qcow2`` and
boots it with virtio devices. Each format is made on the host from known data (nothing
is downloaded), converted to qcow2 as the handbook does, compared by ``qemu-img compare``,
and attached to a guest as virtio-blk, where its checksum must match. With a disk-image
guest (``--kvm-guest=IMAGE.qcow2``) the guest's own boot disk makes the round trip through
VMDK and must boot.
"""
import hashlib
import os
import posixpath
import secrets

import pytest

from pytest_kvmcheck import Disk, VMSpec
from pytest_kvmcheck.guestinfo import MIB, block_device_by_serial, driver_of
from pytest_kvmcheck.migration import place_base_image

# name -> qemu-img output format and options: what VMware (OVA exports are streamOptimized),
# VirtualBox and Hyper-V write.
FOREIGN = {
    "vmdk-monolithicSparse": ("vmdk", "subformat=monolithicSparse"),
    "vmdk-streamOptimized": ("vmdk", "subformat=streamOptimized"),
    "vdi": ("vdi", ""),
    "vhdx": ("vhdx", ""),
    "vpc": ("vpc", ""),
    "raw": ("raw", ""),
}
DATA_MIB = 4


@pytest.fixture
def workspace(kvm_host):
    """A dir on the host for this test's images, removed afterwards."""
    path = posixpath.join(kvm_host.host_run.run_dir, "shared", f"v2v-{secrets.token_hex(3)}")
    kvm_host.transport.makedirs(path)
    yield path
    kvm_host.transport.remove_tree(path)


def qemu_img(kvm_host, *args: str) -> str:
    return kvm_host.transport.run([kvm_host.spec.qemu_img, *args], timeout=120).check(
        f"qemu-img {args[0]} on {kvm_host.name}").stdout


def foreign_disk(kvm_host, workspace: str, fmt: str, options: str, data: bytes) -> str:
    """Another hypervisor's disk holding ``data`` at offset 0 (made here from raw)."""
    raw = place_base_image(kvm_host.transport, workspace, data, 64)
    if fmt == "raw":
        return raw
    path = posixpath.join(workspace, f"source.{fmt}")
    qemu_img(kvm_host, "convert", "-q", "-f", "raw", "-O", fmt, *(["-o", options] if options else []), raw, path)
    assert f"file format: {fmt}" in qemu_img(kvm_host, "info", path), f"qemu-img did not write a {fmt} image"
    return path


@pytest.mark.parametrize("name", FOREIGN)
def test_converted_disk_keeps_its_data(kvm_host, workspace, boot_vm, name, kvm_note):  # boot_vm after workspace: VMs stop before their images go
    fmt, options = FOREIGN[name]
    data = os.urandom(DATA_MIB * MIB)
    source = foreign_disk(kvm_host, workspace, fmt, options, data)
    converted = posixpath.join(workspace, "converted.qcow2")
    qemu_img(kvm_host, "convert", "-q", "-f", fmt, "-O", "qcow2", source, converted)  # the handbook's step
    compared = kvm_host.transport.run([kvm_host.spec.qemu_img, "compare", "-f", fmt, "-F", "qcow2", source, converted],
                                      timeout=120)
    assert compared.ok, f"qemu-img compare: {compared.stdout.strip()} {compared.stderr.strip()}"
    kvm_note("v2v", f"{name}: qemu-img convert -f {fmt} -O qcow2; compare: {compared.stdout.strip()}")
    vm = boot_vm(VMSpec(disks=(Disk(path=converted, serial="v2v0"),)))
    disk = block_device_by_serial(vm, "v2v0")
    assert driver_of(vm, f"/sys/block/{disk}/device") == "virtio_blk", "the converted disk is not on virtio-blk"
    seen = vm.run(f"dd if=/dev/{disk} bs=1M count={DATA_MIB} 2>/dev/null | sha256sum", check=True).stdout.split()[0]
    assert seen == hashlib.sha256(data).hexdigest(), f"the guest reads other data from the {name} disk"


def test_converted_boot_disk_boots(kvm_run, kvm_host, workspace, boot_vm):
    """The guest's own system disk through VMDK and back: it must boot with virtio devices."""
    if not kvm_host.host_run.boot_disk:
        pytest.skip(f"host {kvm_host.name}: needs disk-image guest: the tiny guest has no system disk "
                    "(run with --kvm-guest=IMAGE.qcow2)")
    vmdk = posixpath.join(workspace, "system.vmdk")
    qemu_img(kvm_host, "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized",
             kvm_host.host_run.boot_disk, vmdk)
    system = posixpath.join(workspace, "system.qcow2")
    qemu_img(kvm_host, "convert", "-q", "-f", "vmdk", "-O", "qcow2", vmdk, system)
    vm = kvm_run.new_vm(kvm_host.name, VMSpec())
    vm.reuse_boot_disk = system
    boot_vm.adopt(vm)
    vm.boot()
    root = vm.run("findmnt -n -o SOURCE /", check=True).stdout.strip()
    assert root.startswith("/dev/vd"), f"the converted system disk is not the virtio root: {root}"
