"""TLS credentials for QEMU, made for one test: a CA, and certificates it (or another CA) signs.

QEMU's ``tls-creds-x509`` object reads a directory: ``ca-cert.pem``, and for a server
``server-cert.pem``/``server-key.pem`` (and ``dh-params.pem``), for a client
``client-cert.pem``/``client-key.pem``.
:meth:`Pki.install` writes one such directory on a host, the key readable by its owner only.
Keys never leave the host's run directory: nothing here returns a key to a report.
"""
from __future__ import annotations

import datetime
import ipaddress
import posixpath
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "Identity"]

# A server's Diffie-Hellman group, RFC 7919's ffdhe2048 (public, the same for everyone). Without
# a dh-params.pem QEMU generates 2048-bit parameters as the object is created: 23-27 s on a lab
# host, for each TLS destination of a test (openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048).
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM; ``dn`` is the subject as QEMU's tls-authz sees it."""

    cn: str
    cert: bytes
    key: bytes = b""

    @property
    def dn(self) -> str:
        return f"CN={self.cn}"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Pki:
    """A certificate authority of its own; ``Pki("x").server(...)`` and ``.client(...)`` issue certificates."""

    def __init__(self, name: str, days: int = 2):
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
        self._until = self._now + datetime.timedelta(days=days)
        self.ca = Identity(name, self._builder(_name(name), self._key.public_key())
                           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                           .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                          critical=True)
                           .sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(_name(self.name))
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(self._now).not_valid_after(self._until))

    def _issue(self, cn: str, purpose, alt_names: list) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (self._builder(_name(cn), key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False))
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        return Identity(cn, cert, _key_pem(key))

    def server(self, address: str) -> Identity:
        """A server certificate for ``address`` (an IP address or a host name, in subjectAltName)."""
        try:
            alt = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            alt = x509.DNSName(address)
        return self._issue(address, ExtendedKeyUsageOID.SERVER_AUTH, [alt])

    def client(self, cn: str) -> Identity:
        return self._issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def install(self, host, directory: str, endpoint: str, identity: Identity) -> str:
        """Write ``identity`` as QEMU's ``endpoint`` (server or client) credentials, with this CA,
        into ``directory`` on ``host``; returns the directory."""
        host.makedirs(directory)
        host.write_bytes(posixpath.join(directory, "ca-cert.pem"), self.ca.cert)
        host.write_bytes(posixpath.join(directory, f"{endpoint}-cert.pem"), identity.cert)
        host.write_bytes(posixpath.join(directory, f"{endpoint}-key.pem"), identity.key, mode=0o600)
        if endpoint == "server":
            host.write_bytes(posixpath.join(directory, "dh-params.pem"), FFDHE2048_PEM)
        return directory


def creds_object(object_id: str, directory: str, endpoint: str, verify_peer: bool = True) -> str:
    """The ``-object`` value of a tls-creds-x509 reading ``directory``."""
    return (f"tls-creds-x509,id={object_id},dir={directory},endpoint={endpoint},"
            f"verify-peer={'on' if verify_peer else 'off'}")
