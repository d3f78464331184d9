"""The pure parts of the image build: module closure and the initramfs writer."""
from pytest_kvmcheck.images.build import CpioWriter, module_closure

DEP = """kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/drivers/crypto/ccp/ccp.ko
kernel/arch/x86/kvm/kvm.ko:
kernel/drivers/crypto/ccp/ccp.ko:
"""


def test_dependencies_come_first_and_once():
    out = module_closure(DEP, ["virtio_net", "kvm_amd", "failover", "not_a_module"])
    assert out == ["kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                   "kernel/drivers/net/virtio_net.ko", "kernel/arch/x86/kvm/kvm.ko",
                   "kernel/drivers/crypto/ccp/ccp.ko", "kernel/arch/x86/kvm/kvm-amd.ko"]


def test_cpio_newc_layout():
    w = CpioWriter()
    w.add_dir("etc")
    w.add_file("etc/hostname", b"guest\n")
    w.add_chardev("dev/console", 5, 1)
    data = w.finish()
    assert data.startswith(b"070701") and data.count(b"070701") == 4
    assert b"TRAILER!!!" in data and len(data) % 4 == 0
    assert b"etc/hostname\0" in data and b"guest\n" in data
