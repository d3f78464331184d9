"""Handbook ch. 9, qemu-kvm command-line parameters: the 2016 lines on today's QEMU.

For each command line the handbook gives, two checks: does the host's QEMU still take it
verbatim (it must, exactly when the table in :mod:`pytest_kvmcheck.qemu.legacy` says the form
is not removed), and does its modern translation give the guest what the handbook says it
gives (a device in lspci, the memory size, a listener). The report carries both verdicts.
"""
import pytest

from pytest_kvmcheck import VMSpec
from pytest_kvmcheck.qemu.legacy import describe, form, translate_legacy

# The handbook's lines (IMG stands for a disk image the test makes) and what the guest must show.
LINES = {
    "memory-and-balloon": (["-m", "1024", "-balloon", "virtio"], "1af4:1002"),
    "net-nic-virtio": (["-net", "nic,model=virtio", "-net", "user"], "1af4:1000"),
    "net-tap-vhost": (["-net", "tap,vhost=on,script=no,downscript=no"], "1af4:1000"),  # no ifup scripts here
    "drive-if-virtio": (["-drive", "file=IMG,if=virtio,format=qcow2"], "1af4:1001"),
}
NEEDS = {"net-tap-vhost": ("tap", "vhost-net")}


def verbatim_verdict(kvm_host, argv: list[str], row, kvm_note) -> None:
    """The host's QEMU takes ``argv`` as written exactly when the table says it is not removed."""
    result = kvm_host.accepts(["-machine", "pc", *argv])
    removed = row.removed_in(kvm_host.caps.qemu_version)
    verdict = "accepted verbatim" if result.ok else f"rejected verbatim: {result.stderr.strip()[-200:]}"
    kvm_note("handbook", f"{' '.join(argv)}: {verdict} by QEMU {kvm_host.caps.qemu_version_text}; {describe(row)}")
    assert result.ok != removed, f"QEMU {kvm_host.caps.qemu_version_text}: {verdict}, but the table says " \
                                 f"{row.legacy!r} is {'removed' if removed else 'still accepted'}"


@pytest.mark.parametrize("line", [pytest.param(name, marks=pytest.mark.kvm_requires(*NEEDS.get(name, ())))
                                  for name in LINES])
def test_handbook_line_and_its_modern_translation(kvm_host, boot_vm, line, kvm_note):
    """Handbook 9: each 2016 line is accepted verbatim exactly when the table says so, and its
    modern translation gives the guest the device (and memory) the handbook promises."""
    argv, device = LINES[line]
    if any("IMG" in a for a in argv):
        # Hosts sharing storage share the run dir: each its own image (QEMU locks it).
        image = kvm_host.transport.qemu_img.create(f"{kvm_host.run_dir}/cmdline-{kvm_host.name}-{line}.qcow2", 16)
        argv = [a.replace("IMG", image) for a in argv]
    modern, rows = translate_legacy(argv)
    for row in rows:
        verbatim_verdict(kvm_host, argv, row, kvm_note)
    memory = int(modern[modern.index("-m") + 1]) if "-m" in modern else 512
    extra = [a for i, a in enumerate(modern) if a != "-m" and (i == 0 or modern[i - 1] != "-m")]
    vm = boot_vm(VMSpec(memory_mib=memory, extra_args=tuple(extra)))
    devices = vm.guest.pci_ids()
    assert device in devices, f"the modern form {' '.join(extra)} gave the guest no {device}: {devices}"
    if memory != 512:
        total_mib = vm.guest.meminfo()["MemTotal"] // 1024
        assert memory * 0.85 < total_mib <= memory, f"-m {memory}: the guest sees {total_mib} MiB"


def test_incoming_tcp_0_binds_where_told(boot_vm, kvm_note):
    """Handbook 9: ``-incoming tcp:0:6666`` listens on every address; the translation binds loopback only."""
    row = form("-incoming tcp:0:6666")
    modern, _ = translate_legacy(["-incoming", "tcp:0:0"])
    assert modern == ["-incoming", "tcp:127.0.0.1:0"], modern
    vm = boot_vm.start(boot_vm.build(VMSpec(extra_args=tuple(modern))))
    address = vm.qmp.cmd("query-migrate")["socket-address"][0]
    kvm_note("handbook", describe(row) + f"; the translation listens on {address['host']}:{address['port']}")
    assert address["host"] == "127.0.0.1", f"the migration listener binds {address}, not loopback"
    assert vm.qmp.cmd("query-status")["status"] == "inmigrate"


def test_pci_assign_is_gone_and_vfio_takes_its_place(kvm_host, kvm_note):
    """Handbook 9: ``-device pci-assign`` must be refused by today's QEMU; its translation is vfio-pci.

    Assigning a real device with the translation is the passthrough suite's work (it needs
    an IOMMU and a device the inventory lists as assignable).
    """
    row = form("-device pci-assign")
    verbatim_verdict(kvm_host, ["-device", "pci-assign,host=00:1f.0"], row, kvm_note)
    modern, _ = translate_legacy(["-device", "pci-assign,host=00:1f.0"])
    assert modern == ["-device", "vfio-pci,host=00:1f.0"], modern
