"""The test PKI makes what QEMU's tls-creds-x509 reads, and a TLS client verifies it; VNC's DES key."""
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pytest_kvmcheck.hosts.local import LocalHost
from pytest_kvmcheck.hosts.spec import HostSpec
from pytest_kvmcheck.qemu import vnc
from pytest_kvmcheck.qemu.tls import Pki, creds_object


def test_certificates_carry_what_qemu_checks():
    pki = Pki("unit-ca")
    ca = x509.load_pem_x509_certificate(pki.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(pki.server("10.77.0.2").cert)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.77.0.2"]
    assert server.issuer == ca.subject
    client = pki.client("kvmcheck-source")
    assert client.dn == "CN=kvmcheck-source"
    usage = x509.load_pem_x509_certificate(client.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_install_writes_qemus_layout_and_keeps_the_key_private(tmp_path):
    pki = Pki("unit-ca")
    host = LocalHost(HostSpec(name="local", transport="local"))
    directory = pki.install(host, str(tmp_path / "creds"), "server", pki.server("127.0.0.1"))
    files = {p.name: p.stat().st_mode & 0o777 for p in Path(directory).iterdir()}
    # A server gets a fixed DH group too: without one QEMU generates parameters, 23-27 s on a lab host.
    assert files == {"ca-cert.pem": 0o644, "server-cert.pem": 0o644, "server-key.pem": 0o600, "dh-params.pem": 0o644}
    client = pki.install(host, str(tmp_path / "client"), "client", pki.client("kvmcheck-source"))
    assert sorted(p.name for p in Path(client).iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert creds_object("t0", directory, "server") == \
        f"tls-creds-x509,id=t0,dir={directory},endpoint=server,verify-peer=on"


@pytest.mark.parametrize("name, trusted", [("127.0.0.1", True), ("127.0.0.2", False)])
def test_tls_over_any_stream_verifies_the_server(name, trusted):
    """TlsStream (ssl.MemoryBIO over a plain stream) verifies the server's certificate and name."""
    pki = Pki("unit-ca")
    identity = pki.server("127.0.0.1")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "cert.pem").write_bytes(identity.cert)
        (Path(d) / "key.pem").write_bytes(identity.key)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(f"{d}/cert.pem", f"{d}/key.pem")
    ours, theirs = socket.socketpair()

    def serve():
        try:
            with server_context.wrap_socket(theirs, server_side=True) as tls:
                tls.sendall(tls.recv(5).upper())
        except (ssl.SSLError, OSError):
            theirs.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        if trusted:
            stream = vnc.TlsStream(ours, pki.ca.cert, name)
            stream.sendall(b"hello")
            assert stream.recv(5) == b"HELLO"
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                vnc.TlsStream(ours, pki.ca.cert, name)
    finally:
        ours.close()
        thread.join(5)


def test_vncdes_key_reverses_each_bytes_bits():
    assert vnc.des_key(b"\x01\x80") == b"\x80\x01" + b"\0" * 6
    assert len(vnc.des_key(b"a-long-password")) == 8  # VNC uses the first 8 bytes only
