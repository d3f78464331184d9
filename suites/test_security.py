"""Handbook ch. 7, KVM security: confine the QEMU process, expose nothing, trust only keys.

The handbook's measures, on today's QEMU: ``-sandbox on`` installs a seccomp filter;
QEMU started as root drops to an unprivileged user (``-runas`` until QEMU 9.1, then
``-run-with user=``); the process's listeners (QMP, VNC, guest forwards, migration) are on
loopback or unix sockets; the guest takes no passwords. sVirt/AppArmor labels belong to
libvirt, which starts QEMU under them; kvmcheck starts QEMU itself, so they are not checked
here (a test that could only ever skip would put a SKIP on every host's report).
"""
import re

import paramiko
import pytest

from pytest_kvmcheck import VMSpec


def greeting(vm, address: str) -> bytes:
    """The first bytes a TCP listener of the VM sends a new client (QMP, VNC and SSH all speak first)."""
    host, port = address.rsplit(":", 1)
    with vm.host.connect_tcp(host.strip("[]"), int(port)) as sock:
        sock.settimeout(3)
        try:
            return sock.recv(64)
        except OSError:
            return b""


@pytest.mark.kvm_requires("seccomp")
def test_sandbox_on_installs_a_seccomp_filter(boot_vm):
    """Handbook 7: ``-sandbox on`` puts QEMU under a seccomp filter (mode 2); without it, none."""
    plain = boot_vm(VMSpec())
    # The handbook's plain form. Stricter sub-options stop a daemonized QEMU 7.2 from starting
    # here (spawn=deny: SIGSYS at the -daemonize fork; elevateprivileges=deny: exit 1).
    sandboxed = boot_vm(VMSpec(extra_args=("-sandbox", "on")))
    assert plain.process.seccomp_mode() == 0, "QEMU without -sandbox already has a seccomp mode"
    mode = sandboxed.process.seccomp_mode()
    assert mode == 2, f"-sandbox on: expected seccomp mode 2 (filter), got {mode}"
    assert sandboxed.run(["true"]).ok, "the sandboxed guest does not work"


@pytest.mark.kvm_requires("root")
def test_qemu_runs_as_an_unprivileged_user(kvm_host, boot_vm, kvm_note):
    """Handbook 7: QEMU started as root drops to an unprivileged user (``-runas``, now ``-run-with user=``)."""
    uid = int(kvm_host.transport.run(["id", "-u", "nobody"], timeout=10).check("id nobody").stdout)
    # The form the host's QEMU takes: -run-with (QEMU 9.1 on) where it knows it, else -runas.
    option = ["-run-with", "user=nobody"] if kvm_host.accepts(["-run-with", "user=nobody"]).ok else ["-runas", "nobody"]
    kvm_note("handbook", f"privilege drop with {' '.join(option)} on QEMU {kvm_host.caps.qemu_version_text}")
    vm = boot_vm(VMSpec(extra_args=tuple(option)))
    uids, gids, groups = vm.process.ids()
    assert set(uids) == {uid}, f"real/effective/saved/fs uid of QEMU: {uids}, expected {uid}"
    assert 0 not in groups and 0 not in gids, f"QEMU kept root's group: Gid {gids}, Groups {groups}"
    assert vm.run(["true"]).ok, "the guest of the unprivileged QEMU does not work"


def test_listeners_are_on_loopback(boot_vm):
    """Handbook 7: guest SSH forward, VNC and a migration listener all on loopback, and the
    monitor only on a unix socket: judged on what the QEMU process has open, not on its argv."""
    vm = boot_vm(VMSpec(extra_args=("-vnc", "127.0.0.1:0,to=99")))
    vnc = vm.qmp.cmd("query-vnc")
    incoming = boot_vm.start(boot_vm.build(VMSpec(extra_args=("-incoming", "defer"))))
    incoming.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    seen = {"guest forward and VNC": vm.process.listeners(), "migration": incoming.process.listeners()}
    assert vnc["enabled"] and vnc["host"] == "127.0.0.1", f"VNC: {vnc}"
    for what, addresses in seen.items():
        assert addresses, f"{what}: no listener found for the QEMU process"
        wide = [a for a in addresses if not re.match(r"^(127\.0\.0\.1|\[::1\]):\d+$", a)]
        assert not wide, f"{what}: QEMU listens beyond loopback: {wide}"
    unix = vm.process.listeners("unix")
    assert vm.qmp_socket in unix, f"QEMU has no unix listener at its QMP socket {vm.qmp_socket}: {unix}"
    # Not the migration listener: a client there would start an incoming migration.
    monitors = [a for a in seen["guest forward and VNC"] if greeting(vm, a).startswith(b'{"QMP"')]
    assert not monitors, f"QEMU serves QMP over TCP at {monitors}: the monitor must be reachable only through " \
                         "its unix socket"


def test_guest_takes_no_passwords(kvm_host, boot_vm):
    """Handbook 7: the guest's SSH server offers key logins and no password (or keyboard-interactive) ones."""
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
