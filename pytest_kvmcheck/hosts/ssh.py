"""The SSH transport: paramiko with key auth, ~/.ssh/config and verified host keys.

One connection per host per process, reused for commands (exec channels), files
(SFTP), guest SSH (direct-tcpip to the host's loopback) and QMP (a relay to the
VM's unix socket, bridged to a local socketpair for qemu.qmp).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import os
import select
import secrets
import shlex
import socket
import threading
import time
from typing import Callable, Iterator, Sequence

import paramiko

from ..clock import parse_wall_clock
from ..errors import CommandTimeout, HostError, HostKeyUnknown, HostUnreachable
from .channel import read_channel
from .transport import DEFAULT_TIMEOUT, CommandResult, Host

# Relays a unix socket over an exec channel; socat where the host has it, python3 otherwise.
_PY_RELAY = (
    "import socket,sys,os,select\n"
    "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
    "i=sys.stdin.buffer.raw;o=sys.stdout.buffer.raw\n"
    "while True:\n"
    " r,_,_=select.select([i,s],[],[])\n"
    " if i in r:\n"
    "  d=os.read(i.fileno(),65536)\n"
    "  if not d: break\n"
    "  s.sendall(d)\n"
    " if s in r:\n"
    "  d=s.recv(65536)\n"
    "  if not d: break\n"
    "  o.write(d);o.flush()\n"
)

# Answers each line on stdin with the wall clock (for Host.clock).
_CLOCK_LOOP = ("if command -v bash >/dev/null && [ -n \"$(bash -c 'echo $EPOCHREALTIME')\" ]; then "
               "exec bash -c 'while read -r _; do echo \"$EPOCHREALTIME\"; done'; fi; "
               "while read -r _; do date +%s.%N; done")


PACK_FROM_BYTES = 4 << 20  # files this big are copied gzipped (put_file)


@functools.lru_cache(maxsize=8)
def _packed(path: str, size: int, mtime_ns: int) -> bytes:
    with open(path, "rb") as f:
        return gzip.compress(f.read(), compresslevel=1, mtime=0)  # level 1: 0.5 s for 66 MB, 6 packs it 8% smaller in 2.5x the time


def _worth_packing(path: str) -> bool:
    """Big, and not packed already (the second QEMU's bundle is a .tar.gz)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size >= PACK_FROM_BYTES and f.read(2) != b"\x1f\x8b"


def _gzipped(path: str) -> bytes:
    """The file gzipped, once per version of it in this process (every host gets the same)."""
    st = os.stat(path)
    return _packed(path, st.st_size, st.st_mtime_ns)


def _bridge(channel: paramiko.Channel) -> socket.socket:
    """A local socket whose peer is ``channel``: asyncio code needs a real socket."""
    ours, theirs = socket.socketpair()

    def pump() -> None:
        try:
            while True:
                r, _, _ = select.select([theirs, channel], [], [], 1.0)
                if channel.closed and not channel.recv_ready():
                    break
                if theirs in r:
                    data = theirs.recv(65536)
                    if not data:
                        break
                    channel.sendall(data)
                if channel in r:
                    data = channel.recv(65536)
                    if not data:
                        break
                    theirs.sendall(data)
        except OSError:
            pass
        finally:
            channel.close()
            theirs.close()

    threading.Thread(target=pump, name="kvmcheck-ssh-bridge", daemon=True).start()
    return ours

log = logging.getLogger(__name__)


FILE_TIMEOUT = 120.0  # seconds a file operation (SFTP) may wait for the host's answer


class SSHHost(Host):
    def __init__(self, spec):
        super().__init__(spec)
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._home: str | None = None
        self._programs: dict[str, bool] = {}  # which programs the host has, asked once each (has())
        self.file_timeout = FILE_TIMEOUT

    # --- connection -------------------------------------------------------------
    def _resolve(self) -> dict:
        """Merge the spec with ~/.ssh/config (the spec wins where it says something)."""
        cfg_path = os.path.expanduser("~/.ssh/config")
        cfg: dict = {}
        if os.path.isfile(cfg_path):
            cfg = paramiko.SSHConfig.from_path(cfg_path).lookup(self.spec.hostname)
        key = self.spec.key or (cfg.get("identityfile") or [None])[0]
        return {
            "hostname": cfg.get("hostname", self.spec.hostname),
            "port": self.spec.port or int(cfg.get("port", 22)),
            "username": self.spec.user or cfg.get("user") or os.environ.get("USER", "root"),
            "key_filename": os.path.expanduser(key) if key else None,
        }

    @property
    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None or not self._client.get_transport() or \
                    not self._client.get_transport().is_active():
                self._client = self._connect()
                self._sftp = None
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        params = self._resolve()
        client = paramiko.SSHClient()
        known = os.path.expanduser(self.spec.known_hosts or "~/.ssh/known_hosts")
        if os.path.isfile(known):
            client.load_host_keys(known)
        if self.spec.known_hosts is None:
            client.load_system_host_keys()
        if self.spec.accept_new_host_key:
            os.makedirs(os.path.dirname(known), mode=0o700, exist_ok=True)
            if not os.path.exists(known):
                open(known, "a").close()
            client.load_host_keys(known)  # so new keys are saved there
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"host {self.name} ({params['username']}@{params['hostname']}:{params['port']})"
        try:
            client.connect(params["hostname"], port=params["port"], username=params["username"],
                           key_filename=params["key_filename"], timeout=10, banner_timeout=30,
                           auth_timeout=10, allow_agent=True, look_for_keys=params["key_filename"] is None)
        except paramiko.BadHostKeyException as exc:
            raise HostKeyUnknown(
                f"{where}: the host key does not match the one in {known} (got {exc.key.get_name()} "
                f"{exc.key.get_fingerprint().hex()}). If the host was reinstalled, remove the old "
                f"entry with: ssh-keygen -R '[{params['hostname']}]:{params['port']}' -f {known}") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                port = params["port"]
                raise HostKeyUnknown(
                    f"{where}: its host key is not in {known}. Check it and add it with: "
                    f"ssh-keyscan -p {port} {params['hostname']} >> {known}  "
                    f"(or add accept_new_host_key=1 to the host spec to accept and record it)") from None
            raise HostUnreachable(f"{where}: SSH failed: {exc}") from None
        except (OSError, socket.timeout) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise HostUnreachable(
                f"{where}: cannot connect: {reason}. Check the address and that sshd runs there, "
                f"or drop it from --kvm-hosts") from None
        if self.spec.accept_new_host_key:
            client.save_host_keys(known)
        transport = client.get_transport()
        transport.set_keepalive(15)
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms ACK stalls
        return client

    @property
    def sftp(self) -> paramiko.SFTPClient:
        client = self.client
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = client.open_sftp()
                except (paramiko.SSHException, OSError) as exc:
                    raise HostError(f"host {self.name}: its sshd refused the SFTP subsystem ({exc}); "
                                    "enable 'Subsystem sftp' in its sshd_config") from None
                self._sftp.get_channel().settimeout(self.file_timeout)
            return self._sftp

    @contextlib.contextmanager
    def _files(self, what: str) -> Iterator[paramiko.SFTPClient]:
        """The SFTP session for one file operation. One the host does not answer (a filesystem
        that hangs there: the lab's NFS server lost its network once, and every read of a VM's
        console waited on it for ever) is a HostError that names it, and the session, which
        still owes that answer, is dropped for a new one."""
        try:
            yield self.sftp
        except socket.timeout:
            with self._lock:
                stale, self._sftp = self._sftp, None
            if stale is not None:
                stale.close()
            raise HostError(f"host {self.name}: {what} got no answer within {self.file_timeout:.0f} s "
                            "(does a filesystem hang there, a network one whose server is gone?)") from None

    def close(self) -> None:
        with self._lock:
            if self._sftp is not None:
                self._sftp.close()
            if self._client is not None:
                self._client.close()
            self._client = self._sftp = None

    # --- primitives -------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
            input: str | None = None, root: bool = False) -> CommandResult:
        argv = tuple(str(a) for a in (self.privileged(argv) if root else argv))
        command = shlex.join(argv)  # quoted: the remote side runs it through the user's shell
        start = time.monotonic()
        transport = self.client.get_transport()
        try:
            channel = transport.open_session(timeout=10)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(f"host {self.name}: no SSH session for {command}: "
                                  f"{exc or type(exc).__name__} (the connection broke, or sshd did not answer "
                                  "within 10 s)") from None
        try:
            channel.exec_command(command)
            if input is not None:
                channel.sendall(input.encode())
            channel.shutdown_write()
            out, err = read_channel(channel, start + timeout, timed_out=CommandTimeout(
                f"host {self.name}: {command} did not finish within {timeout:.0f} s"))
            status = channel.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(f"host {self.name}: the SSH connection broke during {command}: "
                                  f"{exc or type(exc).__name__}") from None
        finally:
            channel.close()
        if status == -1 and not transport.is_active():
            # paramiko's "no exit status": the connection, not the command, ended. Returned, it
            # read as the command failing with -1, which a check would take for the host's answer.
            raise HostUnreachable(f"host {self.name}: the SSH connection was lost during {command} "
                                  f"(after {time.monotonic() - start:.1f} s)")
        result = CommandResult(argv, status, out.decode(errors="replace"), err.decode(errors="replace"),
                               time.monotonic() - start)
        log.debug("host %s: %s -> exit %s in %.2f s", self.name, command, status, result.duration)
        return result

    def read_bytes(self, path: str) -> bytes:
        try:
            with self._files(f"reading {path}") as sftp, sftp.open(path, "rb") as f:
                return f.read()
        except IOError as exc:
            if getattr(exc, "errno", None) == 2:
                raise FileNotFoundError(path) from None
            raise

    def write_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        with self._files(f"writing {path}") as sftp:
            with sftp.open(path, "wb") as f:
                f.write(data)
            sftp.chmod(path, mode)

    def put_file(self, local_path: str, remote_path: str) -> None:
        """Copy a local file to the host. A big one goes gzipped and is unpacked there: the
        guest's 66 MB kernel took 10.7 s to reach a lab host's NFS as it is, 3.8 s packed (the
        host's sshd and its one vCPU, not the link, set the pace)."""
        # A name of this copy's own: hosts prepared at once that share storage may copy the same
        # file (threads of one process too: a pid alone was not enough, one's rename took the other's).
        tmp = f"{remote_path}.part-{os.getpid()}-{secrets.token_hex(4)}"
        what = f"copying {local_path} to {remote_path}"
        if _worth_packing(local_path) and self.has("gzip"):  # a host without gzip takes it as it is
            with self._files(what) as sftp:
                sftp.putfo(io.BytesIO(_gzipped(local_path)), f"{tmp}.gz")
            unpacked = self.run(["sh", "-c", 'gzip -dc -- "$1" > "$2" && rm -f -- "$1" && mv -- "$2" "$3"',
                                 "sh", f"{tmp}.gz", tmp, remote_path], timeout=300)
            if unpacked.ok:
                return
            self.run(["rm", "-f", "--", f"{tmp}.gz", tmp])
            raise HostError(f"host {self.name}: {what}: unpacking it there failed "
                            f"(exit {unpacked.exit_status}): {unpacked.stderr.strip()[-500:]}")
        with self._files(what) as sftp:
            sftp.put(local_path, tmp)
            sftp.posix_rename(tmp, remote_path)

    def has(self, program: str) -> bool:
        """Whether ``program`` is on the host's PATH: asked once per host, not per use."""
        if program not in self._programs:
            self._programs[program] = self.run(["sh", "-c", 'command -v "$1"', "sh", program], timeout=30).ok
        return self._programs[program]

    @contextlib.contextmanager
    def follow(self, path: str) -> Iterator[Callable[[], str]]:
        """One SFTP handle kept open and read from where it left off: a poll is one or two
        requests, not an open, a read of the whole file and a close."""
        if self.spec.sudo:  # the file is root's: through sudo's cat, as any root file
            with super().follow(path) as more:
                yield more
            return
        handle, offset = None, 0

        def more() -> str:
            nonlocal handle, offset
            with self._files(f"reading {path}") as sftp:
                if handle is None:
                    try:
                        handle = sftp.open(path, "rb")
                    except IOError:  # not there yet
                        return ""
                handle.seek(offset)
                data = handle.read()
            offset += len(data)
            return data.decode(errors="replace")
        try:
            yield more
        finally:
            if handle is not None:
                with contextlib.suppress(IOError, OSError, paramiko.SSHException):
                    handle.close()

    def exists(self, path: str) -> bool:
        try:
            with self._files(f"looking up {path}") as sftp:
                sftp.stat(path)
            return True
        except IOError:
            return False

    def listdir(self, path: str) -> list[str]:
        try:
            with self._files(f"listing {path}") as sftp:
                return sorted(sftp.listdir(path))
        except IOError:
            return []

    def connect_tcp(self, address: str, port: int, timeout: float = 10.0):
        try:
            return self.client.get_transport().open_channel(
                "direct-tcpip", (address, port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.SSHException as exc:  # refused (ChannelException), or no answer within the timeout
            raise HostError(f"host {self.name}: cannot reach {address}:{port} from there: {exc}") from None

    def connect_unix(self, path: str, timeout: float = 10.0) -> socket.socket:
        argv = ["socat", "-", f"UNIX-CONNECT:{path}"] if self.has("socat") else ["python3", "-c", _PY_RELAY, path]
        channel = self.client.get_transport().open_session(timeout=timeout)
        # QEMU's sockets belong to the user QEMU started as: root, through sudo= if the user is not.
        channel.exec_command(shlex.join(self.privileged(argv)))
        return _bridge(channel)

    @contextlib.contextmanager
    def clock(self) -> Iterator[Callable[[], float]]:
        """One shell kept open that answers each line with the time: no session or process
        started per reading (bash's $EPOCHREALTIME; date where there is no bash 5)."""
        channel = self.client.get_transport().open_session(timeout=10)
        channel.settimeout(10)
        channel.exec_command(shlex.join(["sh", "-c", _CLOCK_LOOP]))
        lines = channel.makefile("rb")

        def read() -> float:
            channel.sendall(b"\n")
            return parse_wall_clock(lines.readline().decode())
        try:
            yield read
        finally:
            channel.close()

    def default_workdir(self) -> str:
        if self._home is None:
            self._home = self.run(["sh", "-c", 'echo "$HOME"'], timeout=15).check().stdout.strip() or "/tmp"
        return f"{self._home}/.cache/pytest-kvmcheck/work"
