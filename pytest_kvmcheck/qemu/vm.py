"""VM lifecycle: boot on a host, wait for the guest, reach it, shut it down, leave nothing.

A :class:`VM` is started daemonized with a pidfile in its own directory of the run's work
dir; QMP listens on a unix socket there, the serial console goes to a file there, and the
guest's SSH is a user-mode hostfwd on the host's loopback (port chosen by QEMU, read back
through ``info usernet``, so parallel workers never collide). Shut-down is ``quit`` (SIGTERM where QMP
did not take it), then SIGKILL. Every VM of the process is also stopped at exit, whatever happened.

A VM is a context manager (``with VM(...) as vm:`` destroys it on the way out); its spec is
frozen: a VM made to take over another (a migration destination) is a new VM of its own.
Tests get VMs from the factory in :mod:`pytest_kvmcheck.fixtures`, which owns them.
"""
from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import signal
import threading
import time
from pathlib import Path

from ..errors import GuestBootError, GuestCrashed, GuestLoginError, KvmCheckError, QemuExited, QemuNotFound, QMPLost, VMError
from ..guests.session import GuestSession, RunKey
from ..guests.shows import console_excerpt, crash_report, kernel_crashed
from ..images.build import READY_MARKER
from ..waiting import poll
from .monitor import Monitor
from ..hosts.footprint import KEEP_MARKER, PIDFILE, HostRun
from ..hosts.tools import QemuProcess
from ..hosts.transport import Host
from .spec import RenderContext, VMSpec, disk_cache_on, nic_mac, render_argv, tap_name

DEFAULT_BOOT_TIMEOUT = 60.0
LOGIN_RETRY_S = 60.0  # a guest that is up but whose first SSH connection drops: tried again this long
DISK_IMAGE_BOOT_TIMEOUT = 300.0  # a distribution with systemd and cloud-init, under TCG: about 30 s
_UNIX_PATH_MAX = 107
log = logging.getLogger(__name__)

_live: set["VM"] = set()
_live_lock = threading.Lock()


def stop_all_vms() -> None:
    """Stop every VM this process started and has not stopped (exit, interrupt, crash)."""
    with _live_lock:
        vms = list(_live)
    for vm in vms:
        try:
            vm.stop()
        except Exception:  # noqa: BLE001 - best effort at exit; the next run reaps the rest
            pass


atexit.register(stop_all_vms)



class VM:
    """One QEMU process on one host, with its monitor and its guest session."""

    def __init__(self, host: Host, spec: VMSpec, *, name: str, host_run: HostRun, run_key: RunKey,
                 accel: str, qemu_version: tuple[int, int, int] = (7, 2, 0), boot_disk: str = "", mode: str = ""):
        """``boot_disk``: take over another VM's overlay (a disk-image guest's migration)."""
        self.host, self.spec, self.name = host, spec, name
        self.host_run, self.run_key, self.accel = host_run, run_key, accel
        self.qemu_version = qemu_version
        self.dir = posixpath.join(host_run.run_dir, name)
        self.seed = secrets.randbits(24)
        self.argv: list[str] = []
        self.disk_paths: tuple[str, ...] = ()  # the data disks' images on the host, in spec order
        self.boot_disk = boot_disk  # a disk-image guest's overlay on the host (made at start if empty)
        self.pid: int | None = None
        self.start_stderr = ""
        self.boot_seconds: float | None = None
        self._qmp: Monitor | None = None
        self._guest: GuestSession | None = None
        self._ssh_port: int | None = None
        self._stopped = False
        self.kept = False  # left running on purpose (--kvm-keep-failed)
        self.mode = mode  # the device mode a parametrized suite booted it in
        self.address_leases: Path | None = None  # the run's leases of bridged addresses (KvmRun.new_vm)
        self._addresses: dict[tuple[int, str], str] = {}
        self._leases: list[Path] = []

    def __repr__(self) -> str:
        return f"<VM {self.name} on {self.host.name} pid={self.pid}>"

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    @property
    def stopped(self) -> bool:
        """Stopped (or kept) by us: its QEMU is no one's to talk to any more."""
        return self._stopped

    # ------------------------------------------------------------------ paths
    @property
    def disk_cache(self) -> str:
        """The cache mode of this VM's disks that say "auto" (and of disks plugged into it)."""
        return disk_cache_on(self.host_run.filesystem)

    def path(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    @property
    def console_log(self) -> str:
        return self.path("console.log")

    @property
    def qmp_socket(self) -> str:
        return self.path("qmp.sock")

    @property
    def qemu_log(self) -> str:
        """What QEMU says after it daemonized (a refused incoming stream, a device error)."""
        return self.path("qemu.log")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines QEMU wrote to its stderr, before and after it daemonized."""
        text = (self.start_stderr + self.host.read_root_text(self.qemu_log, default="")).strip()
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def render(self, disk_paths: tuple[str, ...] = (), boot_disk: str = "") -> list[str]:
        ctx = RenderContext(
            boot_disk=boot_disk, seed_iso=self.host_run.seed,
            accel=self.accel, kernel=self.host_run.kernel, workdir=self.dir,
            initrd=self.host_run.initrd_kvm if self.spec.guest_kvm and self.host_run.initrd_kvm else self.host_run.initrd,
            qmp_socket=self.qmp_socket, console_log=self.console_log, pidfile=self.path(PIDFILE),
            qemu_log=self.qemu_log,
            ssh_public_key=self.run_key.public_line, disk_paths=disk_paths,
            qemu_version=self.qemu_version, mac_seed=self.seed, auto_cache=self.disk_cache)
        return render_argv(self.host.spec.qemu, self.spec, ctx)

    def start(self) -> "VM":
        """Create the VM's dir and disks and launch QEMU (returns once QEMU daemonized)."""
        if len(self.qmp_socket) > _UNIX_PATH_MAX:
            raise VMError(f"host {self.host.name}: work dir path too long for a unix socket "
                          f"({self.qmp_socket}); set a shorter workdir= for the host")
        self.host.makedirs(self.dir)
        if self.host_run.boot_disk and not self.boot_disk:  # a disk-image guest writes to an overlay, never the image
            self.boot_disk = self.host.qemu_img.create(self.path("boot.qcow2"), backing=self.host_run.boot_disk)
        self.disk_paths = tuple(disk.path or self.host.qemu_img.create(self.path(f"disk{i}.{disk.format}"),
                                                                       disk.size_mib, disk.format)
                                for i, disk in enumerate(self.spec.disks))
        self.argv = self.render(self.disk_paths, self.boot_disk)
        self.host.write_bytes(self.path("argv.json"), json.dumps(self.argv).encode())
        with _live_lock:
            _live.add(self)
        self._started_at = time.monotonic()  # boot to ready counts QEMU's own start-up too
        result = self.host.run(self.argv, timeout=60, root=True)  # taps, vfio, -runas: QEMU starts as root
        self.start_stderr = result.stderr
        if result.exit_status == 127:
            raise QemuNotFound(f"host {self.host.name}: {self.argv[0]} not found: install QEMU "
                               "(Debian: apt-get install qemu-system-x86) or set qemu= for the host")
        if not result.ok:
            how = (f"killed by {signal.Signals(-result.exit_status).name}" if result.exit_status < 0
                   else f"exit {result.exit_status}")
            # With -D, QEMU writes why it refused its command line to the log, not to stderr.
            said = self.log_tail(lines=10)[-800:] or "(QEMU said nothing on stderr or in its log)"
            raise VMError(f"VM {self.name} on host {self.host.name}: QEMU refused to start ({how}): {said}\n"
                          f"Reproduce with: {shlex.join(self.argv)}")
        pid = self.host.read_root_text(self.path(PIDFILE), default="").strip()
        self.pid = int(pid) if pid.isdigit() else None
        log.info("VM %s on %s: QEMU %s started", self.name, self.host.name, self.pid)
        self._join_bridge()
        return self

    def _join_bridge(self) -> None:
        """Put the taps of bridged NICs into the host's bridge= (they vanish with QEMU)."""
        for i, nic in enumerate(self.spec.nics):
            if not nic.bridged:
                continue
            if not self.host.spec.bridge:
                raise VMError(f"VM {self.name}: a bridged NIC, but host {self.host.name} has no bridge= option")
            self.host.ip.link_up(self.tap(i), master=self.host.spec.bridge)

    def session_to(self, address: str, port: int = 22, timeout: float = 60.0) -> GuestSession:
        """A second SSH session to the guest at ``address`` (a bridged NIC), from its host.

        It does not go through QEMU's user-mode network, so it can outlive this QEMU. A link
        just brought up can take a while to answer on a busy nested host (a 10 s channel open
        timed out once in a lab run): tried until ``timeout``, then the last error stands.
        """
        return self._login(lambda: self.host.connect_tcp(address, port), f"{self.name}@{address}", timeout,
                           retry_on=(KvmCheckError, OSError, EOFError), where=f"{address}:{port} from host {self.host.name}")

    def _login(self, connect, label: str, timeout: float, retry_on=(GuestLoginError,), where: str = "") -> GuestSession:
        """Log in to the guest, trying again on ``retry_on`` until ``timeout`` or QEMU's exit."""
        deadline, attempts = time.monotonic() + timeout, 0
        while True:
            attempts += 1
            try:
                return GuestSession(connect(), self.run_key, self.host_run.host_public_key, label)
            except retry_on as exc:
                if not self.alive():
                    raise self.exited(f"before its guest took an SSH session ({exc})") from None
                if time.monotonic() > deadline:
                    console = self.console()
                    error = GuestCrashed if kernel_crashed(console) else VMError
                    raise error(f"VM {self.name}: no SSH session to the guest{' at ' + where if where else ''} "
                                f"within {timeout:.0f} s ({attempts} attempts): {exc}; QEMU running; "
                                f"serial console (last lines):\n{console_excerpt(console, 10) or '(empty)'}") from None
                log.info("VM %s: SSH to %s not yet: %s", self.name, label, exc)
                time.sleep(1)
            except (KvmCheckError, OSError, EOFError) as exc:  # the forward itself refused: is QEMU gone?
                if self.pid is not None and not self.alive():
                    raise self.exited(f"before its guest took an SSH session ({exc})") from None
                raise

    def exited(self, when: str) -> QemuExited:
        """The error for a QEMU found gone ``when`` the check needed its guest: its stderr and
        the console's tail (a guest kernel's crash report, if it printed one), which say why."""
        return QemuExited(f"VM {self.name} on host {self.host.name}: QEMU {self.pid} exited {when}.\n"
                          f"--- serial console (last lines) ---\n{self.console_tail(25) or '(empty)'}\n"
                          f"--- QEMU stderr ---\n{self.log_tail() or '(empty)'}")


    def mac(self, index: int) -> str:
        """The MAC of NIC ``index`` (the spec's, or one derived from this VM's seed)."""
        return nic_mac(self.spec, index, self.seed)

    def tap(self, index: int) -> str:
        """The host's tap device behind NIC ``index`` (tap, vhost and bridged NICs)."""
        return tap_name(self.seed, index)

    def link_to_host(self, index: int) -> tuple[str, str]:
        """Address the two ends of tap NIC ``index`` (a /30 of this VM's own) and set both up;
        returns (the host's address, the guest's). The addresses go with the tap, with QEMU."""
        third, fourth = (self.seed >> 6) & 0xff, (self.seed & 0x3f) * 4
        host_ip, guest_ip = f"10.{210 + index}.{third}.{fourth + 1}", f"10.{210 + index}.{third}.{fourth + 2}"
        self.host.ip.add_address(self.tap(index), f"{host_ip}/30")
        self.host.ip.link_up(self.tap(index))
        self.guest.nic(self.mac(index)).up(f"{guest_ip}/30")
        return host_ip, guest_ip

    @property
    def process(self) -> QemuProcess:
        """This VM's QEMU as its host's kernel shows it (status, listeners, memory)."""
        if self.pid is None:
            raise VMError(f"VM {self.name}: not started")
        return self.host.process(self.pid)

    def bring_up_bridged(self, index: int, cidr: str) -> str:
        """Give bridged NIC ``index`` its address on the bridge's subnet ``cidr``; returns the bare address."""
        address = self.bridged_address(index, cidr)
        self.guest.nic(self.mac(index)).up(address)
        return address.split("/")[0]

    def bridged_address(self, index: int, cidr: str) -> str:
        """The guest's address for bridged NIC ``index`` on the bridge's subnet ``cidr``.

        Guests take host numbers .200-.249 (from one their seed picks), leaving the low ones to
        hosts. Where the run leases addresses (:attr:`address_leases`, a dir every worker of
        the run sees), a number another guest holds is skipped: two hosts' guests on one bridge
        once took .245 both, and each host's TCP stream to its guest was reset. The lease goes
        with the VM (:meth:`destroy`), after every QEMU of its test has stopped.
        """
        if (index, cidr) in self._addresses:
            return self._addresses[(index, cidr)]
        net = ipaddress.ip_interface(cidr).network
        numbers = [200 + (self.seed + index + step) % 50 for step in range(50)]
        number = numbers[0] if self.address_leases is None else self._lease(net, numbers)
        self._addresses[(index, cidr)] = address = f"{net[number]}/{net.prefixlen}"
        return address

    def _lease(self, net, numbers: list[int]) -> int:
        """The first of ``numbers`` on ``net`` no other guest of the run holds, now held by this VM."""
        self.address_leases.mkdir(parents=True, exist_ok=True)
        for number in numbers:
            lease = self.address_leases / f"{net.network_address}-{net.prefixlen}-{number}"
            try:
                os.close(os.open(lease, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                continue
            self._leases.append(lease)
            return number
        raise VMError(f"VM {self.name}: every guest address .200-.249 of {net} is taken by this run's guests")

    def console(self) -> str:
        return self.host.read_root_text(self.console_log, default="")  # QEMU makes it 0640

    def console_tail(self, lines: int) -> str:
        """The serial console's last ``lines``, for an error that needs the guest's side ("" if
        none); where the guest's kernel crashed, its crash report (:func:`console_excerpt`)."""
        return console_excerpt(self.console(), lines)

    def kernel_crash_report(self) -> str:
        """The guest kernel's report of a crash or a stalled CPU, "" if it made none: what
        explains a guest that runs but no longer does its work. The serial console has what
        the kernel printed as it went down; its log (dmesg), if the guest still answers, also
        what a quiet console leaves out (a WARNING)."""
        report = crash_report(self.console())
        if report:
            return report
        try:
            return crash_report(self.guest_dmesg())
        except KvmCheckError:
            return ""

    def alive(self) -> bool:
        return self.pid is not None and self.host.pid_alive(self.pid)

    def wait_for_console(self, text: str, timeout: float) -> bool:
        """Watch the serial console for ``text`` while QEMU lives; True if it appeared.

        The console is read from where the last read ended and QEMU's liveness asked once a
        second: on a nested host every read is work for the one vCPU the booting guest needs
        too (reading the whole console and /proc ten times a second cost a lab boot 1.4 s)."""
        tail, next_alive_check = "", 0.0
        with self.host.follow(self.console_log) as more:
            def seen():
                nonlocal tail, next_alive_check
                tail = (tail + more())[-(len(text) + 4096):]
                if text in tail:
                    return True
                if time.monotonic() >= next_alive_check:
                    next_alive_check = time.monotonic() + 1.0
                    if not self.alive():
                        return "dead"
                return False
            return poll(seen, timeout, interval=0.1) is True

    @property
    def default_boot_timeout(self) -> float:
        if self.host.spec.boot_timeout:
            return float(self.host.spec.boot_timeout)
        return DISK_IMAGE_BOOT_TIMEOUT if self.host_run.boot_disk else DEFAULT_BOOT_TIMEOUT

    def wait_ready(self, timeout: float | None = None) -> "VM":
        """Wait for the guest's ready marker; on failure say why, with the console tail."""
        timeout = timeout or self.default_boot_timeout
        if not self.wait_for_console(READY_MARKER, timeout):
            state = "QEMU exited" if not self.alive() else f"no ready marker within {timeout:.0f} s"
            tail = self.console_tail(25) or "(empty: the guest printed nothing)"
            raise GuestBootError(
                f"VM {self.name} on host {self.host.name} did not boot: {state}.\n"
                f"--- serial console (last lines) ---\n{tail}\n"
                f"--- QEMU stderr ---\n{self.log_tail() or '(empty)'}\n"
                f"Reproduce with: {shlex.join(self.argv)}")
        self.boot_seconds = time.monotonic() - self._started_at
        log.info("VM %s on %s: ready %.1f s after QEMU was launched", self.name, self.host.name, self.boot_seconds)
        return self

    def boot(self, timeout: float | None = None) -> "VM":
        """Start and wait until the guest is ready, stopping QEMU if it is not."""
        try:
            return self.start().wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ access
    @property
    def qmp(self) -> Monitor:
        if self._qmp is None:
            if not self.alive():
                raise QMPLost(f"VM {self.name}: " + (self._qemu_state() if self.pid is not None else "QEMU was not started"))
            self._qmp = Monitor(self.host.connect_unix(self.qmp_socket), self.name, diagnose=self._qemu_state)
        return self._qmp

    def _qemu_state(self) -> str:
        """What became of QEMU, for a QMP error: exited (with its log), or running and where
        its main thread waits (a QEMU hung in a command is not one that died)."""
        try:
            # A QEMU that closed its socket as it was killed may still be ending (a CI run read
            # one as "still runs, main thread in 0"): it gets a second to be gone.
            if poll(lambda: not self.alive(), 1.0, 0.05):  # what it said, and the guest kernel's crash that ended it
                said = [self.log_tail(5).strip(), crash_report(self.console())]
                return f"QEMU {self.pid} has exited: " + ("\n".join(filter(None, said)) or "see its console log")
            waits = self.host.read_root_text(f"/proc/{self.pid}/wchan", default="?").strip() or "running"
            return f"QEMU {self.pid} still runs (main thread in {waits}): hung in the command, or its socket's relay stalled"
        except KvmCheckError as exc:
            return f"and host {self.host.name} does not answer to say whether QEMU runs: {exc}"

    def hostfwd_port(self, guest_ip: str, guest_port: int) -> int:
        """The host port QEMU chose (port 0) for a user-mode forward to ``guest_ip:guest_port``."""
        table = self.qmp.hmp("info usernet")
        match = re.search(rf"HOST_FORWARD\]?\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+{re.escape(guest_ip)}\s+{guest_port}\b",
                          table)
        if not match:
            raise VMError(f"VM {self.name}: no forward to {guest_ip}:{guest_port} in 'info usernet':\n{table}")
        return int(match.group(1))

    @property
    def ssh_port(self) -> int:
        if self._ssh_port is None:
            self._ssh_port = self.hostfwd_port("10.0.2.15", 22)
        return self._ssh_port

    @property
    def guest(self) -> GuestSession:
        """The guest's SSH session (one connection, opened on first use, reused).

        A login whose connection drops before authentication is tried again for
        ``LOGIN_RETRY_S``: a guest just restored from a stream answers its first connection
        only once QEMU's user-mode network has found it again (CI: "No existing session"
        right after a restore from a file, its guest running and well). 30 s was outlasted
        twice in CI by a guest on an SSH test host under the full run's load ("Error reading
        SSH protocol banner"); the error now carries the console's tail.
        """
        if self._guest is None:
            self._guest = self._login(lambda: self.host.connect_tcp("127.0.0.1", self.ssh_port), self.name,
                                      LOGIN_RETRY_S)
        return self._guest

    def guest_dmesg(self) -> str:
        """The guest kernel's log, for a failed test's report. A guest that does not run (QEMU
        waiting for an incoming migration, a source paused after its move, a panicked or
        stopped guest) answers no login: that is said at once, rather than trying to log in for
        ``LOGIN_RETRY_S`` (a minute added to every such FAIL)."""
        status = self.qmp.cmd("query-status")["status"]
        if status in ("inmigrate", "prelaunch"):
            return f"(none: QEMU is in state {status}, no guest has run in it)"
        if status != "running":
            return f"(not read: QEMU is in state {status}, the guest does not run)"
        return self.run("dmesg", timeout=10).stdout

    def reconnect_guest(self) -> GuestSession:
        """Drop the guest session and open a new one (after loadvm the old one is stale)."""
        if self._guest is not None:
            self._guest.close()
            self._guest = None
        return self.guest

    def run(self, command, timeout: float = 30.0, check: bool = False):
        """Shortcut: run a command in the guest."""
        return self.guest.run(command, timeout=timeout, check=check)

    # ------------------------------------------------------------------ shutdown
    def stop(self, timeout: float = 5.0) -> None:
        """``quit`` (or, where QMP did not take it, SIGTERM), then SIGKILL; idempotent, never raises for a dead VM."""
        if self._stopped:
            return
        self._stopped = True
        started, how = time.monotonic(), "not running"
        if self.pid is None and self.argv:  # interrupted while QEMU daemonized: find it by pidfile
            pid = self.host.read_root_text(self.path(PIDFILE), default="").strip()
            self.pid = int(pid) if pid.isdigit() else None
        try:
            if self._guest is not None:
                self._guest.close()
            if self.pid is not None and self.alive():
                quit_taken = False
                try:
                    # A QEMU that hangs in quit (a source whose postcopy was cancelled joins a stuck
                    # migration thread) gets the same few seconds as one that ignores it.
                    self.qmp.timeout = min(self.qmp.timeout, timeout)
                    self.qmp.cmd("quit")
                    quit_taken = True
                except KvmCheckError:
                    pass
                how = "quit" if quit_taken else "SIGTERM"
                if not poll(lambda: not self.alive(), timeout):
                    if not quit_taken:  # SIGTERM asks for the shutdown a taken quit began: no use there
                        self.host.kill(self.pid, "TERM")
                    if quit_taken or not poll(lambda: not self.alive(), 3.0):
                        how += f", SIGKILL after {time.monotonic() - started:.1f} s"
                        self.host.kill(self.pid, "KILL")
                        # A killed QEMU can take a while to go (a thread in an NFS call, vhost's
                        # teardown under an emulated CPU): its files stay open until it has.
                        if not poll(lambda: not self.alive(), 30.0):
                            log.warning("VM %s on %s: QEMU %s still there 30 s after SIGKILL",
                                        self.name, self.host.name, self.pid)
        finally:
            if self._qmp is not None:
                self._qmp.close()
            log.info("VM %s on %s: stopped in %.1f s (%s)", self.name, self.host.name, time.monotonic() - started, how)
            with _live_lock:
                _live.discard(self)

    def lost(self) -> None:
        """QEMU went with its host (a power cycle): nothing to stop, and its pid may now be
        another process's. Its files stay until :meth:`destroy`."""
        self._stopped = True
        for part in (self._guest, self._qmp):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - the connection under it is gone
                    pass
        self._guest = self._qmp = None
        with _live_lock:
            _live.discard(self)
        log.info("VM %s on %s: lost with its host", self.name, self.host.name)

    def keep(self) -> str:
        """Leave the VM running for a human (``--kvm-keep-failed``); returns how to reach it."""
        self.host.write_bytes(self.path(KEEP_MARKER), b"")
        self.kept = True
        with _live_lock:
            _live.discard(self)
        self._stopped = True
        where = "" if self.host.spec.transport == "local" else f" on {self.host.spec.url}"
        hosts = self.host.spec.url + (f"?workdir={self.host.spec.workdir}" if self.host.spec.workdir else "")
        # The guest's host key is known: a known_hosts file keeps the human's ssh verifying it.
        known = self.run_key.path.parent / f"known_hosts-{self.name}"
        known.write_text(f"[127.0.0.1]:{self.ssh_port} {self.host_run.host_public_key}\n")
        jump = "" if self.host.spec.transport == "local" else f"-J {self.host.spec.url.removeprefix('ssh://')} "
        return (f"VM {self.name} left running{where} (pid {self.pid}):\n"
                f"  ssh {jump}-i {self.run_key.path} -p {self.ssh_port} -o UserKnownHostsFile={known} root@127.0.0.1\n"
                f"  QMP: socat - UNIX-CONNECT:{self.qmp_socket}\n"
                f"  console: {self.console_log}\n"
                f"  remove it with: kvmcheck cleanup --kvm-hosts='{hosts}'")

    def destroy(self) -> None:
        """Stop the VM and remove its dir (a kept VM is left alone)."""
        if self.kept:
            return
        self.stop()
        # On shared storage a file of the VM's that another host's QEMU had open can linger for
        # seconds (14 s seen in the lab): such a dir goes with the run's dir, at the run's end
        # (remove_run), not in the test's teardown.
        if not self.host.remove_tree_now(self.dir):
            log.info("VM %s on %s: its dir %s still holds files open elsewhere: removed with the run's",
                     self.name, self.host.name, self.dir)
        for lease in self._leases:  # its guest is gone with its QEMU, and any destination's
            lease.unlink(missing_ok=True)
        self._leases.clear()

    # ------------------------------------------------------------------ reports
    def artifacts(self) -> dict[str, str]:
        """Texts worth attaching to a report: argv, QMP transcript, console, stderr."""
        out = {"QEMU argv": shlex.join(self.argv) if self.argv else "(not started)"}
        if self.boot_seconds is not None:
            out["boot"] = f"ready {self.boot_seconds:.2f} s after QEMU was launched ({self.accel})"
        if self._qmp is not None:
            out["QMP transcript"] = "\n".join(self._qmp.transcript)
        try:
            out["serial console"] = self.console()
        except KvmCheckError:
            pass
        try:
            stderr = self.log_tail(lines=200)
        except KvmCheckError:
            stderr = ""
        if stderr:
            out["QEMU stderr"] = stderr
        return out
