"""Handbook ch. 10, migrating guests to KVM: another hypervisor's disk, converted, works here.

The handbook converts a VMware or VirtualBox disk with ``qemu-img convert -O qcow2`` and
boots it with virtio devices. Each format is made on the host from known data (nothing
is downloaded), converted to qcow2 as the handbook does, compared by ``qemu-img compare``,
and plugged into a running guest as virtio-blk (one guest per host reads every format's
disk in turn), where its checksum must match. With a disk-image
guest (``--kvm-guest=IMAGE.qcow2``) the guest's own boot disk makes the round trip through
VMDK and must boot.
"""
import hashlib
import os
import posixpath
import secrets

import pytest

from pytest_kvmcheck import VMSpec, vm_fixture
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.qemu.hotplug import plug_disk
from pytest_kvmcheck.qemu.migration import place_base_image

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
IMAGE_MIB = 16  # the disk's size: the data, and room beyond it that every format must keep empty
reader = vm_fixture(VMSpec())  # reads each converted disk, plugged in and pulled out again


@pytest.fixture
def workspace(kvm_host):
    """A dir on the host for this test's images, removed afterwards."""
    path = posixpath.join(kvm_host.run_dir, "shared", f"v2v-{secrets.token_hex(3)}")
    kvm_host.transport.makedirs(path)
    yield path
    kvm_host.transport.remove_tree(path)


def foreign_disk(kvm_host, workspace: str, fmt: str, options: str, data: bytes) -> str:
    """Another hypervisor's disk holding ``data`` at offset 0 (made here from raw)."""
    raw = place_base_image(kvm_host.transport, workspace, data, IMAGE_MIB)
    if fmt == "raw":
        return raw
    qemu_img = kvm_host.transport.qemu_img
    path = qemu_img.convert(raw, posixpath.join(workspace, f"source.{fmt}"), fmt, source_fmt="raw", options=options)
    written = qemu_img.info(path)["format"]
    assert written == fmt, f"qemu-img wrote a {written} image, not {fmt}"
    return path


@pytest.mark.parametrize("name", FOREIGN)
def test_converted_disk_keeps_its_data(kvm_host, reader, workspace, name, kvm_note):  # the disk leaves before its image
    """Handbook 10: ``qemu-img convert -O qcow2`` of another hypervisor's disk: identical to the source
    (``qemu-img compare``), and a guest reads the same data from it over virtio-blk."""
    fmt, options = FOREIGN[name]
    data = os.urandom(DATA_MIB * MIB)
    source = foreign_disk(kvm_host, workspace, fmt, options, data)
    qemu_img = kvm_host.transport.qemu_img
    converted = qemu_img.convert(source, posixpath.join(workspace, "converted.qcow2"), "qcow2", source_fmt=fmt)
    compared = qemu_img.compare(source, converted, fmt, "qcow2")
    assert compared.ok, f"qemu-img compare: {compared.stdout.strip()} {compared.stderr.strip()}"
    kvm_note("v2v", f"{name}: qemu-img convert -f {fmt} -O qcow2; compare: {compared.stdout.strip()}")
    plugged = plug_disk(reader, converted, f"v2v-{name}"[:20])  # a virtio-blk serial holds 20 characters
    try:
        assert plugged.disk.driver == "virtio_blk", f"the converted disk is not on virtio-blk: {plugged.disk.driver!r}"
        seen = plugged.disk.checksum(DATA_MIB)
    finally:
        plugged.unplug()
    assert seen == hashlib.sha256(data).hexdigest(), f"the guest reads other data from the {name} disk"


@pytest.mark.kvm_requires("disk-image-guest")
def test_converted_boot_disk_boots(kvm_host, workspace, boot_vm):
    """Handbook 10: the guest's own system disk through VMDK and back must boot with virtio devices."""
    qemu_img = kvm_host.transport.qemu_img
    vmdk = qemu_img.convert(kvm_host.host_run.boot_disk, posixpath.join(workspace, "system.vmdk"), "vmdk",
                            options="subformat=streamOptimized")
    system = qemu_img.convert(vmdk, posixpath.join(workspace, "system.qcow2"), "qcow2", source_fmt="vmdk")
    vm = boot_vm.start(boot_vm.build(VMSpec(), boot_disk=system)).wait_ready()
    root = vm.run(["findmnt", "-n", "-o", "SOURCE", "/"], check=True).stdout.strip()
    assert root.startswith("/dev/vd"), f"the converted system disk is not the virtio root: {root}"
