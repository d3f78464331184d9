"""Handbook ch. 7, KVM security: confine the QEMU process, expose nothing, trust only keys.

The handbook's measures, on today's QEMU: ``-sandbox on`` installs a seccomp filter;
QEMU started as root drops to an unprivileged user (``-runas`` until QEMU 9.1, then
``-run-with user=``); the process's listeners (QMP, VNC, guest forwards, migration) are on
loopback or unix sockets; the guest takes no passwords. sVirt/AppArmor labels belong to
libvirt, which this suite does not use.
"""
import re

import paramiko
import pytest

from pytest_kvmcheck import VMSpec
from pytest_kvmcheck.handbook import try_options


def proc_status(vm) -> dict[str, str]:
    text = vm.host.read_text(f"/proc/{vm.pid}/status")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def listeners(vm, kind: str = "tcp") -> list[str]:
    """The addresses (TCP) or paths (unix) the VM's QEMU listens on, as ``ss`` on its host shows them."""
    flags = {"tcp": "-ltnpH", "unix": "-lxpH"}[kind]
    out = vm.host.run(["ss", flags], timeout=10).check(f"ss on {vm.host.name}").stdout
    column = 3 if kind == "tcp" else 4
    return [line.split()[column] for line in out.splitlines() if f"pid={vm.pid}," in line]


def greeting(vm, address: str) -> bytes:
    """The first bytes a TCP listener of the VM sends a new client (QMP, VNC and SSH all speak first)."""
    host, port = address.rsplit(":", 1)
    with vm.host.connect_tcp(host.strip("[]"), int(port)) as sock:
        sock.settimeout(3)
        try:
            return sock.recv(64)
        except OSError:
            return b""


def test_sandbox_on_installs_a_seccomp_filter(kvm_host, boot_vm):
    if not try_options(kvm_host, ["-sandbox", "on"]).ok:
        pytest.skip(f"host {kvm_host.name}: needs seccomp: QEMU {kvm_host.caps.qemu_version_text} "
                    "was built without -sandbox")
    plain = boot_vm(VMSpec())
    # The handbook's plain form. Stricter sub-options stop a daemonized QEMU 7.2 from starting
    # here (spawn=deny: SIGSYS at the -daemonize fork; elevateprivileges=deny: exit 1).
    sandboxed = boot_vm(VMSpec(extra_args=("-sandbox", "on")))
    assert proc_status(plain)["Seccomp"].strip() == "0", "QEMU without -sandbox already has a seccomp mode"
    assert proc_status(sandboxed)["Seccomp"].strip() == "2", \
        f"-sandbox on: expected seccomp mode 2 (filter), got {proc_status(sandboxed)['Seccomp'].strip()}"
    assert sandboxed.run("true").ok, "the sandboxed guest does not work"


def test_qemu_runs_as_an_unprivileged_user(kvm_host, boot_vm, kvm_note):
    if kvm_host.transport.run(["id", "-u"], timeout=10).stdout.strip() != "0":
        pytest.skip(f"host {kvm_host.name}: needs root: dropping to another user needs QEMU started as root")
    uid = int(kvm_host.transport.run(["id", "-u", "nobody"], timeout=10).check("id nobody").stdout)
    option = ["-run-with", "user=nobody"] if kvm_host.caps.qemu_version >= (9, 1, 0) else ["-runas", "nobody"]
    kvm_note("handbook", f"privilege drop with {' '.join(option)} on QEMU {kvm_host.caps.qemu_version_text}")
    vm = boot_vm(VMSpec(extra_args=tuple(option)))
    status = proc_status(vm)
    ids = [int(x) for field in ("Uid", "Gid") for x in status[field].split()]
    groups = status["Groups"].split()
    assert set(ids[:4]) == {uid}, f"real/effective/saved/fs uid of QEMU: {status['Uid'].strip()}, expected {uid}"
    assert "0" not in groups and 0 not in ids[4:], f"QEMU kept root's group: Gid {status['Gid']}, Groups {groups}"
    assert vm.run("true").ok, "the guest of the unprivileged QEMU does not work"


def test_listeners_are_on_loopback(boot_vm, kvm_run, kvm_host):
    """Handbook 7: guest SSH forward, VNC and a migration listener all on loopback, and the
    monitor only on a unix socket: judged on what the QEMU process has open, not on its argv."""
    vm = boot_vm(VMSpec(extra_args=("-vnc", "127.0.0.1:0,to=99")))
    vnc = vm.qmp.cmd("query-vnc")
    incoming = boot_vm.adopt(kvm_run.new_vm(kvm_host.name, VMSpec(extra_args=("-incoming", "defer"))))
    incoming.start()
    incoming.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    seen = {"guest forward and VNC": listeners(vm), "migration": listeners(incoming)}
    assert vnc["enabled"] and vnc["host"] == "127.0.0.1", f"VNC: {vnc}"
    for what, addresses in seen.items():
        assert addresses, f"{what}: no listener found for the QEMU process"
        wide = [a for a in addresses if not re.match(r"^(127\.0\.0\.1|\[::1\]):\d+$", a)]
        assert not wide, f"{what}: QEMU listens beyond loopback: {wide}"
    assert vm.qmp_socket in listeners(vm, "unix"), \
        f"QEMU has no unix listener at its QMP socket {vm.qmp_socket}: {listeners(vm, 'unix')}"
    # Not the migration listener: a client there would start an incoming migration.
    monitors = [a for a in seen["guest forward and VNC"] if greeting(vm, a).startswith(b'{"QMP"')]
    assert not monitors, f"QEMU serves QMP over TCP at {monitors}: the monitor must be reachable only through " \
                         "its unix socket"


def test_guest_takes_no_passwords(kvm_host, boot_vm):
    """The guest's SSH server offers key logins and no password (or keyboard-interactive) ones."""
    vm = boot_vm(VMSpec())
    transport = paramiko.Transport(kvm_host.transport.connect_tcp("127.0.0.1", vm.ssh_port))
    try:
        transport.start_client(timeout=15)
        with pytest.raises(paramiko.BadAuthenticationType) as refused:
            transport.auth_none("root")
        offered = set(refused.value.allowed_types)
        assert not offered & {"password", "keyboard-interactive"}, f"the guest offers password logins: {offered}"
        assert "publickey" in offered, f"the guest does not offer key logins: {offered}"
    finally:
        transport.close()


def test_svirt_labels(kvm_host):
    pytest.skip(f"host {kvm_host.name}: needs libvirt: sVirt/AppArmor labels are applied by libvirt, and this "
                "suite starts QEMU directly")
