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
import re
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ..clock import Offset, event_time
from ..hosts.capabilities import Capabilities
from ..errors import KvmCheckError, MigrationDidNotConverge, MigrationFailed, QMPCommandError, VMError
from ..hosts.transport import Host
from ..guests.shows import BlockDevice
from ..waiting import poll
from .vm import VM
from .spec import VMSpec

OPTIONAL_CAPABILITIES = ("auto-converge", "multifd", "postcopy-ram")
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: max-bandwidth that limits nothing
MARKER_PATH = "/tmp/kvmcheck-migration-marker"  # tmpfs: it lives in guest RAM
COUNTER_PATH = "/tmp/kvmcheck-counter"


def destination_spec(source: VM, disk_paths: tuple[str, ...] | None = None, extra_args: tuple[str, ...] = (),
                     **changes) -> VMSpec:
    """The spec of a VM taking over ``source``: the source's own, with its disks pointing at
    the source's images (shared storage) or at ``disk_paths``, its NICs keeping the source's
    MACs (the guest's network identity moves with it), ``extra_args`` added (``-incoming``,
    ``-loadvm``), and ``changes`` (a deliberately different destination)."""
    paths = source.disk_paths if disk_paths is None else disk_paths
    disks = tuple(replace(d, path=p) for d, p in zip(source.spec.disks, paths, strict=True))
    nics = tuple(replace(n, mac=source.mac(i)) for i, n in enumerate(source.spec.nics))
    return source.spec.with_(disks=disks, nics=nics, extra_args=source.spec.extra_args + tuple(extra_args),
                             **changes)


def listen(dest: VM, address: str, capabilities: tuple[str, ...] = ()) -> str:
    """Have ``dest`` (started with ``-incoming defer``) listen on ``address``, port chosen by
    QEMU; returns the URI to migrate to.

    ``capabilities`` that both sides must enable (multifd, postcopy-ram) are set first; a
    QEMU without them refuses with :class:`QMPCommandError`.
    """
    dest.qmp.cmd("migrate-set-capabilities",  # events: the destination's own MIGRATION events
                 capabilities=[{"capability": c, "state": True} for c in ("events", *capabilities)])
    dest.qmp.cmd("migrate-incoming", uri=f"tcp:{address}:0")
    socket_address = dest.qmp.cmd("query-migrate")["socket-address"][0]
    return f"tcp:{socket_address['host']}:{socket_address['port']}"


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


def argv_layout(argv: list[str]) -> list[str]:
    """The devices (driver#id) a command line asks for."""
    out = []
    for opt, value in zip(argv, argv[1:], strict=False):
        if opt == "-device":
            fields = dict(f.split("=", 1) if "=" in f else ("driver", f) for f in value.split(","))
            out.append(f"{fields.get('driver')}#{fields.get('id', '')}")
    return sorted(out)


def qom_layout(peripherals: list[dict]) -> list[str]:
    """The devices (driver#id) in QEMU's answer to ``qom-list /machine/peripheral``."""
    return sorted(f"{p['type'][len('child<'):-1]}#{p['name']}" for p in peripherals
                  if p.get("type", "").startswith("child<"))


def device_layout(vm: VM) -> list[str]:
    """The VM's devices (driver#id) as its QEMU has them, hot-plugged ones included; as its
    command line has them when its QEMU no longer answers."""
    if vm.alive():
        try:
            return qom_layout(vm.qmp.cmd("qom-list", path="/machine/peripheral"))
        except VMError:
            pass
    return argv_layout(vm.argv)


def layout_mismatch(source: VM, dest: VM) -> str:
    """Pre-flight: '' if the two QEMUs hold the same devices, else what differs (QEMU would refuse the stream)."""
    a, b = device_layout(source), device_layout(dest)
    missing = [d for d in a if d not in b]
    extra = [d for d in b if d not in a]
    parts = [f"the destination lacks {', '.join(missing)}"] if missing else []
    parts += [f"the destination has extra {', '.join(extra)}"] if extra else []
    return "; ".join(parts)


def statuses(vm: VM) -> list[str]:
    """The migration states QEMU's MIGRATION events have reported so far, oldest first."""
    return [e["data"]["status"] for e in vm.qmp.events("MIGRATION")]


def migrate(source: VM, uri: str, timeout: float = 120.0, max_downtime_ms: int | None = None,
            bandwidth_bytes: int | None = None, capabilities: tuple[str, ...] = (),
            destination: VM | None = None, before_switchover: Callable[[], None] | None = None,
            on_progress: Callable[[dict], str] | None = None) -> dict:
    """Run ``migrate`` to ``uri`` and wait for it to end; returns query-migrate's final answer.

    Over a socket the return path is on, so a destination that rejects the stream (another
    device layout, say) fails the migration on the source too, and QEMU resumes the source
    guest. ``capabilities`` are turned on for this migration (auto-converge, multifd,
    postcopy-ram: with the latter the guest switches to postcopy once the first pass is
    under way). ``before_switchover`` runs once the source has stopped and before the
    destination takes over (finishing block mirrors). ``on_progress(info)`` sees each
    query-migrate answer while the migration is active (it may retune the migration) and may
    end the wait by the migration's own progress rather than the clock: a non-empty answer
    (why) cancels it as not converging. Given the ``destination`` VM, wait
    until it runs as well. Raises :class:`MigrationFailed` naming QEMU's error (and a
    device-layout mismatch, if any), :class:`MigrationDidNotConverge` at the deadline.
    """
    was_running = start_migration(source, uri, capabilities, max_downtime_ms, bandwidth_bytes,
                                  pause_before_switchover=before_switchover is not None)
    return await_migration(source, uri, timeout, capabilities, destination, before_switchover, on_progress,
                           was_running)


def await_migration(source: VM, uri: str, timeout: float = 120.0, capabilities: tuple[str, ...] = (),
                    destination: VM | None = None, before_switchover: Callable[[], None] | None = None,
                    on_progress: Callable[[dict], str] | None = None, was_running: bool = True) -> dict:
    """The waiting half of :func:`migrate`, for a migration :func:`start_migration` began
    (a check that measures or retunes it on the way first)."""
    q = source.qmp
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
            # QEMU's migration thread sets "completed" before it computes the totals: a query in
            # between reads total-time and downtime as 0, which would pass any downtime bound.
            info = poll(lambda: _with_totals(q.cmd("query-migrate")), 5) or info
            info["max-cpu-throttle-percentage"] = throttle
            break
        if status in ("failed", "cancelled", "postcopy-paused"):
            went = statuses(source)
            if "postcopy-active" in went or status == "postcopy-paused":  # the guest ran on the destination
                raise MigrationFailed(postcopy_broke(source, uri, status, info, destination), info)
            raise MigrationFailed(failure_message(source, uri, status, info, destination), info)
        why = on_progress(info) if on_progress is not None and status == "active" else ""
        if not why and time.monotonic() > deadline and status != "active":  # not a question of converging
            went = statuses(source)
            held = f"QEMU still holds it in {status} after {timeout:.0f} s (went through {went})"
            if "postcopy-active" in went:
                raise MigrationFailed(postcopy_broke(source, uri, status, {**info, "error-desc": held}, destination),
                                      info)
            raise MigrationFailed(f"migration of {source.name} to {uri} did not end: {held}", info)
        if why or time.monotonic() > deadline:
            q.cmd("migrate_cancel")
            poll(lambda: q.cmd("query-migrate").get("status") == "cancelled", 10)
            raise MigrationDidNotConverge(
                f"migration of {source.name} to {uri} did not complete "
                f"{f'({why})' if why else f'within {timeout:.0f} s'} (status {status}; "
                f"{info.get('ram', {}).get('remaining')} bytes remaining; CPU throttled up to {throttle}%): "
                f"it did not converge", info)
        time.sleep(0.05)
    info["statuses"] = statuses(source)  # what the move went through
    if destination is not None:
        running = poll(lambda: destination.qmp.cmd("query-status")["status"] == "running",
                       max(deadline - time.monotonic(), 10))
        if not running:
            raise destination_not_running(source, destination, was_running, info)
    return info


def start_migration(source: VM, uri: str, capabilities: tuple[str, ...] = (), max_downtime_ms: int | None = None,
                    bandwidth_bytes: int | None = None, pause_before_switchover: bool = False,
                    postcopy_bandwidth_bytes: int | None = None) -> bool:
    """Set the migration's capabilities and parameters on ``source`` and issue ``migrate``;
    returns whether the guest ran when it began (QEMU brings a stopped guest over stopped)."""
    q = source.qmp
    return_path = uri.startswith(("tcp:", "unix:"))
    q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True}, {"capability": "return-path", "state": return_path},
        *({"capability": c, "state": c in capabilities} for c in OPTIONAL_CAPABILITIES),
        {"capability": "pause-before-switchover", "state": pause_before_switchover}])
    parameters = {}
    if max_downtime_ms is not None:
        parameters["downtime-limit"] = max_downtime_ms
    if bandwidth_bytes is not None:
        parameters["max-bandwidth"] = bandwidth_bytes
    if postcopy_bandwidth_bytes is not None:  # postcopy has a limit of its own (0: none)
        parameters["max-postcopy-bandwidth"] = postcopy_bandwidth_bytes
    if parameters:
        q.cmd("migrate-set-parameters", parameters)
    q.clear_events()
    was_running = q.cmd("query-status")["running"]
    q.cmd("migrate", uri=uri)
    return was_running


@dataclass(frozen=True)
class Cancelled:
    """How a migration cancelled in ``state`` ended on the source: the statuses it went through
    and its last, or QEMU's refusal of the cancel (``refused``: its words)."""

    state: str
    statuses: tuple[str, ...]
    final: str
    refused: str = ""


@contextmanager
def unanswered_port(host: Host, program: str, directory: str, seconds: int = 150) -> Iterator[int]:
    """A port on ``host``'s loopback whose connects stay pending (``kvmcheck-net hold``: its
    accept queue is full, so the kernel drops SYNs): a migration there stays in setup. The
    holder ends by itself after ``seconds`` whatever happens here, and is killed on leaving."""
    out = posixpath.join(directory, f"hold-{random.randrange(1 << 32):08x}")
    pid = host.run(["sh", "-c", f"{shlex.quote(program)} hold {seconds} >{out} 2>&1 </dev/null & echo $!"],
                   timeout=10).check("starting kvmcheck-net hold").stdout.strip()
    try:
        said = poll(lambda: host.run(["cat", out]).stdout.strip() or None, 10, 0.05)
        match = re.fullmatch(r"port (\d+)", said or "")
        if not match:
            raise VMError(f"host {host.name}: kvmcheck-net hold gave no port: {said!r}")
        yield int(match.group(1))
    finally:
        host.run(["sh", "-c", f"kill {int(pid)} 2>/dev/null; rm -f {out}"])


def migrate_to_state(source: VM, uri: str, state: str, capabilities: tuple[str, ...] = (),
                     bandwidth_bytes: int | None = None, timeout: float = 60.0) -> None:
    """Start a migration and return once QEMU reports ``state`` (the migration still running).

    Reaching the state is the caller's part, by what holds it rather than by timing: an
    unanswered connect (setup), a slow link (active), pause-before-switchover (pre-switchover),
    postcopy started on a slow link (postcopy-active: started here once RAM flows, the link
    limit applying to postcopy too)."""
    q = source.qmp
    postcopy = state == "postcopy-active"
    start_migration(source, uri, capabilities, bandwidth_bytes=bandwidth_bytes,
                    postcopy_bandwidth_bytes=bandwidth_bytes if postcopy else None,
                    pause_before_switchover=state == "pre-switchover")
    deadline = time.monotonic() + timeout
    while True:
        info = q.cmd("query-migrate")
        status = info.get("status")
        if status == state or state in statuses(source):
            return  # there now, or there in between two readings (QEMU's event says so)
        if postcopy and status == "active" and info.get("ram", {}).get("transferred", 0) > 0:
            q.cmd("migrate-start-postcopy")
            postcopy = False
        if status in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            raise VMError(f"migration of {source.name} to {uri} never reached {state} "
                          f"({'ended ' + status if time.monotonic() <= deadline else f'{timeout:.0f} s'}; "
                          f"went through {statuses(source)})")
        time.sleep(0.02)


def cancel_in(source: VM, uri: str, state: str, capabilities: tuple[str, ...] = (),
              bandwidth_bytes: int | None = None, timeout: float = 60.0, settle: float = 30.0) -> Cancelled:
    """Start a migration, cancel it once QEMU reports ``state`` (see :func:`migrate_to_state`)
    and wait up to ``settle`` seconds for it to end. The link limits are put back as they were."""
    q = source.qmp
    limits = {k: v for k, v in q.cmd("query-migrate-parameters").items()
              if k in ("max-bandwidth", "max-postcopy-bandwidth")}
    migrate_to_state(source, uri, state, capabilities, bandwidth_bytes, timeout)
    refused = ""
    try:
        q.cmd("migrate_cancel")
    except QMPCommandError as exc:
        refused = exc.desc
    if not refused:
        poll(lambda: q.cmd("query-migrate").get("status") in ("cancelled", "failed", "completed"), settle, 0.05)
    q.cmd("migrate-set-parameters", limits)
    return Cancelled(state, tuple(statuses(source)),
                     q.cmd("query-migrate").get("status"), refused)


def pause_postcopy(dest: VM, timeout: float = 30.0) -> None:
    """Break a postcopy stream from the destination's end (``migrate-pause``, out of band) and
    wait for its MIGRATION event postcopy-paused. Its main thread may be blocked on a page that
    has not arrived, so nothing here needs it. The guest must run on the destination first
    (its RESUME event): a stream broken while the destination still loads the devices' state
    fails the migration, as QEMU 7.2 showed."""
    dest.qmp.wait_event("RESUME", timeout)
    dest.qmp.clear_events()
    dest.qmp.cmd_oob("migrate-pause")
    dest.qmp.wait_event("MIGRATION", timeout, match={"data": {"status": "postcopy-paused"}})


def recover_postcopy(source: VM, dest: VM, address: str, timeout: float = 120.0, attempts: int = 20) -> dict:
    """Resume a postcopy migration both sides hold in postcopy-paused: the destination listens
    on a new channel (``migrate-recover``, out of band: its main thread may wait for a page;
    free ports tried in turn, as QEMU cannot be asked which it picked), the source connects
    there with ``migrate resume=true``; the link limits are lifted and the migration awaited."""
    port = on_a_free_port(dest, "migrate-recover", address, attempts,
                          lambda p: dest.qmp.cmd_oob("migrate-recover", uri=f"tcp:{address}:{p}"))
    uri = f"tcp:{address}:{port}"
    source.qmp.cmd("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH, "max-postcopy-bandwidth": 0})
    source.qmp.clear_events()
    source.qmp.cmd("migrate", uri=uri, resume=True)
    # Until the source takes the new channel it still reads postcopy-paused, which await_migration calls a failure.
    taken = source.qmp.wait_event("MIGRATION", 30, match=lambda e: e["data"]["status"] != "postcopy-paused")
    info = await_migration(source, uri, timeout, destination=dest)
    info["statuses"] = ["postcopy-paused", taken["data"]["status"], *info["statuses"]]  # from the pause on
    return info


def measure_throughput(source: VM, seconds: float, settle: float = 0.5, least: float = 1.0) -> tuple[int, float]:
    """Bytes of RAM the source's migration sent (query-migrate's ram.transferred) over up to
    ``seconds`` of wall time, once it has been active for ``settle``: (bytes, seconds). A
    migration that ends sooner is measured up to its last active reading; one active for less
    than ``least`` seconds of the window gives no measurement (VMError)."""
    q = source.qmp
    if not poll(lambda: q.cmd("query-migrate").get("status") == "active", 30, 0.02):
        raise VMError(f"migration of {source.name} never became active")
    time.sleep(settle)  # past the first burst: the rate limit counts in 100 ms slices
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        info = q.cmd("query-migrate")
        if info.get("status") != "active":
            break
        samples.append((info["ram"]["transferred"], time.monotonic()))
        time.sleep(0.1)
    if len(samples) < 2 or samples[-1][1] - samples[0][1] < least:
        raise VMError(f"migration of {source.name} was active for less than {least} s of the measurement "
                      f"({len(samples)} readings): give it more RAM to send")
    return samples[-1][0] - samples[0][0], samples[-1][1] - samples[0][1]


def postcopy_broke(source: VM, uri: str, status: str, info: dict, destination: VM | None) -> str:
    """Why a migration that had switched to postcopy stopped, and the guest's fate: its RAM is
    split between the hosts, so it runs nowhere until the destination recovers the stream
    (migrate-recover), and is lost with the destination."""
    where = ("postcopy-paused, its guest stopped, waiting for the destination to recover the stream"
             if status == "postcopy-paused" else f"{status} after the switch to postcopy: its copy of the guest is stale")
    there = ""
    if destination is not None:
        said = destination_side(destination, alive=True) if destination.alive() else ""
        if not destination.alive():  # also one that exited while it was asked (a lab run saw that race)
            said = ("its QEMU exited: the guest is lost (its newest pages died with it, QEMU's documented "
                    "behaviour for postcopy)")
        there = f"; the destination {destination.name}: {said}"
    return (f"migration of {source.name} to {uri} broke in postcopy: the source is {where} "
            f"({info.get('error-desc', 'no error-desc')}){there}")


def destination_not_running(source: VM, destination: VM, was_running: bool, info: dict) -> VMError:
    """Why a completed migration's destination does not run. QEMU carries the source's run state
    over: a guest that ran when the move began and arrives paused was stopped on the way (a
    FAIL of the host); one that was paused before arrives paused by design (no verdict)."""
    state = destination.qmp.cmd("query-status")["status"]
    stops = len(source.qmp.events("STOP"))  # one is the switch-over's own
    if was_running:
        return MigrationFailed(
            f"migration of {source.name} completed, but the guest that ran on the source when it began is "
            f"{state} on the destination {destination.name}: it was stopped while it moved (the source "
            f"stopped {stops} time(s); QEMU carries a stopped guest over stopped)", info)
    return VMError(f"migration of {source.name} completed but the destination {destination.name} does not run: "
                   f"{state} (the source guest was already stopped when the migration began)")


def _with_totals(info: dict) -> dict | None:
    """``info`` once it carries the migration's total time, else None."""
    return info if info.get("total-time") else None


def failure_message(source: VM, uri: str, status: str, info: dict, destination: VM | None) -> str:
    """Why a migration ended in ``status``, from both sides: each QEMU's query-migrate
    error and the tail of its stderr, and the device layouts if they differ."""
    parts = [f"migration of {source.name} to {uri} {status}",
             f"the source says: {info.get('error-desc', '(no error-desc)')}"]
    tail = source.log_tail(5)
    if tail:
        parts.append(f"the source's QEMU stderr:\n{tail}")
    if destination is not None:
        parts.append(f"the destination {destination.name} on host {destination.host.name}: "
                     f"{destination_side(destination)}")
        mismatch = layout_mismatch(source, destination)
        if mismatch:
            parts.append(f"the device layouts differ: {mismatch}")
    return "; ".join(parts)


def destination_side(dest: VM, alive: bool | None = None) -> str:
    """What the destination QEMU says about an incoming migration that failed (``alive``: its
    liveness, if the caller has just asked)."""
    if dest.alive() if alive is None else alive:
        try:
            answer = dest.qmp.cmd("query-migrate")
            said = f"query-migrate status {answer.get('status')}: {answer.get('error-desc', '(no error-desc)')}"
        except KvmCheckError as exc:
            said = f"its QMP did not answer ({exc})"
    else:
        said = "its QEMU exited"
    tail = dest.log_tail(8)
    return said + (f"; its QEMU stderr:\n{tail}" if tail else "; its QEMU stderr is empty")


def on_a_free_port(vm: VM, what: str, address: str, attempts: int, listen: Callable[[int], object]) -> int:
    """Call ``listen(port)`` with free ports tried in turn (QEMU cannot be asked which port it
    took for these listeners); returns the port taken."""
    for _ in range(attempts):
        port = random.randrange(20000, 60000)
        try:
            listen(port)
            return port
        except QMPCommandError as exc:
            if "in use" not in str(exc):
                raise
    raise VMError(f"VM {vm.name}: no free port for {what} on {address} after {attempts} tries")


def place_base_image(host: Host, directory: str, data: bytes, size_mib: int) -> str:
    """A raw image of ``size_mib`` in ``directory`` with ``data`` at offset 0; named by the
    data's hash, so every host given the same data holds the same base image."""
    path = posixpath.join(directory, f"base-{hashlib.sha256(data).hexdigest()[:12]}.raw")
    if not host.exists(path):
        host.makedirs(posixpath.dirname(path))
        host.write_bytes(path, data)
        host.qemu_img.resize(path, size_mib)
    return path


def export_disks(dest: VM, address: str, attempts: int = 20) -> int:
    """Serve the destination's data disks over NBD, writable, on ``address``; returns the port.

    QEMU cannot be asked which port it picked for NBD, so free ones are tried in turn.
    """
    port = on_a_free_port(dest, "the NBD server", address, attempts, lambda p: dest.qmp.cmd(
        "nbd-server-start", addr={"type": "inet", "data": {"host": address, "port": str(p)}}))
    for i in range(len(dest.spec.disks)):
        dest.qmp.cmd("block-export-add", type="nbd", id=f"mirror-export{i}", name=f"disk{i}",
                     writable=True, node_name=f"disk{i}")
    return port


def mirror_disks(source: VM, address: str, port: int, timeout: float = 60.0) -> None:
    """Mirror the top layer of each data disk to the destination's export; wait until in sync.

    ``write-blocking``: from then on a guest write completes only once it reached the
    destination too, so data written during the migration is there as well.
    """
    for i in range(len(source.spec.disks)):
        source.qmp.cmd("blockdev-add", driver="nbd", export=f"disk{i}", node_name=f"mirror-target{i}",
                       server={"type": "inet", "host": address, "port": str(port)})
        source.qmp.cmd("blockdev-mirror", sync="top", target=f"mirror-target{i}", device=f"disk{i}",
                       job_id=f"mirror{i}", copy_mode="write-blocking")
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
class MachineState:
    """What the hypervisor shows of a VM, which must be the same machine after a migration.

    Read over QMP from QEMU itself, not from the guest: a destination QEMU built with one
    device more, or another machine type, would otherwise go unnoticed until the guest
    rescans its bus.
    """

    machine_type: str
    pci: tuple[str, ...]  # "bus:slot.function vendor:device class 0xCCCC id=QDEV_ID", in bus order
    peripherals: tuple[str, ...]  # the ids under /machine/peripheral (every -device id=...)
    vcpus: int
    ram_bytes: int  # base memory plus plugged DIMMs
    balloon_bytes: int | None

    @staticmethod
    def _pci_functions(buses: list[dict]) -> list[str]:
        out = []
        for bus in buses:
            for d in bus.get("devices", []):
                out.append(f"{bus['bus']:02x}:{d['slot']:02x}.{d['function']} {d['id']['vendor']:04x}:"
                           f"{d['id']['device']:04x} class 0x{d['class_info']['class']:04x} id={d.get('qdev_id', '')}")
                if d.get("pci_bridge"):
                    out += MachineState._pci_functions([d["pci_bridge"]])
        return out

    @classmethod
    def read(cls, vm: VM) -> "MachineState":
        q = vm.qmp
        memory = q.cmd("query-memory-size-summary")
        return cls(
            machine_type=q.cmd("qom-get", path="/machine", property="type"),
            pci=tuple(cls._pci_functions(q.cmd("query-pci"))),
            peripherals=tuple(sorted(p["name"] for p in q.cmd("qom-list", path="/machine/peripheral")
                                     if p["type"].startswith("child<"))),
            vcpus=len(q.cmd("query-cpus-fast")),
            ram_bytes=memory["base-memory"] + memory.get("plugged-memory", 0),
            balloon_bytes=q.cmd("query-balloon")["actual"] if vm.spec.balloon else None)

    def differences(self, after: "MachineState") -> list[str]:
        """What QEMU shows differently after, each naming the difference; empty: the same machine."""
        problems = []
        if after.machine_type != self.machine_type:
            problems.append(f"the machine type changed from {self.machine_type} to {after.machine_type}")
        problems += _added_removed("QEMU's PCI functions (query-pci)", self.pci, after.pci)
        problems += _added_removed("QEMU's device ids (/machine/peripheral)", self.peripherals, after.peripherals)
        for what, a, b in (("vCPUs", self.vcpus, after.vcpus), ("RAM bytes", self.ram_bytes, after.ram_bytes),
                           ("balloon target", self.balloon_bytes, after.balloon_bytes)):
            if a != b:
                problems.append(f"QEMU's {what} changed from {a} to {b}")
        return problems


def _added_removed(what: str, before, after) -> list[str]:
    """'{what} on the destination: extra X; missing Y', or [] when both hold the same entries in order."""
    if tuple(before) == tuple(after):
        return []
    extra = [x for x in after if x not in before]
    missing = [x for x in before if x not in after]
    parts = ([f"extra {', '.join(extra)}"] if extra else []) + ([f"missing {', '.join(missing)}"] if missing else [])
    return [f"{what} after the move: " + ("; ".join(parts) or f"the order changed: {list(before)} -> {list(after)}")]


@dataclass(frozen=True)
class GuestState:
    """What must survive a migration unchanged (or keep moving): the guest's view and QEMU's."""

    uptime: float
    marker: str
    counter: int
    counter_pid: str
    lspci: tuple[str, ...]
    machine: MachineState

    @classmethod
    def prepare(cls, vm: VM) -> None:
        """Put a marker in guest RAM and start a counting process."""
        vm.run(f"head -c 32 /dev/urandom | sha256sum > {MARKER_PATH}", check=True)
        vm.run(f"(i=0; while :; do i=$((i+1)); echo $i > {COUNTER_PATH}.new; mv {COUNTER_PATH}.new {COUNTER_PATH}; "
               f"sleep 0.1; done) >/dev/null 2>&1 </dev/null & echo $! > {COUNTER_PATH}.pid", check=True)
        # Until its first count is written, a read would find no counter (a full lab run read the
        # pid as the count, and called it a broken continuity); the file is replaced atomically after.
        vm.run(f"n=0; while [ ! -s {COUNTER_PATH} ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; "
               f"test -s {COUNTER_PATH}", check=True)

    @classmethod
    def read(cls, vm: VM, rescan: bool = False) -> "GuestState":
        """The state now. ``rescan``: let the guest rescan its PCI bus first, so a function the
        new QEMU has and the guest was not told about shows in its lspci (after a move)."""
        if rescan:
            vm.run("echo 1 > /sys/bus/pci/rescan", check=True)
        # &&: a file that is missing fails the read, rather than shifting the lines that follow.
        out = vm.run(f"cut -d' ' -f1 /proc/uptime && cat {MARKER_PATH} && cat {COUNTER_PATH} && cat {COUNTER_PATH}.pid",
                     check=True).stdout.split("\n")
        lspci = tuple(vm.run("lspci -n", check=True).stdout.splitlines())
        return cls(float(out[0]), out[1], int(out[2]), out[3].strip(), lspci, MachineState.read(vm))

    def differences(self, after: "GuestState") -> list[str]:
        """What the guest or its QEMU shows differently after; empty means continuity held."""
        problems = []
        if after.uptime <= self.uptime:
            problems.append(f"uptime went from {self.uptime} s to {after.uptime} s: the guest rebooted")
        if after.marker != self.marker:
            problems.append(f"the RAM marker changed from {self.marker!r} to {after.marker!r}")
        if after.counter_pid != self.counter_pid:
            problems.append(f"the counting process changed pid ({self.counter_pid} -> {after.counter_pid})")
        if after.counter <= self.counter:
            problems.append(f"the counting process stopped at {after.counter} (was {self.counter})")
        problems += _added_removed("the guest's PCI functions (lspci -n)", self.lspci, after.lspci)
        return problems + self.machine.differences(after.machine)


def continuity_problems(before: GuestState, after_vm: VM) -> list[str]:
    """What the guest on ``after_vm`` (or its QEMU) shows differently from ``before``, once
    its counter ticked there; the guest rescans its PCI bus first."""
    poll(lambda: (v := after_vm.run(f"cat {COUNTER_PATH}").stdout.strip()).isdigit() and int(v) > before.counter,
         5, 0.2)
    return before.differences(GuestState.read(after_vm, rescan=True))


class Dirtier:
    """A guest process rewriting a small set of its RAM (a tmpfs file) with changing content,
    as fast as the guest can, counting what it wrote: the rate is measured in the guest.

    The set is small on purpose: a migration pass over it is short even on a slow link, and
    every pass finds all of it dirty again as long as the guest writes faster than the link.
    The count goes to the serial console, which the host reads from a file: a guest SSH
    session can stall for tens of seconds on a busy nested host while a migration runs.
    """

    SET_MIB = 4
    _COUNT = re.compile(r"kvmcheck-dirtied (\d+)\r?\n")

    def __init__(self, vm: VM):
        self.vm = vm
        n = self.SET_MIB * 1024 * 1024
        vm.run(f"head -c {n} /dev/urandom > /tmp/dirty.a && head -c {n} /dev/urandom > /tmp/dirty.b && "
               f"cp /tmp/dirty.a /tmp/dirty", check=True)
        vm.run("(n=0; while :; do for f in a b; do dd if=/tmp/dirty.$f of=/tmp/dirty bs=1M conv=notrunc 2>/dev/null;"
               " done; n=$((n+2)); echo kvmcheck-dirtied $n > /dev/ttyS0; done) >/dev/null 2>&1 </dev/null &",
               check=True)

    def count(self) -> int:
        """How many times the guest has rewritten the set so far (0 before the first)."""
        counts = self._COUNT.findall(self.vm.console()[-4096:])
        return int(counts[-1]) if counts else 0


class DiskWriter:
    """A guest process writing a rising count to one sector of a disk, synced each time, and
    recording the last count it completed: writes made while the guest moves must arrive."""

    SECTOR = 16384  # 8 MiB into the disk
    DONE = "/tmp/kvmcheck-written"

    def __init__(self, vm: VM, device: str):
        self.device = device
        self.pid = vm.guest.start(
            # Through a descriptor opened once: should the device node go (a disk unplugged), dd
            # must fail, not create a regular file of that name and report the write done.
            f"exec 3<>{device}; i=0; while :; do i=$((i+1)); printf '%-511s\\n' $i | dd of=/proc/self/fd/3 bs=512 "
            f"seek={self.SECTOR} conv=notrunc,fsync 2>/dev/null && echo $i > {self.DONE}.new && "
            f"mv {self.DONE}.new {self.DONE}; "
            f"sleep 0.05; done")

    def completed(self, vm: VM) -> int:
        """The last count the writer finished writing, as the guest on ``vm`` shows it."""
        return int(vm.guest.read(self.DONE))

    def on_disk(self, vm: VM) -> int:
        """The count in the sector now."""
        return int(BlockDevice(vm.guest, self.device.removeprefix("/dev/")).read_sector(self.SECTOR).split()[0])

    def stop(self, vm: VM) -> bool:
        """Stop it (on whichever VM the guest now runs); False if it was not running there."""
        if not vm.guest.stop(self.pid):
            return False
        return bool(poll(lambda: not vm.guest.running(self.pid), 5, 0.1))


def guest_pause(source: VM, dest: VM, source_clock: Offset, dest_clock: Offset) -> Offset:
    """How long the guest stood still in the move just completed: from its STOP on the source
    (the last before it ran on the destination) to its RESUME on the destination, each QMP
    event's time put on this machine's clock by its host's offset (``source_clock``,
    ``dest_clock``: :func:`~pytest_kvmcheck.clock.measure_offset` of each host's clock).

    QEMU's ``downtime`` is the source's measure, not this: what the destination does after the
    stream, before the guest runs there, is not in it."""
    resumes = dest.qmp.events("RESUME")
    if not resumes:
        raise VMError(f"VM {dest.name}: no RESUME event: the guest has not run on the destination")
    resumed = event_time(resumes[0]) - dest_clock.seconds
    stops = [t for t in (event_time(e) - source_clock.seconds for e in source.qmp.events("STOP")) if t <= resumed]
    if not stops:
        raise VMError(f"VM {source.name}: no STOP event before the guest resumed on {dest.name}")
    return Offset(resumed - max(stops), source_clock.uncertainty + dest_clock.uncertainty)


def stats(info: dict) -> dict:
    """The numbers reports carry: total time, downtime, bytes moved."""
    ram = info.get("ram", {})
    return {"total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"), "transferred_bytes": ram.get("transferred"),
            "mbps": ram.get("mbps"), "dirty_sync_count": ram.get("dirty-sync-count"),
            "multifd_bytes": ram.get("multifd-bytes"), "postcopy_requests": ram.get("postcopy-requests"), "statuses": info.get("statuses")}
