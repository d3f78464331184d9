"""Guest sessions: one SSH connection per guest, reused for every command.

The guest's host key is the image's (known at build time), so it is verified, never
trusted on first use; the guest accepts only this run's key.
"""
from __future__ import annotations

import base64
import select
import shlex
import time
from pathlib import Path
from typing import Sequence

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import CommandTimeout, GuestCommandError, VMError
from .transport import CommandResult


class RunKey:
    """The run's SSH key pair (ed25519), made once per run and shared with workers by path."""

    def __init__(self, path: Path):
        self.path = path
        self.pkey = paramiko.Ed25519Key.from_private_key_file(str(path))
        self.public_line = (path.parent / (path.name + ".pub")).read_text().strip()

    @classmethod
    def create(cls, path: Path) -> "RunKey":
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        path.write_bytes(private)
        path.chmod(0o600)
        (path.parent / (path.name + ".pub")).write_text(public.decode() + " kvmcheck-run\n")
        return cls(path)


class GuestSession:
    """Commands in a guest over one SSH connection (a channel per command)."""

    def __init__(self, sock, run_key: RunKey, host_public_key: str, name: str, timeout: float = 15.0):
        self.name = name
        self._client = paramiko.SSHClient()
        keytype, b64 = host_public_key.split()[:2]
        self._client.get_host_keys().add("guest", keytype, paramiko.PKey.from_type_string(keytype, base64.b64decode(b64)))
        self._client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self._client.connect("guest", sock=sock, username="root", pkey=run_key.pkey, timeout=timeout,
                                 banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
                                 look_for_keys=False)
        except paramiko.BadHostKeyException:
            raise VMError(f"guest {name}: its SSH host key is not the image's: refusing to talk to it") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise VMError(f"guest {name}: SSH login failed: {type(exc).__name__}: {exc}") from None
        self._client.get_transport().set_keepalive(5)

    def run(self, command: str | Sequence[str], timeout: float = 30.0, check: bool = False,
            input: str | None = None) -> CommandResult:
        """Run a command in the guest. A list is quoted safely; a string is shell text."""
        text = command if isinstance(command, str) else shlex.join(command)
        argv = (text,) if isinstance(command, str) else tuple(command)
        start = time.monotonic()
        try:
            channel = self._client.get_transport().open_session(timeout=10)
        except (paramiko.SSHException, AttributeError, OSError) as exc:
            raise VMError(f"guest {self.name}: SSH connection lost: {exc}") from None
        try:
            channel.exec_command(text)
            if input is not None:
                channel.sendall(input.encode())
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = start + timeout
            while True:
                if channel.recv_ready():
                    out += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                elif channel.exit_status_ready():
                    break
                elif channel.closed:
                    raise VMError(f"guest {self.name}: SSH channel closed during {text!r}")
                else:
                    if time.monotonic() > deadline:
                        raise CommandTimeout(f"guest {self.name}: {text!r} did not finish within {timeout:.0f} s")
                    select.select([channel], [], [], 0.05)
            status = channel.recv_exit_status()
        finally:
            channel.close()
        result = CommandResult(argv, status, out.decode(errors="replace"), err.decode(errors="replace"),
                               time.monotonic() - start)
        if check and not result.ok:
            raise GuestCommandError(f"guest {self.name}: {text!r} exited {status}: "
                                    f"{result.stderr.strip()[-400:] or result.stdout.strip()[-400:]}")
        return result

    def read(self, path: str) -> str:
        return self.run(["cat", path], check=True).stdout

    def close(self) -> None:
        self._client.close()
