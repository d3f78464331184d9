"""Migration: a destination rendered from the source's own spec, the move, and continuity.

The destination QEMU is started from the same :class:`VMSpec` as the source (a device
list in another order makes QEMU refuse the stream: "Unknown ramblock"), with
``-incoming defer`` and ``migrate-incoming tcp:ADDR:0`` so QEMU picks a free port: no
port allocation, no collisions between parallel runs; it listens on the destination
host's migration address only. :func:`preflight` holds the seed's checks for a host pair;
the same-backing-image mode mirrors a guest's overlay to an NBD export on the destination
(:func:`export_disks`, :func:`mirror_disks`, :func:`finish_mirrors`), which replaced
``migrate -b``. :class:`GuestState` records what the guest must still show afterwards.
"""
from __future__ import annotations

import hashlib
import posixpath
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .capabilities import Capabilities
from .errors import MigrationDidNotConverge, MigrationFailed, VMError
from .monitor import QMPCommandError
from .session import KvmRun, PreparedHost
from .transport import Host
from .vm import VM, poll
from .vmspec import nic_mac

OPTIONAL_CAPABILITIES = ("auto-converge", "multifd", "postcopy-ram")
MARKER_PATH = "/tmp/kvmcheck-migration-marker"  # tmpfs: it lives in guest RAM
COUNTER_PATH = "/tmp/kvmcheck-counter"


def destination_spec(source: VM, disk_paths: tuple[str, ...] | None = None):
    """The source's spec with its disks pointing at the source's images (shared storage), or
    at ``disk_paths``, and its NICs keeping the source's MACs (the guest's network identity
    moves with it)."""
    paths = source.disk_paths if disk_paths is None else disk_paths
    disks = tuple(replace(d, path=p) for d, p in zip(source.spec.disks, paths, strict=True))
    nics = tuple(replace(n, mac=nic_mac(source.spec, i, source.seed)) for i, n in enumerate(source.spec.nics))
    return source.spec.with_(disks=disks, nics=nics)


def successor(run: KvmRun, host_name: str, source: VM, *extra_args: str,
              disk_paths: tuple[str, ...] | None = None) -> VM:
    """A VM made to take over ``source``: same spec, the same disk images (shared storage)
    unless ``disk_paths`` gives it images of its own (a block mirror fills them)."""
    spec = destination_spec(source, disk_paths)
    vm = run.new_vm(host_name, spec.with_(extra_args=spec.extra_args + tuple(extra_args)))
    vm.reuse_boot_disk = source.boot_disk
    return vm


def start_destination(run: KvmRun, dest_host: PreparedHost, source: VM, capabilities: tuple[str, ...] = (),
                      disk_paths: tuple[str, ...] | None = None) -> tuple[VM, str]:
    """Start the destination QEMU on ``dest_host`` waiting for the stream; returns it and the URI.

    It listens on the host's migration address (loopback for the local host), never on
    every interface. ``capabilities`` that both sides must enable (multifd, postcopy-ram)
    are set before it listens; a QEMU or host without them raises :class:`VMError`.
    ``disk_paths``: the destination's own images (same backing image) instead of the source's.
    """
    dest = successor(run, dest_host.name, source, "-incoming", "defer", disk_paths=disk_paths)
    dest.start()
    try:
        if capabilities:
            dest.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": c, "state": True} for c in capabilities])
        dest.qmp.cmd("migrate-incoming", uri=f"tcp:{dest_host.spec.migration_address}:0")
        address = dest.qmp.cmd("query-migrate")["socket-address"][0]
    except BaseException:
        dest.destroy()
        raise
    return dest, f"tcp:{address['host']}:{address['port']}"


def preflight(source: VM, source_caps: Capabilities, dest_caps: Capabilities,
              visible: Callable[[str], bool]) -> dict[str, str]:
    """Seed 4.3.2, before anything moves: {capability: why it is missing} on the destination.

    ``visible(path)`` tells whether the destination sees a file (shared storage). An empty
    answer means the pair can migrate this guest.
    """
    problems = {}
    if dest_caps.qemu_version < source_caps.qemu_version:
        problems["qemu-version"] = (f"QEMU {dest_caps.qemu_version_text} is older than the source's "
                                    f"{source_caps.qemu_version_text}: streams only go to the same or newer QEMU")
    if dest_caps.machines and source.spec.machine not in dest_caps.machines:
        problems["machine-type"] = f"QEMU there lacks machine type {source.spec.machine!r}"
    if source_caps.cpu_flags and dest_caps.cpu_flags:
        for flag, what in (("nx", "NX (no-execute)"), ("lm", "64-bit long mode")):
            if (flag in source_caps.cpu_flags) != (flag in dest_caps.cpu_flags):
                problems[f"cpu-{flag}"] = f"the hosts differ in {what}"
        if source_caps.accel == "kvm":  # the guest sees the host's CPU: the destination needs every flag
            lacking = sorted(set(source_caps.cpu_flags) - set(dest_caps.cpu_flags))
            if lacking:
                problems["cpu-flags"] = f"the CPU lacks flags the source's has: {' '.join(lacking[:12])}"
    hidden = [p for p in [source.boot_disk, *source.disk_paths] if p and not visible(p)]
    if hidden:
        problems["shared-storage"] = f"it does not see the guest's images at the same path: {', '.join(hidden)}"
    return problems


def device_layout(vm: VM) -> list[str]:
    """The VM's devices as QEMU was told them (driver and id), in order."""
    out = []
    for opt, value in zip(vm.argv, vm.argv[1:], strict=False):
        if opt == "-device":
            fields = dict(f.split("=", 1) if "=" in f else ("driver", f) for f in value.split(","))
            out.append(f"{fields.get('driver')}#{fields.get('id', '')}")
    return out


def layout_mismatch(source: VM, dest: VM) -> str:
    """Pre-flight: '' if the device layouts match, else what differs (QEMU would refuse the stream)."""
    a, b = device_layout(source), device_layout(dest)
    if a == b:
        return ""
    missing = [d for d in a if d not in b]
    extra = [d for d in b if d not in a]
    parts = [f"the destination lacks {', '.join(missing)}"] if missing else []
    parts += [f"the destination has extra {', '.join(extra)}"] if extra else []
    return "; ".join(parts) or f"the device order differs: {a} vs {b}"


def migrate(source: VM, uri: str, timeout: float = 120.0, max_downtime_ms: int | None = None,
            bandwidth_bytes: int | None = None, capabilities: tuple[str, ...] = (),
            destination: VM | None = None, before_switchover: Callable[[], None] | None = None) -> dict:
    """Run ``migrate`` to ``uri`` and wait for it to end; returns query-migrate's final answer.

    Over a socket the return path is on, so a destination that rejects the stream (another
    device layout, say) fails the migration on the source too, and QEMU resumes the source
    guest. ``capabilities`` are turned on for this migration (auto-converge, multifd,
    postcopy-ram: with the latter the guest switches to postcopy once the first pass is
    under way). ``before_switchover`` runs once the source has stopped and before the
    destination takes over (finishing block mirrors). Given the ``destination`` VM, wait
    until it runs as well. Raises :class:`MigrationFailed` naming QEMU's error (and a
    device-layout mismatch, if any), :class:`MigrationDidNotConverge` at the deadline.
    """
    q = source.qmp
    return_path = uri.startswith(("tcp:", "unix:"))
    q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True}, {"capability": "return-path", "state": return_path},
        *({"capability": c, "state": c in capabilities} for c in OPTIONAL_CAPABILITIES),
        {"capability": "pause-before-switchover", "state": before_switchover is not None}])
    parameters = {}
    if max_downtime_ms is not None:
        parameters["downtime-limit"] = max_downtime_ms
    if bandwidth_bytes is not None:
        parameters["max-bandwidth"] = bandwidth_bytes
    if parameters:
        q.cmd("migrate-set-parameters", **parameters)
    q.clear_events()
    q.cmd("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    switch_to_postcopy = "postcopy-ram" in capabilities
    throttle = 0  # the highest CPU throttle auto-converge applied, in percent
    while True:
        info = q.cmd("query-migrate")
        status = info.get("status")
        throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
        info["max-cpu-throttle-percentage"] = throttle
        if switch_to_postcopy and status == "active" and info.get("ram", {}).get("transferred", 0) > 0:
            q.cmd("migrate-start-postcopy")
            switch_to_postcopy = False
        if status == "pre-switchover" and before_switchover is not None:
            before_switchover()
            q.cmd("migrate-continue", state="pre-switchover")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", "no reason given")
            mismatch = layout_mismatch(source, destination) if destination is not None else ""
            raise MigrationFailed(f"migration of {source.name} to {uri} {status}: {why}"
                                  + (f"; the device layouts differ: {mismatch}" if mismatch else ""), info)
        if time.monotonic() > deadline:
            q.cmd("migrate_cancel")
            poll(lambda: q.cmd("query-migrate").get("status") == "cancelled", 10)
            raise MigrationDidNotConverge(
                f"migration of {source.name} to {uri} did not complete within {timeout:.0f} s "
                f"(status {status}; {info.get('ram', {}).get('remaining')} bytes remaining; CPU throttled up to "
                f"{throttle}%): it did not converge", info)
        time.sleep(0.05)
    info["statuses"] = [e["data"]["status"] for e in q.events("MIGRATION")]  # what the move went through
    if destination is not None:
        running = poll(lambda: destination.qmp.cmd("query-status")["status"] == "running",
                       max(deadline - time.monotonic(), 10))
        if not running:
            raise VMError(f"migration of {source.name} completed but the destination {destination.name} does not "
                          f"run: {destination.qmp.cmd('query-status')['status']}")
    return info


def place_base_image(host: Host, directory: str, data: bytes, size_mib: int) -> str:
    """A raw image of ``size_mib`` in ``directory`` with ``data`` at offset 0; named by the
    data's hash, so every host given the same data holds the same base image."""
    path = posixpath.join(directory, f"base-{hashlib.sha256(data).hexdigest()[:12]}.raw")
    if not host.exists(path):
        host.makedirs(posixpath.dirname(path))
        host.write_bytes(path, data)
        host.run([host.spec.qemu_img, "resize", "-q", "-f", "raw", path, f"{size_mib}M"],
                 timeout=30).check(f"qemu-img resize on {host.name}")
    return path


def create_overlay(host: Host, path: str, base: str) -> str:
    """A qcow2 overlay on ``base``: the guest writes here, the base stays as it was."""
    host.run([host.spec.qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path],
             timeout=30).check(f"qemu-img create on {host.name}")
    return path


def export_disks(dest: VM, address: str, attempts: int = 20) -> int:
    """Serve the destination's data disks over NBD, writable, on ``address``; returns the port.

    QEMU cannot be asked which port it picked for NBD, so free ones are tried in turn.
    """
    for _ in range(attempts):
        port = random.randrange(20000, 60000)
        try:
            dest.qmp.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": address, "port": str(port)}})
            break
        except QMPCommandError as exc:
            if "in use" not in str(exc):
                raise
    else:
        raise VMError(f"VM {dest.name}: no free port for the NBD server on {address} after {attempts} tries")
    for i in range(len(dest.spec.disks)):
        dest.qmp.cmd("block-export-add", type="nbd", id=f"mirror-export{i}", name=f"disk{i}",
                     writable=True, **{"node-name": f"disk{i}"})
    return port


def mirror_disks(source: VM, address: str, port: int, timeout: float = 60.0) -> None:
    """Mirror the top layer of each data disk to the destination's export; wait until in sync.

    ``write-blocking``: from then on a guest write completes only once it reached the
    destination too, so data written during the migration is there as well.
    """
    for i in range(len(source.spec.disks)):
        source.qmp.cmd("blockdev-add", driver="nbd", export=f"disk{i}", **{"node-name": f"mirror-target{i}"},
                       server={"type": "inet", "host": address, "port": str(port)})
        source.qmp.cmd("blockdev-mirror", sync="top", target=f"mirror-target{i}", device=f"disk{i}",
                       **{"job-id": f"mirror{i}", "copy-mode": "write-blocking"})
    ready = poll(lambda: all(j["ready"] for j in source.qmp.cmd("query-block-jobs")), timeout, 0.1)
    if not ready:
        raise VMError(f"VM {source.name}: block mirrors not in sync within {timeout:.0f} s: "
                      f"{source.qmp.cmd('query-block-jobs')}")


def finish_mirrors(source: VM, timeout: float = 60.0) -> None:
    """Complete the mirrors without pivoting (the source stops using them) and wait for the end."""
    for job in source.qmp.cmd("query-block-jobs"):
        source.qmp.cmd("block-job-cancel", device=job["device"])
    if not poll(lambda: not source.qmp.cmd("query-block-jobs"), timeout, 0.05):
        raise VMError(f"VM {source.name}: block mirrors did not finish within {timeout:.0f} s")


@dataclass(frozen=True)
class GuestState:
    """What a guest shows that must survive a migration unchanged (or keep moving)."""

    uptime: float
    marker: str
    counter: int
    counter_pid: str
    lspci: str
    balloon_bytes: int | None

    @classmethod
    def prepare(cls, vm: VM) -> None:
        """Put a marker in guest RAM and start a counting process."""
        vm.run(f"head -c 32 /dev/urandom | sha256sum > {MARKER_PATH}", check=True)
        vm.run(f"(i=0; while :; do i=$((i+1)); echo $i > {COUNTER_PATH}.new; mv {COUNTER_PATH}.new {COUNTER_PATH}; "
               f"sleep 0.1; done) >/dev/null 2>&1 </dev/null & echo $! > {COUNTER_PATH}.pid", check=True)

    @classmethod
    def read(cls, vm: VM) -> "GuestState":
        out = vm.run(f"cut -d' ' -f1 /proc/uptime; cat {MARKER_PATH}; cat {COUNTER_PATH}; cat {COUNTER_PATH}.pid",
                     check=True).stdout.split("\n")
        balloon = vm.qmp.cmd("query-balloon")["actual"] if vm.spec.balloon else None
        return cls(float(out[0]), out[1], int(out[2]), out[3].strip(), vm.run("lspci -n", check=True).stdout, balloon)

    def differences(self, after: "GuestState") -> list[str]:
        """What the guest shows differently after; empty means continuity held."""
        problems = []
        if after.uptime <= self.uptime:
            problems.append(f"uptime went from {self.uptime} s to {after.uptime} s: the guest rebooted")
        if after.marker != self.marker:
            problems.append(f"the RAM marker changed from {self.marker!r} to {after.marker!r}")
        if after.counter_pid != self.counter_pid:
            problems.append(f"the counting process changed pid ({self.counter_pid} -> {after.counter_pid})")
        if after.counter <= self.counter:
            problems.append(f"the counting process stopped at {after.counter} (was {self.counter})")
        if after.lspci != self.lspci:
            problems.append(f"lspci changed:\n{self.lspci}\n->\n{after.lspci}")
        if after.balloon_bytes != self.balloon_bytes:
            problems.append(f"the balloon target changed from {self.balloon_bytes} to {after.balloon_bytes}")
        return problems


def dirty_rate_mib_s(vm: VM, seconds: int = 2) -> float:
    """How fast the guest dirties its memory now, as QEMU's page sampling measures it (MiB/s)."""
    vm.qmp.cmd("calc-dirty-rate", **{"calc-time": seconds})
    result = poll(lambda: (r := vm.qmp.cmd("query-dirty-rate"))["status"] == "measured" and r,
                  seconds + 30, 0.2)
    if not result:
        raise VMError(f"VM {vm.name}: calc-dirty-rate did not finish within {seconds + 30} s")
    return float(result.get("dirty-rate", 0))


def stats(info: dict) -> dict:
    """The numbers reports carry: total time, downtime, bytes moved."""
    ram = info.get("ram", {})
    return {"total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "transferred_bytes": ram.get("transferred"),
            "mbps": ram.get("mbps"), "dirty_sync_count": ram.get("dirty-sync-count"),
            "multifd_bytes": ram.get("multifd-bytes"), "postcopy_requests": ram.get("postcopy-requests"), "statuses": info.get("statuses")}
