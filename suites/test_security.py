"""Handbook ch. 7, KVM security: confine the QEMU process, expose nothing, trust only keys.

The handbook's measures, on today's QEMU: ``-sandbox on`` installs a seccomp filter;
QEMU started as root drops to an unprivileged user (``-runas`` until QEMU 9.1, then
``-run-with user=``); the process's listeners (QMP, VNC, guest forwards, migration) are on
loopback or unix sockets; the guest takes no passwords. sVirt/AppArmor labels belong to
libvirt, which starts QEMU under them; kvmcheck starts QEMU itself, so they are not checked
here (a test that could only ever skip would put a SKIP on every host's report).
"""
import re
import secrets

import paramiko
import pytest

from pytest_kvmcheck import VMSpec, vm_fixture
from pytest_kvmcheck.errors import MigrationFailed
from pytest_kvmcheck.hosts.tools import open_to_others, path_access
from pytest_kvmcheck.qemu import vnc
from pytest_kvmcheck.qemu.migration import listen, migrate, stats
from pytest_kvmcheck.qemu.tls import Pki, creds_object


plain_guest = vm_fixture(VMSpec())  # what the checks of a default guest share: nothing they do changes it


def greeting(vm, address: str) -> bytes:
    """The first bytes a TCP listener of the VM sends a new client (QMP, VNC and SSH all speak first;
    a busy host's QEMU may take seconds to: a 3 s wait once missed a monitor on TCP)."""
    host, port = address.rsplit(":", 1)
    with vm.host.connect_tcp(host.strip("[]"), int(port)) as sock:
        sock.settimeout(15)
        try:
            return sock.recv(64)
        except OSError:
            return b""


@pytest.mark.kvm_requires("seccomp")
def test_sandbox_on_installs_a_seccomp_filter(plain_guest, boot_vm):
    """Handbook 7: ``-sandbox on`` puts QEMU under a seccomp filter (mode 2); without it, none."""
    plain = plain_guest
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


def test_the_monitor_is_closed_to_other_users(plain_guest, kvm_note):
    """Handbook 7: the monitor commands the whole guest, so QEMU's QMP socket must not let
    other users of the host connect (that takes write permission on the socket and search
    permission on every directory above it)."""
    vm = plain_guest
    sock, *_ = chain = path_access(vm.host, vm.qmp_socket)
    kvm_note("monitor socket", "; ".join(f"{p.path} {p.kind} {p.mode:o} {p.owner}:{p.group}" for p in chain))
    assert sock.kind == "socket", f"QEMU's QMP path {sock.path} is a {sock.kind}, not a socket"
    why = open_to_others(chain)
    assert not why, f"other users of the host can connect to QEMU's monitor at {sock.path}: {why}"


def test_guest_takes_no_passwords(kvm_host, plain_guest):
    """Handbook 7: the guest's SSH server offers key logins and no password (or keyboard-interactive) ones."""
    vm = plain_guest
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


def refused(attempt) -> str:
    """Run a migration ``attempt`` that must be refused; returns how it failed (``""`` if it completed)."""
    try:
        attempt()
    except MigrationFailed as exc:
        return str(exc)
    return ""


@pytest.mark.kvm_requires("tls", "object:authz-simple")
@pytest.mark.kvm_requires("tls", "object:authz-simple", on="peer")
def test_live_migration_over_tls(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 7 and 4.3: live migration over TLS (tls-creds-x509 both sides, tls-authz on the
    destination): the client the destination authorizes migrates; a certificate from another
    CA, one the CA signed for a client tls-authz does not name, and a client without TLS are
    refused, and the source guest keeps running after each."""
    address = kvm_peer.spec.migration_address
    pki, rogue = Pki("kvmcheck-migration-ca"), Pki("kvmcheck-rogue-ca")
    allowed = pki.client("kvmcheck-source")
    server_dir = pki.install(kvm_peer.transport, f"{kvm_peer.run_dir}/tls-{secrets.token_hex(3)}", "server",
                             pki.server(address))
    source = boot_vm(VMSpec(memory_mib=256))  # small: what is checked is who may connect, not the stream
    # QEMU checks its own certificate against the CA it trusts: the rogue client trusts its own
    # CA and does not verify the server (verify-peer off), so it gets as far as presenting it.
    clients = {"tls-allowed": (pki, allowed), "tls-another": (rogue, rogue.client("kvmcheck-source")),
               "tls-unauthorized": (pki, pki.client("kvmcheck-intruder"))}
    for creds, (ca, identity) in clients.items():
        directory = ca.install(kvm_host.transport, f"{kvm_host.run_dir}/{creds}-{secrets.token_hex(3)}", "client",
                               identity)
        source.qmp.cmd("object-add", qom_type="tls-creds-x509", id=creds, dir=directory, endpoint="client",
                       verify_peer=ca is pki)

    def attempt(creds: str):
        dest = boot_vm.start(boot_vm.successor(source, kvm_peer, "-incoming", "defer",
                                               "-object", creds_object("tls0", server_dir, "server"),
                                               "-object", f"authz-simple,id=authz0,identity={allowed.dn}"))
        dest.qmp.cmd("migrate-set-parameters", tls_creds="tls0", tls_authz="authz0")
        uri = listen(dest, address)
        source.qmp.cmd("migrate-set-parameters", tls_creds=creds, tls_hostname=address if creds else "")
        return dest, lambda: migrate(source, uri, timeout=60, destination=dest)

    for what, creds in (("a certificate from another CA", "tls-another"),
                        ("a certificate tls-authz does not name", "tls-unauthorized"), ("no TLS", "")):
        dest, go = attempt(creds)
        how = refused(go)
        assert how, f"the destination took a migration from a client with {what}"
        kvm_note(f"refused: {what}", how)
        assert source.qmp.cmd("query-status")["status"] == "running", \
            f"the source guest does not run after a refused migration ({what}): {how}"
        assert source.run(["true"]).ok, f"the source guest does not answer after a refused migration ({what})"
        dest.stop()
    dest, go = attempt("tls-allowed")
    info = go()
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} over TLS (tls-authz {allowed.dn}): {stats(info)}")
    assert dest.qmp.cmd("query-status")["status"] == "running"
    assert dest.run(["true"]).ok, "the guest does not answer on the destination after the TLS migration"


@pytest.mark.kvm_requires("tls", "object:secret")
def test_vnc_takes_tls_and_a_password(boot_vm, kvm_host):
    """Handbook 7: VNC behind TLS (VeNCrypt, x509) and a password: the server offers nothing
    else; a client asking for no authentication, or for a password sent without TLS, is
    refused; after TLS a wrong password is refused and the right one taken."""
    pki, password = Pki("kvmcheck-vnc-ca"), secrets.token_urlsafe(6).encode()  # VNC passwords: 8 bytes at most
    directory = pki.install(kvm_host.transport, f"{kvm_host.run_dir}/vnc-{secrets.token_hex(3)}", "server",
                            pki.server("127.0.0.1"))
    secret = f"{directory}/password"
    kvm_host.transport.write_bytes(secret, password, mode=0o600)
    # QEMU's VNC server is what is checked: it listens once QEMU runs, not once the guest has booted.
    vm = boot_vm.start(boot_vm.build(VMSpec(extra_args=(
        "-object", creds_object("vnctls", directory, "server", verify_peer=False),
        "-object", f"secret,id=vncpw,file={secret}",
        "-vnc", "127.0.0.1:0,to=99,tls-creds=vnctls,password-secret=vncpw"))))
    service = int(vm.qmp.cmd("query-vnc")["service"])

    def connect():
        return vm.host.connect_tcp("127.0.0.1", service)

    with connect() as stream:
        offered = vnc.security_types(stream)
    assert offered == [vnc.VENCRYPT], f"VNC offers security types {offered}; with TLS and a password only " \
                                      f"VeNCrypt ({vnc.VENCRYPT}) may be offered"
    for what, kind in (("no authentication", vnc.NONE), ("a password without TLS", vnc.VNC_AUTH)):
        with connect() as stream:
            vnc.security_types(stream)
            assert vnc.choose_refused(stream, kind), f"VNC let a client in with {what}"
    for guess, accepted in ((b"wrong", False), (password, True)):
        with connect() as stream:
            vnc.security_types(stream)
            subtypes, tls = vnc.vencrypt(stream, 261, pki.ca.cert, "127.0.0.1")
            assert tls, f"VNC offers VeNCrypt subtypes {[vnc.SUBTYPES.get(s, s) for s in subtypes]}, not X509Vnc " \
                        "(x509 TLS, then a password)"
            refusal = vnc.vnc_auth(tls, guess)
            if accepted:
                assert not refusal, f"VNC refused the right password: {refusal}"
            else:
                assert refusal, "VNC took a wrong password"
