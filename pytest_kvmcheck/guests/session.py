"""Guest sessions: one SSH connection per guest, reused for every command.

The guest's host key is the image's (known at build time), so it is verified, never
trusted on first use; the guest accepts only this run's key.
"""
from __future__ import annotations

import base64
import logging
import secrets
import shlex
import time
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

from ..errors import CommandTimeout, GuestCommandError, GuestLoginError, VMError
from ..hosts.channel import read_channel
from ..hosts.transport import CommandResult
from .shows import GuestShows

if TYPE_CHECKING:  # paramiko is imported when a guest is first reached, not when the plugin loads
    import paramiko

log = logging.getLogger(__name__)


class RunKey:
    """The run's SSH key pair (ed25519), made once per run and shared with workers by path."""

    def __init__(self, path: Path):
        import paramiko
        self.path = path
        self.pkey = paramiko.Ed25519Key.from_private_key_file(str(path))
        self.public_line = (path.parent / (path.name + ".pub")).read_text().strip()

    @classmethod
    def create(cls, path: Path) -> "RunKey":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        path.write_bytes(private)
        path.chmod(0o600)
        (path.parent / (path.name + ".pub")).write_text(public.decode() + " kvmcheck-run\n")
        return cls(path)


class GuestSession(GuestShows):
    """Commands in a guest over one SSH connection, and what the guest shows (:class:`GuestShows`)."""

    def __init__(self, sock, run_key: RunKey, host_public_key: str, name: str, timeout: float = 15.0):
        import paramiko
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
        except paramiko.AuthenticationException as exc:
            transport = self._client.get_transport()
            dropped = transport is None or not transport.is_active()
            self._client.close()
            if dropped:  # paramiko calls a connection that ended during the login an authentication failure
                raise GuestLoginError(f"guest {name}: SSH login failed: the connection ended during "
                                      f"authentication ({exc})") from None
            raise VMError(f"guest {name}: SSH login refused: {exc} (the guest does not accept the run's key)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._client.close()
            raise GuestLoginError(f"guest {name}: SSH login failed: {type(exc).__name__}: {exc}") from None
        self._client.get_transport().set_keepalive(5)
        self._shell: paramiko.Channel | None = None
        self._started = 0.0

    def run(self, command: str | Sequence[str], timeout: float = 30.0, check: bool = False,
            input: str | None = None) -> CommandResult:
        """Run a command in the guest. A list is quoted safely; a string is shell text.

        Commands without ``input`` go to one persistent shell (about 1 ms a command under
        TCG, against about 20 ms for a fresh exec channel, which forks in the guest each time).
        """
        text = command if isinstance(command, str) else shlex.join(command)
        argv = (text,) if isinstance(command, str) else tuple(command)
        start = time.monotonic()
        if input is None:
            status, out, err = self._run_in_shell(text, timeout)
        else:
            status, out, err = self._run_in_channel(text, timeout, input)
        result = CommandResult(argv, status, out, err, time.monotonic() - start)
        log.debug("guest %s: %s -> exit %s in %.3f s", self.name, text[:200], status, result.duration)
        if check and not result.ok:
            raise GuestCommandError(f"guest {self.name}: {text!r} exited {status}: "
                                    f"{result.stderr.strip()[-400:] or result.stdout.strip()[-400:]}",
                                    status, result.stderr)
        return result

    def _open_channel(self) -> paramiko.Channel:
        import paramiko
        try:
            return self._client.get_transport().open_session(timeout=10)
        except (paramiko.SSHException, AttributeError, OSError) as exc:
            raise VMError(f"guest {self.name}: SSH connection lost: {exc}") from None

    def _pump(self, channel: paramiko.Channel, done, deadline: float, text: str) -> tuple[bytearray, bytearray]:
        """Read both streams of ``channel`` until ``done(out, err)`` or the deadline."""
        return read_channel(channel, deadline, done=done,
                            timed_out=CommandTimeout(f"guest {self.name}: {text!r} did not finish within "
                                                     f"{deadline - self._started:.0f} s"),
                            closed=VMError(f"guest {self.name}: the SSH channel ended before {text!r} finished "
                                           f"(the guest's shell or its SSH server went away mid-command)"))

    def _run_in_channel(self, text: str, timeout: float, input: str) -> tuple[int, str, str]:
        channel = self._open_channel()
        self._started = time.monotonic()
        try:
            channel.exec_command(text)
            channel.sendall(input.encode())
            channel.shutdown_write()
            out, err = self._pump(channel, lambda o, e: channel.exit_status_ready() and channel.eof_received,
                                  self._started + timeout, text)
            while channel.recv_ready():
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            return channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            channel.close()

    def _run_in_shell(self, text: str, timeout: float) -> tuple[int, str, str]:
        if self._shell is None or self._shell.closed:
            self._shell = self._open_channel()
            self._shell.exec_command("exec sh")
        token = f"__KVMCHECK_{secrets.token_hex(6)}__".encode()
        tail_out, tail_err = b"\n" + token + b" ", b"\n" + token + b"\n"
        # A subshell: 'exit' or 'cd' in a command cannot change the persistent shell.
        script = (b"(\n" + text.encode() + b"\n) </dev/null; printf '\\n%s %d\\n' " + token +
                  b" $?; printf '\\n%s\\n' " + token + b" >&2\n")
        self._started = time.monotonic()
        try:
            self._shell.sendall(script)
            out, err = self._pump(self._shell, lambda o, e: tail_out in o and o.endswith(b"\n") and tail_err in e,
                                  self._started + timeout, text)
        except BaseException:
            self._shell.close()  # its state is unknown now: the next command gets a fresh shell
            self._shell = None
            raise
        body, _, status = bytes(out).rpartition(tail_out)
        return int(status.strip() or 255), body.decode(errors="replace"), \
            bytes(err).rpartition(tail_err)[0].decode(errors="replace")

    def read(self, path: str) -> str:
        return self.run(["cat", path], check=True).stdout

    def close(self) -> None:
        if self._shell is not None:
            self._shell.close()
        self._client.close()
