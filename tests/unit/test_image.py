"""The pure parts of the image build: module closure and the initramfs writer."""
from pytest_kvmcheck.images.build import CpioWriter, module_closure, shared_libraries

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


def test_a_stubbed_library_leaves_out_what_only_it_needed():
    """lspci's libkmod has a stand-in in the tiny guest: libcrypto, which only libkmod needs,
    stays out, and lspci's other libraries stay in (this machine's own lspci, as ldd sees it)."""
    import shutil

    import pytest
    if not shutil.which("lspci") or not shutil.which("readelf"):
        pytest.skip("this machine: needs pciutils and binutils: to read lspci's libraries")
    names = {lib.rsplit("/", 1)[-1] for lib in shared_libraries(shutil.which("lspci"), stubbed={"libkmod.so.2"})}
    every = {lib.rsplit("/", 1)[-1] for lib in shared_libraries(shutil.which("lspci"))}
    assert "libkmod.so.2" in every and "libcrypto.so.3" in every
    assert "libkmod.so.2" not in names and "libcrypto.so.3" not in names
    assert {"libpci.so.3", "libc.so.6"} <= names and any(n.startswith("ld-linux") for n in names)
