"""Handbook ch. 4, migration: moving a running guest without the guest noticing.

Live migration with shared storage (4.3.3): the destination is started from the source's
own spec with ``-incoming`` and sees the same disk images; ``migrate tcp:DEST:PORT`` moves
the guest. Static migration (4.1): ``savevm TAG``, stop, ``loadvm TAG`` in a new QEMU; and
migrate-to-file with a restore from it. After each, the guest must show continuity: uptime
kept rising, a RAM marker unchanged, a counting process still counting, the same PCI
devices and balloon target, disk data intact. The handbook's ``migrate -b`` (block
migration) was removed in QEMU 9.1; its replacement is a block mirror to an NBD export.

The destination is ``kvm_peer``: the next host given in --kvm-hosts, or the same host when
only one is given. Before anything moves, the seed's checks (4.3.2) run: QEMU version,
machine type, CPU (NX, long mode, and every flag under KVM), the images at the same path.
"""
import contextlib
import hashlib
import os
import secrets
import time

import pytest

from pytest_kvmcheck import Disk, Nic, VMSpec, premise, wait_until
from pytest_kvmcheck.errors import (KvmCheckError, EventTimeout, MigrationDidNotConverge, MigrationFailed, QMPCommandError,
                                     QMPLost, VMError)
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.hosts.settings import HostLock, SysfsSettings
from pytest_kvmcheck.qemu.hotplug import plug_disk
from pytest_kvmcheck.waiting import poll
from pytest_kvmcheck.qemu.legacy import describe, form
from pytest_kvmcheck.qemu.netperf import NetProbe, Streaming
from pytest_kvmcheck.qemu.migration import (MARKER_PATH, UNLIMITED_BANDWIDTH, Dirtier, DiskWriter, GuestState,
                                            await_migration, continuity_problems,
                                            cancel_in, export_disks, finish_mirrors, layout_mismatch, listen,
                                            measure_throughput, migrate, migrate_to_state, mirror_disks,
                                            pause_postcopy, place_base_image, preflight, recover_postcopy,
                                            start_migration,
                                            stats, unanswered_port)

SPEC = VMSpec(memory_mib=256, balloon=True, disks=(Disk(size_mib=32, serial="migrate0"),))
DIRTY_LINK_MIB = 32  # at most; a slower guest gets a slower link
MIN_LINK_MIB = 0.25
DIRTY_MARGIN = 4  # the guest must rewrite at least this many times what the link sends
PASSES = 4  # passes over the dirty set, without converging, that show plain precopy cannot finish
FIRST_PASS_S = 90  # bound for the first pass over the guest's RAM, at FIRST_PASS_BANDWIDTH
RATE_WINDOW_S = 1.5  # at least this long a window to measure the guest's rate in
FIRST_PASS_BANDWIDTH = 64 * MIB  # fast enough for a short first pass, slow enough that the guest keeps dirtying
BALLOON_GIVEN_MIB = 32  # what the balloon takes from the guest: a non-default target, so "unchanged" means something
# (a small one: a nested guest inflates about 40 MiB a second, and every migration test sets it)


# Beyond the seed: how the stream is sent. Each needs a capability on both QEMUs.
MODES = {"precopy": (), "multifd": ("multifd",), "postcopy": ("postcopy-ram",)}
MODE_NEEDS = {"multifd": "multifd", "postcopy": "postcopy"}
MODE_PARAMS = [pytest.param(mode, id=mode, marks=[pytest.mark.kvm_requires(MODE_NEEDS[mode]),
                                                    pytest.mark.kvm_requires(MODE_NEEDS[mode], on="peer")])
               if mode in MODE_NEEDS else mode for mode in MODES]
shared_storage = pytest.mark.kvm_requires("shared-storage", on="peer")


def downtime_bound(config, *hosts) -> tuple[int, str]:
    """The downtime a migration between these hosts may take, and whose bound it is: the
    loosest a host's spec sets (``max_downtime_ms=``: a slow host, like the lab's emulated
    CPUs), else the ini's ``kvm_max_downtime_ms``."""
    own = [(h.spec.max_downtime_ms, f"host {h.name}'s max_downtime_ms") for h in hosts if h.spec.max_downtime_ms]
    return max(own) if own else (int(config.getini("kvm_max_downtime_ms")), "kvm_max_downtime_ms")


DISK_SHA = "/tmp/disk.sha"  # in guest RAM: what the source wrote to its disk, read back wherever the guest runs


def balloon_target(vm) -> int:
    """The balloon's target for ``vm``, in bytes: BALLOON_GIVEN_MIB below its RAM."""
    return (vm.spec.memory_mib - BALLOON_GIVEN_MIB) * MIB


def set_balloon(vm, timeout: float = 60.0) -> None:
    """The guest's balloon at its target: what a migration must carry over. Setting it is the
    test's preparation, not the check (the balloon suite checks inflation): a guest too busy to
    inflate in time (a loaded lab once had 400 of 384 MiB after 20 s) is an ERROR, not the host's FAIL."""
    target = balloon_target(vm)
    vm.qmp.cmd("balloon", value=target)
    settled = poll(lambda: vm.qmp.cmd("query-balloon")["actual"] == target, timeout, 0.2)
    premise(settled, f"the balloon at {target // MIB} MiB before the move: {vm.qmp.cmd('query-balloon')['actual'] // MIB} "
                     f"MiB after {timeout:.0f} s")


@pytest.fixture
def running_source(boot_vm):
    """A guest with disk data, a RAM marker, a counting process and a ballooned target."""
    vm = boot_vm(SPEC)
    vm.guest.write(DISK_SHA, vm.guest.block_device("migrate0").write_pattern(2))
    set_balloon(vm)
    GuestState.prepare(vm)
    return vm


@pytest.fixture
def peer(running_source, kvm_host, kvm_peer):
    """The destination host, once the seed's pre-flight checks pass for this guest: any
    problem fails, naming it, before anything moves (shared storage is the tests' declared need)."""
    problems = preflight(running_source, kvm_host.caps, kvm_peer.caps, kvm_peer.transport.exists)
    assert not problems, f"pre-flight {kvm_host.name} -> {kvm_peer.name}: " + "; ".join(
        f"{k}: {v}" for k, v in problems.items())
    return kvm_peer


def assert_continuity(before: GuestState, after_vm) -> None:
    problems = continuity_problems(before, after_vm)
    written = after_vm.guest.read(DISK_SHA).strip()
    read = after_vm.guest.block_device("migrate0").checksum(2)
    if read != written:
        problems.append(f"disk data changed: wrote sha256 {written}, read {read}")
    assert not problems, "continuity broken:\n" + "\n".join(problems)


def status(vm) -> str:
    return vm.qmp.cmd("query-status")["status"]


def incoming_fate(dest) -> str:
    """Where a destination QEMU stands: 'exited', or its run state and its incoming migration's status."""
    try:
        return f"{status(dest)}, incoming {dest.qmp.cmd('query-migrate').get('status')}" if dest.alive() else "exited"
    except QMPLost:
        return "exited"


@shared_storage
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_live_migration_shared_storage(running_source, peer, boot_vm, kvm_host, kvm_note, kvm_metric, request, mode):
    """Handbook 4.3.3: live migration with shared storage (``migrate tcp:DEST:PORT``), in each mode:
    the guest runs on the destination with its RAM, processes, devices and disk data intact,
    within the downtime bound."""
    source = running_source
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, peer, MODES[mode])
    limit = source.qmp.cmd("query-migrate-parameters")["downtime-limit"]  # the host's own, as a manager finds it
    info = migrate(source, uri, timeout=120, capabilities=MODES[mode], destination=dest)
    numbers = stats(info)
    kvm_note("migration", f"{kvm_host.name} -> {peer.name} ({mode}) over {uri}, QEMU's downtime-limit "
                          f"{limit} ms: {numbers}")
    kvm_metric("migration_total_time", numbers["total_time_ms"], "ms")
    kvm_metric("migration_downtime", numbers["downtime_ms"], "ms")
    kvm_metric("migration_throughput", numbers["mbps"] or 0, "Mbit/s", "higher")
    assert status(source) == "postmigrate"
    assert status(dest) == "running"
    assert ("postcopy-active" in info["statuses"]) == (mode == "postcopy"), f"{mode}: went through {info['statuses']}"
    assert bool(numbers["multifd_bytes"]) == (mode == "multifd"), f"{mode}: multifd sent {numbers['multifd_bytes']} bytes"
    assert_continuity(before, dest)
    bound, whose = downtime_bound(request.config, kvm_host, peer)
    assert numbers["downtime_ms"] <= bound, \
        f"downtime {numbers['downtime_ms']} ms exceeds {bound} ms ({whose}; QEMU's downtime-limit {limit} ms; {numbers})"


@pytest.mark.kvm_requires("bridge")
@pytest.mark.kvm_requires("bridge", on="peer")
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_guest_session_survives_live_migration(boot_vm, kvm_host, kvm_peer, mode, kvm_note):
    """Handbook 4.3: an SSH session opened to the guest's bridged address before the move works after it.

    The session goes from the source host to the guest over the bridge, not through QEMU,
    so only the guest moving with its network identity (same MAC, QEMU's announcement
    after the switch-over) keeps it alive. The source QEMU is stopped before the check.
    """
    source = boot_vm(VMSpec(memory_mib=256, nics=(Nic(), Nic(bridged=True))))
    address = source.bring_up_bridged(1, kvm_host.caps.bridge_cidr)
    session = source.session_to(address)
    try:
        shell_pid = session.run("echo $$", check=True).stdout.strip()
        GuestState.prepare(source)
        before = GuestState.read(source)
        dest, uri = boot_vm.destination(source, kvm_peer, MODES[mode])
        info = migrate(source, uri, timeout=120, capabilities=MODES[mode], destination=dest)
        source.stop()
        kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} ({mode}), session to {address}: {stats(info)}")
        after = session.run(f"echo $$; cat {MARKER_PATH}", timeout=30)
        assert after.ok, f"the session opened before the migration broke: {after}"
        pid, marker = after.stdout.split("\n")[:2]
        assert pid == shell_pid, f"not the same shell: pid {shell_pid} before, {pid} after"
        assert marker == before.marker, "the session sees another guest's RAM marker"
        problems = continuity_problems(before, dest)
        assert not problems, "continuity broken:\n" + "\n".join(problems)
    finally:
        session.close()


def test_live_migration_same_backing_image(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 4.3.4: both hosts hold the same base image and the guest runs on an overlay.

    No shared storage: the destination gets an empty overlay of its own and the source's
    overlay travels by a block mirror to an NBD export there (what replaced ``migrate -b``),
    in write-blocking mode, so data written while the guest moves arrives too.
    """
    base_data = os.urandom(MIB)
    bases = [place_base_image(h.transport, f"{h.run_dir}/shared", base_data, 32) for h in (kvm_host, kvm_peer)]
    tag = secrets.token_hex(3)
    overlay = kvm_host.transport.qemu_img.create(f"{kvm_host.run_dir}/shared/src-{tag}.qcow2", backing=bases[0],
                                                 backing_fmt="raw")
    source = boot_vm(VMSpec(memory_mib=256, disks=(Disk(path=overlay, serial="mirror0"),)))
    disk = source.guest.block_device("mirror0")
    sha_base = disk.checksum(1)
    assert sha_base == hashlib.sha256(base_data).hexdigest(), "the guest does not see the base image through its overlay"
    sha_overlay = disk.write_pattern(2, offset_mib=4)
    writer = DiskWriter(source, disk.path)  # keeps writing while the guest moves
    GuestState.prepare(source)
    before = GuestState.read(source)

    dest_overlay = kvm_peer.transport.qemu_img.create(f"{kvm_peer.run_dir}/shared/dst-{tag}.qcow2", backing=bases[1],
                                                      backing_fmt="raw")
    dest, uri = boot_vm.destination(source, kvm_peer, disk_paths=(dest_overlay,))
    address = kvm_peer.spec.migration_address
    port = export_disks(dest, address)
    mirror_disks(source, address, port)
    written_before = writer.completed(source)
    info = migrate(source, uri, timeout=120, destination=dest, before_switchover=lambda: finish_mirrors(source))
    dest.qmp.cmd("nbd-server-stop")
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} (same backing image, mirror to nbd:{address}:{port})"
                          f": {stats(info)}")
    assert status(source) == "postmigrate"
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)

    # The writer moved with the guest: stop it there, so the counts below are final.
    assert writer.stop(dest), f"the disk writer (pid {writer.pid}) is not running on the destination"
    moved = dest.guest.block_device("mirror0")
    assert moved.checksum(1) == sha_base, "the base image's data changed on the destination"
    assert moved.checksum(2, offset_mib=4) == sha_overlay, \
        "data written to the overlay before the migration is not on the destination"
    written, on_disk = writer.completed(dest), writer.on_disk(dest)
    assert written > written_before, "the writer did not write while the guest moved"
    assert on_disk >= written, f"the disk holds write {on_disk}, the guest last completed {written}: writes were lost"
    allocated = kvm_peer.transport.qemu_img.allocated_bytes(dest_overlay)
    assert allocated >= 2 * MIB, f"the destination's own overlay holds only {allocated} bytes: nothing was copied"


@shared_storage
def test_static_migration_savevm_loadvm(running_source, peer, boot_vm):
    """Handbook 4.1: ``savevm TAG``, stop, ``loadvm TAG`` in a new QEMU (``-loadvm``): the guest carries on."""
    source = running_source
    before = GuestState.read(source)
    out = source.qmp.hmp("savevm kvmcheck-static", timeout=120)  # all guest RAM, written before it answers
    assert "Error" not in out, f"savevm failed: {out}"
    snapshots = source.qmp.hmp("info snapshots")
    assert "kvmcheck-static" in snapshots, f"savevm left no snapshot:\n{snapshots}"
    source.stop()
    restored = boot_vm.start(boot_vm.successor(source, peer, "-loadvm", "kvmcheck-static"))
    assert status(restored) == "running"
    assert_continuity(before, restored)


@shared_storage
def test_static_migration_to_file(running_source, peer, boot_vm):
    """Handbook 4.1: migrate to a file, stop, restore from it (``-incoming exec:``): the guest carries on."""
    source = running_source
    state_file = source.path("state.bin")
    before = GuestState.read(source)
    migrate(source, f"exec:cat > {state_file}", timeout=120)
    assert status(source) == "postmigrate"
    source.stop()
    restored = boot_vm.start(boot_vm.successor(source, peer, "-incoming", f"exec:cat {state_file}"))
    wait_until(lambda: status(restored), 30, "the restored guest running", done=lambda s: s == "running")
    assert_continuity(before, restored)


def test_handbook_block_migration(kvm_host, kvm_note):
    """Handbook 4.3.4: ``migrate -b``: deprecated in 8.2, removed in 9.1; blockdev-mirror + NBD replaces it.

    The host's QEMU schema must agree with the table: a ``blk`` argument to ``migrate``
    exactly when the table says block migration is not yet removed.
    """
    row = form("migrate -b tcp:HOST:PORT")
    kvm_note("handbook", describe(row))
    arguments = kvm_host.qmp_arguments("migrate")
    assert "uri" in arguments, f"QMP migrate without a uri argument? {sorted(arguments)}"
    removed = row.removed_in(kvm_host.caps.qemu_version)
    assert ("blk" not in arguments) == removed, \
        f"QEMU {kvm_host.caps.qemu_version_text}: migrate arguments {sorted(arguments)}; the table says block " \
        f"migration is {'removed' if removed else 'still there'}"
    mirror = kvm_host.qmp_arguments("blockdev-mirror")
    assert {"device", "target", "sync"} <= mirror, f"blockdev-mirror lacks what replaces migrate -b: {sorted(mirror)}"


# --------------------------------------------------------------------------- a production guest

# What production guests have, beyond the seed's: vCPUs, a ballooned target, a NIC and a disk
# plugged while it ran, and load; network load over the host's bridge (the guest's bridged
# address moves with it), with vhost-net where both hosts offer it.
PRODUCTION = VMSpec(memory_mib=512, smp=2, balloon=True, disks=(Disk(size_mib=32, serial="prod0"),))
LOADS = {"disk-load": (), "network-load": ("bridge",), "network-load-vhost": ("bridge", "vhost-net")}
LOAD_PARAMS = [pytest.param(load, id=load, marks=[m for need in needs for m in (
    pytest.mark.kvm_requires(need), pytest.mark.kvm_requires(need, on="peer"))]) for load, needs in LOADS.items()]
STREAM_S = 12  # the network load's length: it spans the whole move


@shared_storage
@pytest.mark.parametrize("load", LOAD_PARAMS)
def test_production_guest_moves_under_load(boot_vm, kvm_host, kvm_peer, load, kvm_note):
    """Handbook 3 and 4.3 together, as a production guest has them: two vCPUs, a ballooned
    target, a NIC and a disk hot-plugged while it ran, a process writing its disk (synced)
    and, over the host's bridge, a TCP stream from the host. After a live migration to a
    destination started with the plugged devices: the same machine (QEMU's devices, vCPUs,
    balloon), the guest's RAM and processes intact, the writer still writing with no completed
    write lost, and the stream completed without a break."""
    network = load != "disk-load"
    spec = PRODUCTION.with_(nics=(Nic(), Nic(bridged=True, vhost=load.endswith("vhost"))) if network else (Nic(),))
    source = boot_vm(spec)
    source.qmp.cmd("balloon", value=balloon_target(source))
    plugged = plug_disk(source, kvm_host.transport.qemu_img.create(source.path("plugged.qcow2"), 16), "prodhp",
                        addr="0x10")
    source.qmp.cmd("netdev_add", type="user", id="prodnet", net="10.0.9.0/24", restrict=True)
    source.qmp.cmd("device_add", driver="virtio-net-pci", id="prodnic", netdev="prodnet", mac="52:54:00:9a:00:01",
                   addr="0x11")
    written = plugged.disk.write_pattern(1)
    set_balloon(source)
    cpus = source.run(["nproc"], check=True).stdout.strip()
    writer = DiskWriter(source, source.guest.block_device("prod0").path)
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest = boot_vm.start(boot_vm.successor(
        source, kvm_peer, "-incoming", "defer", *plugged.argv(),
        "-netdev", "user,id=prodnet,net=10.0.9.0/24,restrict=on",
        "-device", "virtio-net-pci,netdev=prodnet,id=prodnic,mac=52:54:00:9a:00:01,addr=0x11"))
    uri = listen(dest, kvm_peer.spec.migration_address)
    stream = None
    if network:
        address = source.bring_up_bridged(1, kvm_host.caps.bridge_cidr)
        probe = NetProbe(source, kvm_host.transport, kvm_host.host_run.net_probe)
        probe.wait_ready(address)
        stream = Streaming(probe, address, STREAM_S)
    written_before = writer.completed(source)
    info = migrate(source, uri, timeout=120, destination=dest)
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} ({load}): {stats(info)}")
    problems = continuity_problems(before, dest)
    if dest.run(["nproc"], check=True).stdout.strip() != cpus:
        problems.append(f"the guest saw {cpus} CPUs before the move and {dest.run(['nproc']).stdout.strip()} after")
    if dest.guest.block_device("prodhp").checksum(1) != written:
        problems.append("the hot-plugged disk reads back other data on the destination")
    assert writer.stop(dest), f"the disk writer (pid {writer.pid}) is not running on the destination"
    done, on_disk = writer.completed(dest), writer.on_disk(dest)
    if done <= written_before:
        problems.append("the disk writer did not write while the guest moved")
    if on_disk < done:
        problems.append(f"the disk holds write {on_disk}, the guest last completed {done}: writes were lost")
    if stream is not None:
        try:
            sent, seconds = stream.result()
            kvm_note("network-load", f"the host streamed {sent / MIB:.1f} MiB to the guest in {seconds:.1f} s "
                                     "across the move")
            if sent <= 0:
                problems.append("the host's stream to the guest delivered nothing")
        except KvmCheckError as exc:
            problems.append(f"the host's stream to the guest broke across the move: {exc}")
    crash = dest.kernel_crash_report() if problems else ""
    if crash:
        problems.append(crash)
    assert not problems, f"the production guest after the move ({load}):\n" + "\n".join(problems)


HUGE_PAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB"
HUGE_GUEST_MIB = 256
HUGE_GUEST = VMSpec(memory_mib=HUGE_GUEST_MIB, extra_args=(
    "-object", f"memory-backend-memfd,id=kvmcheck-ram,size={HUGE_GUEST_MIB}M,hugetlb=on,hugetlbsize=2M",
    "-machine", "memory-backend=kvmcheck-ram"))


@pytest.fixture
def huge_pages(kvm_host, kvm_peer):
    """2 MiB pages reserved on the host and its peer for a guest on each, as production hosts
    set them aside for guests; given back after (one test at a time changes the reserve).
    The reserve is the kernel's: a host that is its own peer, or two hosts on one kernel (network
    namespaces of one machine), reserve once for both guests and take its lock once."""
    guests = {}  # boot id -> [a host on that kernel, the guests it will hold]
    for host in (kvm_host, kvm_peer):
        guests.setdefault(host.caps.boot_id or host.name, [host, 0])[1] += 1
    reserves = []
    # Both kernels' reserves, locked in one order: the peer's test changes this host's reserve too.
    with contextlib.ExitStack() as locks:
        for kernel in sorted(guests):
            locks.enter_context(HostLock(guests[kernel][0].transport, "hugepages"))
        try:
            for host, count in guests.values():
                reserve = SysfsSettings(host.transport, HUGE_PAGES, ("nr_hugepages",))
                reserves.append((host, reserve))
                wanted = int(reserve.original["nr_hugepages"]) + count * HUGE_GUEST_MIB // 2
                reserve.write("nr_hugepages", wanted)
                premise(reserve.read_int("nr_hugepages") >= wanted,
                        f"host {host.name}: the kernel reserved {reserve.read('nr_hugepages')} of {wanted} huge "
                        "pages (2 MiB): not enough free contiguous memory")
            yield
        finally:
            left = {host.name: reserve.restore() for host, reserve in reserves}
    assert not any(left.values()), f"could not give the huge pages back (original, now): {left}"


@pytest.mark.kvm_changes_host
@pytest.mark.kvm_requires("allow_host_changes", on="peer")
def test_guest_in_huge_pages_moves(huge_pages, boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 4.3 for a guest whose RAM is in 2 MiB huge pages (a hugetlb memory backend):
    the RAM is in huge pages on both sides, and the guest moves with its RAM and processes."""
    source = boot_vm(HUGE_GUEST)
    assert source.process.hugetlb_kib() >= HUGE_GUEST_MIB * 1024, \
        f"the source's guest RAM is not in huge pages: {source.process.hugetlb_kib()} KiB of {HUGE_GUEST_MIB} MiB"
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, kvm_peer)
    info = migrate(source, uri, timeout=120, destination=dest)
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name}, {HUGE_GUEST_MIB} MiB in 2 MiB pages: {stats(info)}")
    held = dest.process.hugetlb_kib()
    assert held >= HUGE_GUEST_MIB * 1024, \
        f"on the destination the guest RAM is not in huge pages: {held} KiB of {HUGE_GUEST_MIB} MiB"
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- cancelled on the way

# Each state a migration passes through that a manager can cancel in, and how it is held there.
# Not "device": QEMU holds its big lock while it sends the devices' state after the switch-over,
# so no monitor command, migrate_cancel included, is served until it ends.
CANCEL_STATES = {
    "setup": "the connect to the destination stays unanswered (a loopback port with a full accept queue)",
    "active": "the link is held at 1 MiB/s, the guest's 256 MiB take minutes",
    "pre-switchover": "pause-before-switchover: QEMU stops the guest and waits before the switch-over",
}
CANCEL_LINK = MIB  # bytes/s
CONNECT_GIVES_UP_S = 70  # a connect refused on its next SYN: Linux retransmits at 1, 3, 7, 15, 31, 63 s


@pytest.mark.parametrize("state", list(CANCEL_STATES))
def test_cancelled_migration_leaves_the_source_running(boot_vm, kvm_host, kvm_peer, state, kvm_note):
    """Handbook 4.3 (``migrate_cancel``): a migration cancelled in each state QEMU passes
    through leaves the guest running on the source with its RAM, processes and devices; the
    destination QEMU gives up (exits, or reports the incoming migration failed); and a second
    migration, to a fresh destination, succeeds. Each state is held by what keeps QEMU there
    (CANCEL_STATES), not reached by sleeping.

    In setup QEMU may finish the cancel only once its connect attempt ends: 7.2 stays in
    cancelling, 10.0 says cancelled but refuses a new migration ("duplicate yank instance").
    The port is then closed, so the attempt ends at its next SYN; the delay is noted for the
    reviewer, and bounded."""
    source = boot_vm(VMSpec(memory_mib=256))
    GuestState.prepare(source)
    before = GuestState.read(source)
    kvm_note("held", CANCEL_STATES[state])
    dest = None
    if state == "setup":
        with unanswered_port(kvm_host.transport, kvm_host.host_run.net_probe, kvm_host.run_dir) as port:
            cancelled = cancel_in(source, f"tcp:127.0.0.1:{port}", state, settle=1)
    else:
        dest, uri = boot_vm.destination(source, kvm_peer)
        cancelled = cancel_in(source, uri, state, bandwidth_bytes=CANCEL_LINK if state == "active" else None)
    assert not cancelled.refused, f"QEMU refused migrate_cancel in {state}: {cancelled.refused}"
    started = time.monotonic()
    final = wait_until(lambda: source.qmp.cmd("query-migrate").get("status"), CONNECT_GIVES_UP_S,
                       f"the migration cancelled in {state} ending", done=lambda s: s not in ("cancelling", state))
    waited = f"; it ended {time.monotonic() - started:.1f} s after the connect attempt was refused" \
        if cancelled.final == "cancelling" else ""
    kvm_note("cancel", f"in {state}: the source went through {list(cancelled.statuses)}, ends {final}{waited}")
    assert final == "cancelled", f"cancelled in {state}, the migration ended {final}"
    wait_until(lambda: status(source), 10, f"the source guest running after a cancel in {state}",
               done=lambda s: s == "running")
    problems = continuity_problems(before, source)
    assert not problems, f"after a cancel in {state} the source guest is not as it was:\n" + "\n".join(problems)
    if dest is not None:
        gave_up = wait_until(lambda: incoming_fate(dest), 30,
                             f"the destination {dest.name} giving up the cancelled migration",
                             done=lambda s: s == "exited" or s.endswith("incoming failed"))
        kvm_note("destination", f"{dest.name}: {gave_up}")
    after = GuestState.read(source)
    fresh, uri = boot_vm.destination(source, kvm_peer)
    started, refusals = time.monotonic(), []
    while True:  # QEMU 10.0 refuses a new migration while the abandoned connect is pending
        try:
            info = migrate(source, uri, timeout=120, destination=fresh)
            break
        except QMPCommandError as exc:
            if "duplicate yank instance" not in exc.desc or time.monotonic() - started > CONNECT_GIVES_UP_S:
                raise
            refusals.append(exc.desc)
            # The refused migrate sits in setup a moment before it reads failed: only then is another taken.
            wait_until(lambda: source.qmp.cmd("query-migrate").get("status"), 10, "the refused migration ending",
                       done=lambda s: s not in ("setup", "cancelling"))
            time.sleep(0.5)
    refused = f" (refused for {time.monotonic() - started:.1f} s before: {refusals[0]})" if refusals else ""
    kvm_note("again", f"to a fresh destination {fresh.name}{refused}: {stats(info)}")
    problems = continuity_problems(after, fresh)
    assert not problems, f"the migration after a cancel in {state} broke continuity:\n" + "\n".join(problems)


@pytest.mark.kvm_requires("postcopy")
@pytest.mark.kvm_requires("postcopy", on="peer")
def test_cancel_in_postcopy_never_runs_two_guests(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 4.3 with postcopy: once the guest runs on the destination, the source's RAM is
    stale; a cancel there must not resume the source (two copies of one guest, on one disk).
    QEMU either refuses the cancel (the migration then completes, the guest intact) or takes
    it and leaves the source stopped; the note says which, and where the guest is left."""
    source = boot_vm(VMSpec(memory_mib=256))
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, kvm_peer, ("postcopy-ram",))
    cancelled = cancel_in(source, uri, "postcopy-active", ("postcopy-ram",), bandwidth_bytes=CANCEL_LINK)
    if cancelled.refused:
        kvm_note("cancel", f"refused in postcopy-active: {cancelled.refused}")
        wait_until(lambda: status(dest), 120, "the guest running on the destination once postcopy completes",
                   done=lambda s: s == "running")
        problems = continuity_problems(before, dest)
        assert not problems, "continuity broken after a refused cancel in postcopy:\n" + "\n".join(problems)
        return
    again = resumed(source)  # the cancel has ended (cancel_in waits): a resume would follow at once
    source_state = status(source)
    fate = incoming_fate(dest)
    kvm_note("cancel", f"taken in postcopy-active: the source went through {list(cancelled.statuses)} and is "
                       f"{source_state}; the destination is {fate}: the guest is lost (QEMU's documented behaviour)")
    assert source_state != "running" and not again, \
        f"a cancel in postcopy-active resumed the source guest while it ran on the destination ({fate}): " \
        "two copies of one guest"


# --------------------------------------------------------------------------- postcopy, interrupted

POSTCOPY = ("postcopy-ram",)
FILL_SHA = "/tmp/fill.sha256"


def postcopy_source(boot_vm):
    """A guest with RAM worth moving after the switch (64 MiB not zero, its checksum kept) and a counter."""
    source = boot_vm(VMSpec(memory_mib=256))
    source.run(f"yes kvmcheck | head -c {64 * MIB} > /tmp/fill && sha256sum /tmp/fill > {FILL_SHA}", check=True, timeout=120)
    GuestState.prepare(source)
    return source


def resumed(vm, window: float = 2.0) -> bool:
    """Whether QEMU resumes ``vm``'s guest within ``window`` s (a resume follows a migration's end at once)."""
    try:
        vm.qmp.wait_event("RESUME", timeout=window)
        return True
    except EventTimeout:
        return False


@pytest.mark.kvm_requires("postcopy")
@pytest.mark.kvm_requires("postcopy", on="peer")
def test_postcopy_recovers_from_a_broken_stream(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 4.3 with postcopy: the stream breaks while the guest runs on the destination
    and its RAM still moves (the destination shuts its end: ``migrate-pause``). Both sides
    must wait in postcopy-paused; ``migrate-recover`` on a new channel and ``migrate
    resume=true`` finish the move, the guest's RAM and processes intact. The destination is
    spoken to out of band meanwhile: its main thread may wait for a page that is not there."""
    source = postcopy_source(boot_vm)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, kvm_peer, POSTCOPY)
    migrate_to_state(source, uri, "postcopy-active", POSTCOPY, bandwidth_bytes=CANCEL_LINK)
    pause_postcopy(dest)
    wait_until(lambda: source.qmp.cmd("query-migrate").get("status"), 30, f"{source.name} waiting in postcopy-paused",
               done=lambda s: s == "postcopy-paused")
    info = recover_postcopy(source, dest, kvm_peer.spec.migration_address)
    kvm_note("recovery", f"{kvm_host.name} -> {kvm_peer.name}: broken in postcopy-active, recovered: {stats(info)}")
    assert "postcopy-recover" in info["statuses"], f"the source never recovered: went through {info['statuses']}"
    assert status(dest) == "running"
    problems = continuity_problems(before, dest)
    checked = dest.run(["sha256sum", "-c", FILL_SHA])
    if not checked.ok:
        problems.append(f"64 MiB the guest wrote before the move read back different: {checked.stdout.strip()}")
    assert not problems, "continuity broken across the recovered postcopy:\n" + "\n".join(problems)


@pytest.mark.kvm_requires("postcopy")
@pytest.mark.kvm_requires("postcopy", on="peer")
def test_destination_lost_in_postcopy_fails_and_names_the_guests_fate(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 4.3 with postcopy: the destination QEMU dies while the guest runs there. Its
    newest pages died with it: the migration must fail saying the guest is lost, and the
    source must not run its stale copy (QEMU keeps it in postcopy-paused)."""
    source = postcopy_source(boot_vm)
    dest, uri = boot_vm.destination(source, kvm_peer, POSTCOPY)
    migrate_to_state(source, uri, "postcopy-active", POSTCOPY, bandwidth_bytes=CANCEL_LINK)
    kvm_peer.transport.kill(dest.pid, "KILL")
    with pytest.raises(MigrationFailed) as failed:
        await_migration(source, uri, 60, destination=dest)
    kvm_note("failure", str(failed.value))
    again = resumed(source)
    state = status(source)
    assert state != "running" and not again, \
        f"the destination died in postcopy and the source runs its stale guest ({state}): RAM from before the switch"
    assert "the guest is lost" in str(failed.value), f"the failure does not state the guest's fate: {failed.value}"


# --------------------------------------------------------------------------- the manager's limits

LIMITED_LINK = 16 * MIB  # bytes/s: well below what any host sends over loopback or a LAN
# Guest RAM that is not zero (QEMU sends no zero page): enough for four measurements, the
# second and fourth with no limit, before the migration ends.
FILL_MIB = 192
FILL_GUEST_MIB = 352
BANDWIDTH_TOLERANCE = 0.10
LINK_HEADROOM = 1.5  # a link carrying this many times the limit with no limit is clearly faster than it
DOWNTIME_LIMIT_MS = 250  # below QEMU's default 300 ms: a limit the host must be seen to honour
PACED_LINK = 128 * MIB
# What a QEMU that switched over early would still have to send, stopped: at loopback speed
# (1-2 GB/s under TCG) well over the limit, where an honest one sends at most a limit's worth
# of the link (32 MiB) then. Without it the guest's RAM is mostly zero pages, and even a switch-
# over with all of it pending took 93 ms (a mutant went uncaught).
HELD_DATA_MIB = 768


def unlimited_rate(source, uri: str, dest) -> float:
    """Bytes a second the source's migration sends with no limit, over 1.5 s (infinite if it
    completed sooner: a link that fast has room for any limit). One that ended otherwise is
    the migration's failure, with both QEMUs' reasons, not a rate."""
    try:
        sent, took = measure_throughput(source, 1.5, settle=0.3, least=0.3)
    except VMError:  # no longer active: a failed migration raises here
        await_migration(source, uri, destination=dest)
        return float("inf")  # it completed: the rest of the guest's RAM went at once
    return sent / took


def test_max_bandwidth_is_honoured(boot_vm, kvm_host, kvm_peer, kvm_note, kvm_metric):
    """Handbook 4.3 (``migrate_set_speed``, now max-bandwidth): a migration sends at the rate
    the manager set, within 10 %, measured from QEMU's own byte count over 3 s of the move.
    The guest fills RAM that is not zero (zero pages cost nothing to send); the limit is lifted after
    the measurement and the migration completes with the guest intact. A rate short of the limit
    is measured once more, under a limit the link can carry: where the link with no limit is
    not clearly faster (the lab's, under load: 8-17 MiB/s), half of what it carried; else the
    same limit again (a busy moment of an emulated CPU's sends a limited migration 40 % short
    while the link has room). Only that second measurement is judged; one short of the limit
    again is QEMU's fault only if the link, measured once more with no limit, had room for it
    (in a lab run it had not: 12.2 MiB/s under a 16 MiB/s limit while the other worker's guest
    dirtied its memory on the same machine, a healthy host's FAIL)."""
    source = boot_vm(VMSpec(memory_mib=FILL_GUEST_MIB))
    source.guest.hold_memory(FILL_MIB, data=True)
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, kvm_peer)
    limit, link_mib = LIMITED_LINK, LIMITED_LINK // MIB
    start_migration(source, uri, bandwidth_bytes=limit)
    sent, seconds = measure_throughput(source, 3.0)
    rate = sent / seconds
    source.qmp.cmd("migrate-set-parameters", max_bandwidth=UNLIMITED_BANDWIDTH)
    if rate < limit * (1 - BANDWIDTH_TOLERANCE):  # slower than the limit: QEMU, or the link?
        capacity = unlimited_rate(source, uri, dest)
        kvm_note("link", f"under the limit the migration sent {rate / MIB:.2f} MiB/s; with no limit "
                         f"{capacity / MIB:.2f} MiB/s")
        if capacity <= limit * LINK_HEADROOM:  # not clearly faster than the limit: one it carries with room
            limit = int(capacity / 2)
            link_mib = round(limit / MIB, 2)
            premise(limit >= MIB // 4, f"a link of at least 0.5 MiB/s: with no limit the migration sent "
                                       f"{capacity / MIB:.2f} MiB/s ({kvm_host.name} -> {kvm_peer.name})")
        source.qmp.cmd("migrate-set-parameters", max_bandwidth=limit)
        sent, seconds = measure_throughput(source, 3.0)
        rate = sent / seconds
        source.qmp.cmd("migrate-set-parameters", max_bandwidth=UNLIMITED_BANDWIDTH)
        if rate < limit * (1 - BANDWIDTH_TOLERANCE):
            after = unlimited_rate(source, uri, dest)
            premise(after > limit * LINK_HEADROOM,
                    f"a link with room for the limit while it was measured: under max-bandwidth {link_mib} MiB/s "
                    f"the migration sent {rate / MIB:.2f} MiB/s, and with no limit right after {after / MIB:.2f} MiB/s "
                    f"({kvm_host.name} -> {kvm_peer.name}: its CPUs were busy)")
    info = await_migration(source, uri, destination=dest)
    kvm_note("bandwidth", f"max-bandwidth {link_mib} MiB/s: sent {sent / MIB:.1f} MiB in {seconds:.2f} s = "
                          f"{rate / MIB:.2f} MiB/s ({rate / limit - 1:+.1%}); {stats(info)}")
    kvm_metric("migration_bandwidth_error", abs(rate / limit - 1) * 100, "%")
    assert abs(rate / limit - 1) <= BANDWIDTH_TOLERANCE, \
        f"with max-bandwidth {link_mib} MiB/s the migration sent {rate / MIB:.2f} MiB/s ({rate / limit - 1:+.1%}, " \
        f"more than {BANDWIDTH_TOLERANCE:.0%} off)"
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)


def test_downtime_limit_is_honoured(boot_vm, kvm_host, kvm_peer, kvm_note, kvm_metric, kvm_alone):
    """Handbook 4.3 (``migrate_set_downtime``, now downtime-limit): with the limit set below
    QEMU's default and a guest dirtying memory at a rate the link absorbs (QEMU's own
    dirty-page rate, at most half the link), the downtime QEMU reports stays within the limit.
    The guest holds 768 MiB of data, so a switch-over that does not wait for the limit shows.

    QEMU's limit covers the RAM it sends after the stop, not the devices' state: a host that
    declares a slower switch-over (max_downtime_ms=, the lab's emulated CPUs: 331 ms seen there)
    is held to what it declares; the note keeps the downtime measured. Held to the limit itself,
    the move runs alone on its machines: beside other tests' guests in CI, a healthy local
    switch-over took 745 ms (the guest dirtying 0.14 MiB/s of a 128 MiB/s link)."""
    source = boot_vm(VMSpec(memory_mib=1024))
    source.guest.hold_memory(HELD_DATA_MIB, data=True)
    GuestState.prepare(source)
    source.run("head -c 1M /dev/urandom > /tmp/paced.a && (while :; do cp /tmp/paced.a /tmp/paced; sleep 0.1; "
               "done) >/dev/null 2>&1 </dev/null &", check=True)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, kvm_peer)
    dirty: list[float] = []

    def progress(info: dict) -> str:
        ram = info.get("ram", {})
        if ram.get("dirty-pages-rate"):
            dirty.append(ram["dirty-pages-rate"] * ram.get("page-size", 4096))
        return ""

    limit = DOWNTIME_LIMIT_MS
    bound = max([limit, *(h.spec.max_downtime_ms for h in (kvm_host, kvm_peer) if h.spec.max_downtime_ms)])
    with kvm_alone() if bound == limit else contextlib.nullcontext():
        info = migrate(source, uri, timeout=120, max_downtime_ms=limit, bandwidth_bytes=PACED_LINK,
                       destination=dest, on_progress=progress)
    numbers = stats(info)
    rate = max(dirty, default=0.0)
    kvm_note("downtime", f"downtime-limit {limit} ms (bound {bound} ms), link {PACED_LINK // MIB} MiB/s, the guest "
                         f"dirtying up to {rate / MIB:.2f} MiB/s (QEMU's dirty-pages-rate): {numbers}")
    kvm_metric("migration_downtime_at_limit", numbers["downtime_ms"], "ms")
    premise(rate <= PACED_LINK / 2, f"a guest dirtying at most half the link: it dirtied {rate / MIB:.1f} MiB/s, "
                                    f"the link is {PACED_LINK // MIB} MiB/s")
    assert numbers["downtime_ms"] <= bound, \
        f"downtime {numbers['downtime_ms']} ms over the downtime-limit of {limit} ms " \
        f"{f'(and the {bound} ms the hosts declare) ' if bound > limit else ''}" \
        f"(the guest dirtied up to {rate / MIB:.2f} MiB/s on a {PACED_LINK // MIB} MiB/s link; {numbers})"
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- a fleet mid-upgrade

def versioned_machine(caps) -> str:
    """The i440FX machine type of the QEMU release ``caps`` describes (pc-i440fx-X.Y): what a
    guest started there keeps for life, so a newer QEMU can take it over unchanged."""
    return "pc-i440fx-{}.{}".format(*caps.qemu_version[:2])


@pytest.mark.kvm_requires("other-qemu")
def test_live_migration_across_qemu_versions(boot_vm, kvm_host, kvm_other_qemu, kvm_note):
    """Handbook 4.3 for a fleet upgraded host by host: a guest started on the older QEMU with
    that release's versioned machine type moves live to the newer QEMU, the same machine type,
    with continuity. Back to the older QEMU it either moves too or is refused with QEMU's
    reason, the source running on: the report says which (a reviewer needs to know)."""
    older, newer = sorted((kvm_host, kvm_other_qemu), key=lambda h: h.caps.qemu_version)
    premise(older.caps.qemu_version[:2] != newer.caps.qemu_version[:2],
            f"two QEMU releases: {kvm_host.name} offers QEMU {older.caps.qemu_version_text} twice")
    machine = versioned_machine(older.caps)
    premise(machine in older.caps.machines, f"QEMU {older.caps.qemu_version_text} has no machine type {machine}")
    assert machine in newer.caps.machines, \
        f"QEMU {newer.caps.qemu_version_text} dropped machine type {machine}: guests started on " \
        f"QEMU {older.caps.qemu_version_text} cannot move to it"
    old_text, new_text = older.caps.qemu_version_text, newer.caps.qemu_version_text
    source = boot_vm(VMSpec(memory_mib=256, machine=machine, balloon=True), on=older)
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest, uri = boot_vm.destination(source, newer)
    info = migrate(source, uri, timeout=120, destination=dest)
    kvm_note("version-skew up", f"QEMU {old_text} -> {new_text} ({machine}): migrates: {stats(info)}")
    problems = continuity_problems(before, dest)
    assert not problems, f"continuity broken from QEMU {old_text} to {new_text} ({machine}):\n" + "\n".join(problems)

    moved = GuestState.read(dest)
    back, uri = boot_vm.destination(dest, older)
    try:
        info = migrate(dest, uri, timeout=120, destination=back)
    except MigrationFailed as refused:
        kvm_note("version-skew back", f"QEMU {new_text} -> {old_text} ({machine}): refused: {refused}")
        wait_until(lambda: status(dest), 10, f"the guest resuming on QEMU {new_text}", done=lambda s: s == "running")
        problems = continuity_problems(moved, dest)
        assert not problems, f"a refused migration back to QEMU {old_text} broke the guest on {new_text}:\n" + \
            "\n".join(problems)
        return
    kvm_note("version-skew back", f"QEMU {new_text} -> {old_text} ({machine}): migrates: {stats(info)}")
    problems = continuity_problems(moved, back)
    assert not problems, f"continuity broken from QEMU {new_text} back to {old_text} ({machine}):\n" + \
        "\n".join(problems)


# --------------------------------------------------------------------------- what must fail, and how

@shared_storage
def test_mismatched_destination_is_refused_and_the_source_survives(running_source, peer, boot_vm):
    """Handbook 4.3.2: a destination with another device layout: the pre-flight names it, QEMU
    refuses the stream with both sides' reasons, and the source guest carries on."""
    source = running_source
    before = GuestState.read(source)
    other = boot_vm.start(boot_vm.successor(source, peer, "-incoming", "defer", balloon=False))
    mismatch = layout_mismatch(source, other)
    assert "lacks virtio-balloon-pci#balloon0" in mismatch, f"the pre-flight did not name the balloon: {mismatch!r}"
    uri = listen(other, peer.spec.migration_address)
    with pytest.raises(MigrationFailed, match="lacks virtio-balloon-pci#balloon0") as failed:
        migrate(source, uri, timeout=60, destination=other)
    # Both sides' words: the destination QEMU's own reason, not just "failed".
    assert f"the destination {other.name}" in str(failed.value) and "its QEMU stderr:\n" in str(failed.value), \
        f"the failure does not carry the destination's reason: {failed.value}"
    wait_until(lambda: status(source), 10, "the source resuming", done=lambda s: s == "running")
    after = GuestState.read(source)
    assert after.marker == before.marker and after.counter > before.counter, "the source guest did not carry on"


UNREACHABLE_BOUND_S = 30  # seconds; a connect to a port where nothing listens is refused at once


def test_unreachable_destination_fails_in_bounded_time(running_source, kvm_note):
    """Handbook 4.3: a migration to where nothing listens fails within UNREACHABLE_BOUND_S,
    by QEMU's own clock (its MIGRATION events, from setup to failed: the monitor's round trips
    to a loaded host are not QEMU's); the source runs on."""
    source = running_source
    started = time.monotonic()
    with pytest.raises(MigrationFailed, match="failed"):
        migrate(source, "tcp:127.0.0.1:9", timeout=UNREACHABLE_BOUND_S)  # the discard port: nothing listens there
    waited = time.monotonic() - started
    went = {e["data"]["status"]: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
            for e in source.qmp.events("MIGRATION")}
    took = went["failed"] - went["setup"] if {"setup", "failed"} <= went.keys() else waited
    kvm_note("failure", f"QEMU failed the migration {took:.2f} s after it began (its events: {sorted(went)}); "
                        f"the wait for it took {waited:.1f} s")
    assert took < UNREACHABLE_BOUND_S, \
        f"QEMU took {took:.1f} s to fail a migration to a port where nothing listens (bound {UNREACHABLE_BOUND_S} s)"
    assert status(source) == "running"
    assert source.run(["true"]).ok, "the source guest must stay reachable"


@shared_storage
@pytest.mark.parametrize("auto_converge", [False, True], ids=["plain", "auto-converge"])
def test_guest_dirtying_faster_than_the_link(running_source, peer, boot_vm, auto_converge, kvm_note):
    """Handbook 4.3: migration cannot finish while pages are dirtied faster than they are sent.

    The premise is established under the migration's own conditions: the guest rewrites a
    small set of its RAM, and while the first pass runs (dirty logging on, which slows a
    nested guest's writes several times) its rate is measured in the guest; then the link is
    limited to a quarter of that (ERROR when the guest is too slow to outpace any link).
    Without auto-converge the migration must still be running after PASSES passes over the
    dirty set (then it is cancelled, the source intact); with it, QEMU must throttle the
    guest's CPU. Each ends on what the migration shows; the deadline is only a bound.
    """
    source = running_source
    dirtier = Dirtier(source)
    wait_until(dirtier.count, 10, "the guest's dirtying loop writing")
    dest, uri = boot_vm.destination(source, peer)
    deadline = FIRST_PASS_S + 2 * (PASSES + 2) * Dirtier.SET_MIB / MIN_LINK_MIB
    seen: dict = {}  # the measured rate and link, and the sync count when the link was limited

    def progress(info: dict) -> str:
        syncs = info.get("ram", {}).get("dirty-sync-count", 0)
        if "limited_at" not in seen:
            elapsed = time.monotonic() - seen["started"]
            if syncs < 2 or elapsed < RATE_WINDOW_S:  # the first full pass, and a window long enough to measure
                return ""
            seen["rate"] = (dirtier.count() - seen["count"]) * Dirtier.SET_MIB / elapsed
            if seen["rate"] < DIRTY_MARGIN * MIN_LINK_MIB:
                return "the guest is too slow to outpace any link"
            seen["link"] = min(DIRTY_LINK_MIB, seen["rate"] / DIRTY_MARGIN)
            source.qmp.cmd("migrate-set-parameters", max_bandwidth=int(seen["link"] * MIB))
            seen["limited_at"] = syncs
            return ""
        if auto_converge:
            percent = info.get("cpu-throttle-percentage", 0)
            return f"auto-converge throttled the guest to {percent}%" if percent > 0 else ""
        passes = syncs - seen["limited_at"]
        return f"{passes} passes over the dirty set on the limited link" if passes >= PASSES else ""

    seen.update(count=dirtier.count(), started=time.monotonic())
    try:
        info = migrate(source, uri, timeout=deadline, bandwidth_bytes=FIRST_PASS_BANDWIDTH, max_downtime_ms=1,
                       capabilities=("auto-converge",) if auto_converge else (), destination=dest,
                       on_progress=progress)
        outcome = "converged"
    except MigrationDidNotConverge as exc:
        info, outcome = exc.info, "did not converge"
    elapsed = time.monotonic() - seen["started"]
    throttle = info["max-cpu-throttle-percentage"]
    rate, link = seen.get("rate", 0.0), seen.get("link", 0.0)
    kvm_note("dirty-rate", f"while migrating, the guest rewrote {rate:.1f} MiB/s of a {Dirtier.SET_MIB} MiB set; "
                           f"link {link:.2f} MiB/s after the first pass")
    kvm_note("outcome", f"{outcome} after {elapsed:.1f} s; CPU throttled up to {throttle}%; {stats(info)}")
    premise(rate >= DIRTY_MARGIN * MIN_LINK_MIB,
            f"a guest dirtying memory faster than the link: while migrating it rewrote {rate:.2f} MiB/s of its RAM "
            f"({outcome} after {elapsed:.1f} s), less than {DIRTY_MARGIN}x the slowest link ({MIN_LINK_MIB} MiB/s)")
    assert elapsed < deadline + 15, f"cancelling took too long: {elapsed:.1f} s"
    if outcome == "did not converge":
        assert status(source) == "running", "a cancelled migration leaves the source running"
        assert source.run(["true"]).ok, "the source guest must stay reachable"
    else:
        assert status(dest) == "running"
    if auto_converge:
        assert throttle > 0, f"auto-converge never throttled a guest rewriting {rate:.1f} MiB/s over a " \
                             f"{link:.2f} MiB/s link ({outcome} after {elapsed:.1f} s)"
    else:
        assert outcome == "did not converge", \
            f"a guest rewriting {rate:.1f} MiB/s converged over a {link:.2f} MiB/s link"
        assert throttle == 0, "the CPU was throttled without auto-converge"


@shared_storage
def test_hotplugged_disk_moves_with_the_guest(boot_vm, kvm_host, kvm_peer, kvm_note):
    """Handbook 3 and 4.3.3: a disk hot-plugged into a running guest moves with it in a live
    migration to a destination started with that disk on its command line (same slot, same
    image): the guest reads there what it wrote before the move."""
    source = boot_vm(VMSpec(memory_mib=256))
    plugged = plug_disk(source, kvm_host.transport.qemu_img.create(source.path("hotplugged.qcow2"), 32), "hotmig",
                        addr="0x10")
    written = plugged.disk.write_pattern(2)
    GuestState.prepare(source)
    before = GuestState.read(source)
    dest = boot_vm.start(boot_vm.successor(
        source, kvm_peer, "-incoming", "defer", *plugged.argv()))
    info = migrate(source, listen(dest, kvm_peer.spec.migration_address), timeout=120, destination=dest)
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} with a hot-plugged disk: {stats(info)}")
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)
    read = dest.guest.block_device("hotmig").checksum(2)
    assert read == written, f"the hot-plugged disk reads sha256 {read} on the destination, the guest wrote {written}"
