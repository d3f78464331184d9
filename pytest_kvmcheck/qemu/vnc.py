"""A VNC client's first steps (RFB 3.8, VeNCrypt, VNC authentication): as far as a security
check needs to see what a VNC server lets a client do, and that it checks a password.

The stream is anything with ``sendall`` and ``recv`` (a socket, or an SSH channel to a host's
loopback), so TLS runs over ``ssl.MemoryBIO`` rather than a wrapped socket.
"""
from __future__ import annotations

import ssl
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

RFB_VERSION = b"RFB 003.008\n"
NONE, VNC_AUTH, VENCRYPT = 1, 2, 19  # security types
SUBTYPES = {256: "Plain", 257: "TLSNone", 258: "TLSVnc", 259: "TLSPlain", 260: "X509None", 261: "X509Vnc",
            262: "X509Plain"}


def _exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the VNC server closed the connection ({len(data)} of {n} bytes read)")
        data += chunk
    return data


def _result(stream) -> str:
    """A SecurityResult: "" when accepted, else the server's reason (RFB 3.8 sends one)."""
    (status,) = struct.unpack(">I", _exactly(stream, 4))
    if status == 0:
        return ""
    try:
        (length,) = struct.unpack(">I", _exactly(stream, 4))
        return _exactly(stream, length).decode(errors="replace") or f"refused (status {status})"
    except ConnectionError:
        return f"refused (status {status})"


def security_types(stream) -> list[int]:
    """Agree on RFB 3.8 and read the security types the server offers."""
    version = _exactly(stream, 12)
    if not version.startswith(b"RFB "):
        raise ConnectionError(f"not a VNC server: it greeted with {version!r}")
    stream.sendall(RFB_VERSION)
    (count,) = _exactly(stream, 1)
    if count == 0:
        (length,) = struct.unpack(">I", _exactly(stream, 4))
        raise ConnectionError(f"the VNC server offers no security type: {_exactly(stream, length).decode()}")
    return list(_exactly(stream, count))


def choose_refused(stream, security_type: int) -> str:
    """Choose ``security_type`` (None or VNC authentication, no TLS): the server's reason for
    refusing it, or "" if it went along (None accepted, or a VNC challenge sent)."""
    stream.sendall(bytes([security_type]))
    if security_type == VNC_AUTH:
        head = _exactly(stream, 4)
        if head != b"\x00\x00\x00\x01":
            return ""  # the first bytes of a challenge: the server asks for the password in the clear
        try:
            (length,) = struct.unpack(">I", _exactly(stream, 4))
            return _exactly(stream, length).decode(errors="replace") or "refused"
        except ConnectionError:
            return "refused"
    return _result(stream)


class TlsStream:
    """TLS over a stream, verifying the server against ``ca_pem`` and ``server_name``."""

    def __init__(self, stream, ca_pem: bytes, server_name: str):
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.stream = stream
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self._until_done(self.tls.do_handshake)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.stream.sendall(data)

    def _until_done(self, operation):
        while True:
            try:
                result = operation()
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                chunk = self.stream.recv(65536)
                if not chunk:
                    raise ConnectionError("the VNC server closed the connection during TLS") from None
                self.incoming.write(chunk)

    def sendall(self, data: bytes) -> None:
        self._until_done(lambda: self.tls.write(data))

    def recv(self, n: int) -> bytes:
        return self._until_done(lambda: self.tls.read(n))


def vencrypt(stream, subtype: int, ca_pem: bytes, server_name: str) -> tuple[list[int], TlsStream | None]:
    """Choose VeNCrypt (type 19), read the subtypes offered, ask for ``subtype``; if the server
    offers it and it is an X509 one, run TLS. Returns the offered subtypes and the TLS stream."""
    stream.sendall(bytes([VENCRYPT]))
    major, minor = _exactly(stream, 2)
    stream.sendall(bytes([0, 2]))
    if _exactly(stream, 1) != b"\x00":
        raise ConnectionError(f"the VNC server refused VeNCrypt 0.2 (it speaks {major}.{minor})")
    (count,) = _exactly(stream, 1)
    offered = list(struct.unpack(f">{count}I", _exactly(stream, 4 * count)))
    if subtype not in offered:
        return offered, None
    stream.sendall(struct.pack(">I", subtype))
    if _exactly(stream, 1) != b"\x01":
        raise ConnectionError(f"the VNC server refused VeNCrypt subtype {SUBTYPES.get(subtype, subtype)}")
    return offered, TlsStream(stream, ca_pem, server_name)


def des_key(password: bytes) -> bytes:
    """VNC's DES key: the password padded to 8 bytes, each byte's bits reversed (as 3DES, k1=k2=k3 is DES)."""
    return bytes(int(f"{b:08b}"[::-1], 2) for b in password[:8].ljust(8, b"\0"))


def vnc_auth(stream, password: bytes) -> str:
    """Answer the server's VNC authentication challenge: "" if accepted, else its reason."""
    challenge = _exactly(stream, 16)
    encryptor = Cipher(TripleDES(des_key(password) * 3), modes.ECB()).encryptor()
    stream.sendall(encryptor.update(challenge) + encryptor.finalize())
    return _result(stream)
