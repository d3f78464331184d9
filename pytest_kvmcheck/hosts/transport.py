"""Transports: one :class:`Host` interface, a local and an SSH implementation.

The backends (:mod:`.local`, :mod:`.ssh`) are opened by :func:`.connect.connect`.
Every command is an argv list; every call has a timeout.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..clock import parse_wall_clock
from ..errors import HostError
from .spec import HostSpec
from .tools import Ip, QemuImg, QemuProcess

DEFAULT_TIMEOUT = 60.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    """What a command left behind: the argv, its exit status and both output streams."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self, what: str | None = None) -> "CommandResult":
        """Return self if the command succeeded, else raise naming the command and its stderr."""
        if not self.ok:
            raise HostError(f"{what or shlex.join(self.argv)} failed with exit status "
                            f"{self.exit_status}: {self.stderr.strip()[-500:] or self.stdout.strip()[-500:]}")
        return self


class Host(abc.ABC):
    """A machine QEMU runs on. Subclasses implement the transport; the rest is shared."""

    def __init__(self, spec: HostSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name} {self.spec.url}>"

    # --- transport primitives -------------------------------------------------
    @abc.abstractmethod
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
            input: str | None = None, root: bool = False) -> CommandResult:
        """Run ``argv`` on the host and wait for it (killed at ``timeout``). With ``root``, as
        root: through ``sudo -n`` on a host reached as another user with ``sudo=1``."""

    def privileged(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as the host runs it as root: prefixed with ``sudo -n --`` where its spec says sudo=1
        (``-n``: a sudo that would ask for a password fails at once instead)."""
        return ["sudo", "-n", "--", *argv] if self.spec.sudo else list(argv)

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    @abc.abstractmethod
    def put_file(self, local_path: str, remote_path: str) -> None: ...

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    @abc.abstractmethod
    def connect_tcp(self, address: str, port: int, timeout: float = 10.0):
        """A socket-like stream to ``address:port`` as seen from the host."""

    @abc.abstractmethod
    def connect_unix(self, path: str, timeout: float = 10.0) -> socket.socket:
        """A real socket connected to a unix socket on the host (QMP uses this)."""

    @abc.abstractmethod
    def default_workdir(self) -> str: ...

    def close(self) -> None:  # noqa: B027 - optional: the local transport holds nothing
        """Release the connection (idempotent)."""

    # --- shared helpers built on the primitives -------------------------------
    def read_text(self, path: str, default: str | None = None) -> str:
        try:
            return self.read_bytes(path).decode(errors="replace")
        except (FileNotFoundError, OSError):
            if default is not None:
                return default
            raise

    def read_root_text(self, path: str, default: str | None = None) -> str:
        """A file only root may read (QEMU's pidfile is 0600; its /proc files are root's):
        through sudo where the spec says sudo=1, else as any file."""
        if not self.spec.sudo:
            return self.read_text(path, default)
        result = self.run(["cat", "--", path], timeout=30, root=True)
        if not result.ok and default is not None:
            return default
        return result.check(f"cat {path} on {self.name}").stdout

    @contextlib.contextmanager
    def follow(self, path: str) -> Iterator[Callable[[], str]]:
        """A reader of what a growing file (a serial console) gained since its last call: "" when
        nothing, or while the file does not exist yet. Read as :meth:`read_root_text` reads it;
        the SSH transport keeps one file open instead and reads only what is new."""
        seen = 0

        def more() -> str:
            nonlocal seen
            data = self.read_root_text(path, default="")
            new, seen = data[seen:], max(seen, len(data))
            return new
        yield more

    def makedirs(self, path: str) -> None:
        self.run(["mkdir", "-p", "--", path]).check()

    @contextlib.contextmanager
    def scratch_dir(self, path: str) -> Iterator[str]:
        """A directory made for a check and removed after it. When the check's own error is on
        its way, a removal that fails too (the host may be gone: a power cycle it did not come
        back from) is logged, not raised: it must not stand in for what went wrong."""
        self.makedirs(path)
        try:
            yield path
        except BaseException:
            try:
                self.remove_tree(path)
            except HostError as exc:
                log.warning("host %s: %s was not removed: %s", self.name, path, exc)
            raise
        self.remove_tree(path)

    def remove_tree(self, path: str, settle: float = 30.0) -> None:
        """``rm -rf``; on NFS a file whose last user just exited lingers as .nfsXXXX for a moment."""
        deadline = time.monotonic() + settle
        while True:
            if self.remove_tree_now(path):
                return
            if time.monotonic() > deadline:  # say what stays, and who holds it
                left = self.run(["sh", "-c", f"ls -la -- {shlex.quote(path)}; ls -l /proc/[0-9]*/fd 2>/dev/null | "
                                             f"grep -F -- {shlex.quote(path)} | head -5"], timeout=30).stdout
                if self.run(["rm", "-rf", "--", path]).ok:  # its holder went while we looked
                    return
                raise HostError(f"rm -rf -- {path} on {self.name}: the directory keeps files {settle:.0f} s on "
                                f"(open elsewhere?):\n{left.strip()[-1500:]}")
            time.sleep(0.2)

    def remove_tree_now(self, path: str) -> bool:
        """``rm -rf`` once: False if a directory stays "not empty" (on NFS, a file still open
        somewhere lingers as .nfsXXXX until it is closed)."""
        result = self.run(["rm", "-rf", "--", path])
        if result.ok or "not empty" not in result.stderr:
            result.check()
            return True
        return False

    def size(self, path: str) -> int:
        """Bytes in a file on the host."""
        return int(self.run(["stat", "-c", "%s", "--", path], timeout=10).check(f"stat on {self.name}").stdout)

    def read_sector(self, path: str, sector: int) -> str:
        """The 512 bytes at ``sector`` of a raw image on the host, as text (NULs dropped)."""
        result = self.run(["dd", f"if={path}", "bs=512", f"skip={int(sector)}", "count=1"], timeout=30, root=True)
        return result.check(f"dd on {self.name}").stdout.replace("\0", "")

    def pid_alive(self, pid: int) -> bool:
        """Whether the process runs. A zombie does not: it has exited and waits for its parent
        to reap it, which for a daemonized QEMU is init (here, an init that reaps every 2 s)."""
        stat = self.read_text(f"/proc/{int(pid)}/stat", default="")
        return bool(stat) and stat.rpartition(")")[2].split()[:1] != ["Z"]

    def wall_clock(self) -> float:
        """The host's wall clock, seconds since the epoch."""
        return parse_wall_clock(self.run(["date", "+%s.%N"], timeout=10).check(f"date on {self.name}").stdout)

    @contextlib.contextmanager
    def clock(self) -> Iterator[Callable[[], float]]:
        """A reader of the host's wall clock for repeated readings, each as quick as the
        transport allows (a command's start-up would blur the comparison of clocks)."""
        yield self.wall_clock

    def process_cmdline(self, pid: int) -> list[str]:
        raw = self.read_text(f"/proc/{int(pid)}/cmdline", default="")
        return [a for a in raw.split("\0") if a]

    def kill(self, pid: int, signal: str = "TERM") -> None:
        self.run(["kill", f"-{signal}", str(int(pid))], timeout=10, root=True)  # QEMU runs as root

    # --- the vocabulary suites use (hosts/tools.py) ---------------------------
    @property
    def qemu_img(self) -> QemuImg:
        return QemuImg(self)

    @property
    def ip(self) -> Ip:
        return Ip(self)

    def process(self, pid: int) -> QemuProcess:
        return QemuProcess(self, pid)
