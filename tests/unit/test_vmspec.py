"""Argv rendering and the handbook's legacy-option table."""
import shlex

import pytest

from pytest_kvmcheck.qemu.legacy import LEGACY_FORMS, translate_legacy
from pytest_kvmcheck.qemu.spec import (Disk, Nic, RenderContext, VMSpec, disk_cache_on, kernel_cmdline, render_argv,
                                      tap_name)

CTX = RenderContext(accel="tcg", kernel="/k", initrd="/i", workdir="/w", qmp_socket="/w/qmp.sock",
                    console_log="/w/console.log", pidfile="/w/qemu.pid", ssh_public_key="ssh-ed25519 AAAA run",
                    disk_paths=("/w/d0.qcow2", "/w/d1.raw"), mac_seed=0x1234)


def opt_values(argv, opt):
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_default_spec_renders_a_safe_headless_guest():
    argv = render_argv("qemu-system-x86_64", VMSpec(), CTX)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-daemonize", "-no-reboot"):
        assert flag in argv
    assert opt_values(argv, "-machine") == ["pc,accel=tcg"] and opt_values(argv, "-cpu") == ["max"]
    assert opt_values(argv, "-qmp") == ["unix:/w/qmp.sock,server=on,wait=off"]
    (netdev,) = opt_values(argv, "-netdev")
    assert "hostfwd=tcp:127.0.0.1:0-:22" in netdev, "guest SSH must be forwarded on loopback only, port chosen by QEMU"


def test_kvm_uses_host_cpu():
    argv = render_argv("q", VMSpec(), RenderContext(**{**CTX.__dict__, "accel": "kvm"}))
    assert opt_values(argv, "-cpu") == ["host"] and opt_values(argv, "-machine") == ["pc,accel=kvm"]


def test_devices_in_spec_order():
    spec = VMSpec(nics=(Nic("e1000"), Nic("virtio-net-pci", vhost=True)),
                  disks=(Disk(interface="ide-hd"), Disk(format="raw", serial="s1")), balloon=True)
    argv = render_argv("q", spec, CTX)
    devices = opt_values(argv, "-device")
    assert [d.split(",")[0] for d in devices] == ["e1000", "virtio-net-pci", "ide-hd", "virtio-blk-pci",
                                                  "virtio-balloon-pci"]
    assert f"ifname={tap_name(0x1234, 1)}" in opt_values(argv, "-netdev")[1] and "vhost=on" in opt_values(argv, "-netdev")[1]
    assert "serial=s1" in devices[3]
    assert "driver=raw,file=file1,node-name=disk1" in opt_values(argv, "-blockdev")


def test_balloon_options_go_on_the_balloon_device():
    spec = VMSpec(balloon=True, balloon_options=("deflate-on-oom=on", "guest-stats-polling-interval=1"))
    assert opt_values(render_argv("q", spec, CTX), "-device")[-1] == \
        "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,guest-stats-polling-interval=1"
    with pytest.raises(ValueError, match="balloon_options without balloon"):
        VMSpec(balloon_options=("deflate-on-oom=on",))


def test_same_spec_renders_identically():
    """Migration needs the destination's argv to match the source's device for device."""
    spec = VMSpec(disks=(Disk(),), balloon=True)
    assert render_argv("q", spec, CTX) == render_argv("q", spec, CTX)


def test_vhost_never_on_the_ssh_nic():
    with pytest.raises(ValueError, match="first NIC carries the guest's SSH"):
        render_argv("q", VMSpec(nics=(Nic(vhost=True),)), CTX)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"model": "ne2k"}, "not one of"), ({"model": "e1000", "vhost": True}, "vhost=on needs a virtio-net NIC")])
def test_bad_nic(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Nic(**kwargs)


def test_tap_names_fit_the_kernel_limit():
    assert len(tap_name(0xffffff, 9)) <= 15


def test_kernel_cmdline_carries_the_key_not_a_password():
    line = kernel_cmdline(VMSpec(), CTX)
    assert "kvmcheck.key=" in line and "console=ttyS0" in line and "password" not in line


def test_only_a_guest_that_is_a_kvm_host_is_asked_to_load_kvm():
    # Loading kvm and the vendor's module cost 0.6 s of every boot under TCG; only nested guests need it.
    assert "kvmcheck.kvm=1" not in kernel_cmdline(VMSpec(), CTX).split()
    assert "kvmcheck.kvm=1" in kernel_cmdline(VMSpec(guest_kvm=True), CTX).split()


def test_kernel_cmdline_skips_the_timer_check_a_busy_host_fails():
    # A CI run lost a guest to "IO-APIC + timer doesn't work" under TCG on a loaded host.
    assert "no_timer_check" in kernel_cmdline(VMSpec(), CTX).split()


@pytest.mark.parametrize("legacy, modern", [
    ("-balloon virtio", "-device virtio-balloon-pci"),
    ("-net nic,model=virtio", "-netdev user,id=legacynet0 -device virtio-net-pci,netdev=legacynet0"),
    ("-drive file=/a.qcow2,if=virtio",
     "-blockdev driver=file,filename=/a.qcow2,node-name=legacydisk0f "
     "-blockdev driver=qcow2,file=legacydisk0f,node-name=legacydisk0 -device virtio-blk-pci,drive=legacydisk0"),
    ("-device pci-assign,host=01:00.0", "-device vfio-pci,host=01:00.0"),
    ("-enable-kvm", "-accel kvm"),
    ("-incoming tcp:0:6666", "-incoming tcp:127.0.0.1:6666"),
    ("-m 512", "-m 512"),
])
def test_legacy_translation(legacy, modern):
    out, rows = translate_legacy(shlex.split(legacy))
    assert shlex.join(out) == modern
    assert bool(rows) == (legacy != "-m 512")


def test_legacy_table_dates():
    by_legacy = {row.legacy: row for row in LEGACY_FORMS}
    assert by_legacy["-balloon virtio"].removed_in((7, 2, 0))
    assert not by_legacy["-balloon virtio"].removed_in((3, 0, 0))
    assert by_legacy["-device pci-assign,host=BDF"].removed_in((2, 12, 0))
    assert not by_legacy["migrate -b tcp:HOST:PORT"].removed_in((9, 0, 0))
    assert by_legacy["migrate -b tcp:HOST:PORT"].removed_in((10, 0, 0))


def test_bridged_nic_is_a_plain_tap_and_never_the_first():
    argv = render_argv("q", VMSpec(nics=(Nic(), Nic(bridged=True))), CTX)
    tap = next(v for o, v in zip(argv, argv[1:], strict=False) if o == "-netdev" and v.startswith("tap,"))
    assert "script=no" in tap and "vhost" not in tap
    with pytest.raises(ValueError, match="first NIC"):
        render_argv("q", VMSpec(nics=(Nic(bridged=True),)), CTX)


def test_disks_bypass_the_page_cache_on_shared_storage_unless_told_otherwise():
    """A disk's "auto" cache: writeback on a host's own filesystem, none on a network one (a
    migration destination's page cache may hold an image as it was before the source's writes),
    and an explicit mode stays what it says."""
    spec = VMSpec(disks=(Disk(), Disk(cache="writeback", format="raw")))
    local = opt_values(render_argv("q", spec, RenderContext(**{**CTX.__dict__, "auto_cache": disk_cache_on("ext2/ext3")})),
                       "-blockdev")
    shared = opt_values(render_argv("q", spec, RenderContext(**{**CTX.__dict__, "auto_cache": disk_cache_on("nfs")})),
                        "-blockdev")
    assert not any("cache.direct" in b for b in local), local
    assert all("cache.direct=on" in b for b in shared[:2]) and not any("cache.direct" in b for b in shared[2:]), shared
