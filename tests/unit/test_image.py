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


def test_a_rebuild_of_one_digest_is_placed_apart(tmp_path):
    """Two builds of one digest differ in their generated host key: each has a dir of its own on
    a host, so a host's old copy never answers with a key the run does not expect."""
    from pytest_kvmcheck.images.tiny import TinyImage
    names = []
    for key in ("AAAAC3NzaC1lZDI1NTE5AAAAIfirst", "AAAAC3NzaC1lZDI1NTE5AAAAIsecond"):
        directory = tmp_path / key[-6:]
        directory.mkdir()
        (directory / "host_key.pub").write_text(f"ssh-ed25519 {key} root@build\n")
        names.append(TinyImage(directory, "0123abcd", "6.1.0").placement_name)
    assert names[0] != names[1] and all(n.startswith("tiny-0123abcd-") for n in names)
