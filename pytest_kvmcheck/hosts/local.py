"""The local transport: subprocesses and the local filesystem."""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Iterator, Sequence

from ..errors import CommandTimeout, HostError
from .transport import DEFAULT_TIMEOUT, CommandResult, Host

log = logging.getLogger(__name__)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished on its own meanwhile


class LocalHost(Host):
    @contextlib.contextmanager
    def clock(self) -> Iterator[Callable[[], float]]:
        """This machine's own clock: no round trip at all."""
        yield time.time

    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
            input: str | None = None, root: bool = False) -> CommandResult:
        argv = tuple(str(a) for a in (self.privileged(argv) if root else argv))
        start = time.monotonic()
        try:
            # Own session: a Ctrl-C at the terminal reaches pytest, not the child.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
        except FileNotFoundError:
            return CommandResult(argv, 127, "", f"{argv[0]}: command not found", 0.0)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise CommandTimeout(f"host {self.name}: {' '.join(argv)} did not finish within {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C included: the child must not outlive us
            _kill_group(proc)
            proc.wait()
            raise
        result = CommandResult(argv, proc.returncode, out, err, time.monotonic() - start)
        log.debug("host %s: %s -> exit %s in %.2f s", self.name, shlex.join(argv), result.exit_status, result.duration)
        return result

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def put_file(self, local_path: str, remote_path: str) -> None:
        if os.path.abspath(local_path) != os.path.abspath(remote_path):
            shutil.copyfile(local_path, remote_path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def connect_tcp(self, address: str, port: int, timeout: float = 10.0):
        sock = socket.create_connection((address, port), timeout=timeout)
        # Without TCP_NODELAY every small SSH packet waits for the peer's delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    def connect_unix(self, path: str, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise HostError(f"host {self.name}: cannot connect to {path}: {exc.strerror or exc}") from None
        sock.settimeout(None)
        return sock

    def default_workdir(self) -> str:
        return os.path.join(tempfile.gettempdir(), f"kvmcheck-{os.getuid()}")
