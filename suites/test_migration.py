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
import hashlib
import json
import os
import secrets
import time

import pytest

from pytest_kvmcheck import Disk, Nic, VMSpec
from pytest_kvmcheck.guestinfo import MIB, block_device_by_serial, bring_up_bridged_nic
from pytest_kvmcheck.handbook import command_arguments, describe, form
from pytest_kvmcheck.errors import MigrationDidNotConverge, MigrationFailed, premise
from pytest_kvmcheck.monitor import QMPCommandError
from pytest_kvmcheck.migration import (MARKER_PATH, GuestState, continuity_problems, create_overlay, Dirtier, export_disks, finish_mirrors, layout_mismatch,
                                       migrate, mirror_disks, place_base_image, preflight, start_destination, stats,
                                       successor)
from pytest_kvmcheck.vm import poll

SPEC = VMSpec(memory_mib=512, balloon=True, disks=(Disk(size_mib=32, serial="migrate0"),))
DIRTY_LINK_MIB = 32  # at most; a slower guest gets a slower link
MIN_LINK_MIB = 0.25
DIRTY_MARGIN = 4  # the guest must rewrite at least this many times what the link sends
PASSES = 4  # passes over the dirty set, without converging, that show plain precopy cannot finish
FIRST_PASS_S = 90  # bound for the first pass over the guest's RAM, at FIRST_PASS_BANDWIDTH
RATE_WINDOW_S = 1.5  # at least this long a window to measure the guest's rate in
FIRST_PASS_BANDWIDTH = 64 * MIB  # fast enough for a short first pass, slow enough that the guest keeps dirtying
BALLOON_MIB = 384  # a non-default target, so "unchanged" means something


# Beyond the seed: how the stream is sent. Each needs a capability on both QEMUs.
MODES = {"precopy": (), "multifd": ("multifd",), "postcopy": ("postcopy-ram",)}


def max_downtime_ms(config) -> int:
    return int(config.getini("kvm_max_downtime_ms"))


@pytest.fixture
def running_source(boot_vm):
    """A guest with disk data, a RAM marker, a counting process and a ballooned target."""
    vm = boot_vm(SPEC)
    disk = block_device_by_serial(vm, "migrate0")
    vm.run(f"head -c {2 * MIB} /dev/urandom > /tmp/d && dd if=/tmp/d of=/dev/{disk} bs=1M conv=fsync "
           f"2>/dev/null && sha256sum < /tmp/d > /tmp/disk.sha && rm /tmp/d", check=True)
    vm.qmp.cmd("balloon", value=BALLOON_MIB * MIB)
    assert poll(lambda: vm.qmp.cmd("query-balloon")["actual"] == BALLOON_MIB * MIB, 20, 0.2), "balloon did not settle"
    GuestState.prepare(vm)
    return vm


@pytest.fixture
def peer(running_source, kvm_host, kvm_peer):
    """The destination host, once the seed's pre-flight checks pass for this guest.

    A pair without shared storage skips (a missing capability of the pair); any other
    problem fails, naming it, before anything moves.
    """
    problems = preflight(running_source, kvm_host.caps, kvm_peer.caps, kvm_peer.transport.exists)
    storage = problems.pop("shared-storage", None)
    assert not problems, f"pre-flight {kvm_host.name} -> {kvm_peer.name}: " + "; ".join(
        f"{k}: {v}" for k, v in problems.items())
    if storage:
        pytest.skip(f"host {kvm_peer.name}: needs shared-storage: {storage}")
    return kvm_peer


def destination(boot_vm, kvm_run, peer, source, mode: str = "precopy", **options):
    """The destination QEMU for ``mode``, owned by the test; skips where its QEMU lacks the mode."""
    try:
        dest, uri = start_destination(kvm_run, peer, source, capabilities=MODES[mode], **options)
    except QMPCommandError as exc:
        pytest.skip(f"host {peer.name}: needs {mode} migration: {exc}")
    boot_vm.adopt(dest)
    return dest, uri


def assert_continuity(before: GuestState, after_vm) -> None:
    problems = continuity_problems(before, after_vm)
    disk = block_device_by_serial(after_vm, "migrate0")
    written = after_vm.run("cat /tmp/disk.sha", check=True).stdout.split()[0]
    read = after_vm.run(f"dd if=/dev/{disk} bs=1M count=2 2>/dev/null | sha256sum", check=True).stdout.split()[0]
    if read != written:
        problems.append(f"disk data changed: wrote sha256 {written}, read {read}")
    assert not problems, "continuity broken:\n" + "\n".join(problems)


@pytest.mark.parametrize("mode", MODES)
def test_live_migration_shared_storage(running_source, peer, boot_vm, kvm_run, kvm_host, kvm_note, request, mode):
    source = running_source
    before = GuestState.read(source)
    dest, uri = destination(boot_vm, kvm_run, peer, source, mode)
    info = migrate(source, uri, timeout=120, capabilities=MODES[mode], destination=dest)
    numbers = stats(info)
    kvm_note("migration", f"{kvm_host.name} -> {peer.name} ({mode}) over {uri}: {numbers}")
    assert source.qmp.cmd("query-status")["status"] == "postmigrate"
    assert dest.qmp.cmd("query-status")["status"] == "running"
    assert ("postcopy-active" in info["statuses"]) == (mode == "postcopy"), f"{mode}: went through {info['statuses']}"
    assert bool(numbers["multifd_bytes"]) == (mode == "multifd"), f"{mode}: multifd sent {numbers['multifd_bytes']} bytes"
    assert_continuity(before, dest)
    bound = max_downtime_ms(request.config)
    assert numbers["downtime_ms"] <= bound, f"downtime {numbers['downtime_ms']} ms exceeds {bound} ms ({numbers})"


@pytest.mark.kvm_requires("bridge")
@pytest.mark.parametrize("mode", MODES)
def test_guest_session_survives_live_migration(boot_vm, kvm_run, kvm_host, kvm_peer, mode, kvm_note):
    """An SSH session opened to the guest's bridged address before the move works after it.

    The session goes from the source host to the guest over the bridge, not through QEMU,
    so only the guest moving with its network identity (same MAC, QEMU's announcement
    after the switch-over) keeps it alive. The source QEMU is stopped before the check.
    """
    has_bridge, why = kvm_peer.caps.has("bridge")
    if not has_bridge:
        pytest.skip(f"host {kvm_peer.name}: needs bridge: {why}")
    source = boot_vm(VMSpec(memory_mib=512, nics=(Nic(), Nic(bridged=True))))
    address = bring_up_bridged_nic(source, 1, kvm_host.caps.bridge_cidr)
    session = source.session_to(address)
    try:
        shell_pid = session.run("echo $$", check=True).stdout.strip()
        GuestState.prepare(source)
        before = GuestState.read(source)
        dest, uri = destination(boot_vm, kvm_run, kvm_peer, source, mode)
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


def test_live_migration_same_backing_image(boot_vm, kvm_run, kvm_host, kvm_peer, kvm_note):
    """Seed 4.3.4: both hosts hold the same base image and the guest runs on an overlay.

    No shared storage: the destination gets an empty overlay of its own and the source's
    overlay travels by a block mirror to an NBD export there (what replaced ``migrate -b``),
    in write-blocking mode, so data written while the guest moves arrives too.
    """
    base_data = os.urandom(MIB)
    bases = [place_base_image(h.transport, f"{h.host_run.run_dir}/shared", base_data, 32) for h in (kvm_host, kvm_peer)]
    tag = secrets.token_hex(3)
    overlay = create_overlay(kvm_host.transport, f"{kvm_host.host_run.run_dir}/shared/src-{tag}.qcow2", bases[0])
    source = boot_vm(VMSpec(memory_mib=512, disks=(Disk(path=overlay, serial="mirror0"),)))
    disk = f"/dev/{block_device_by_serial(source, 'mirror0')}"
    sha_base = source.run(f"dd if={disk} bs=1M count=1 2>/dev/null | sha256sum", check=True).stdout.split()[0]
    assert sha_base == hashlib.sha256(base_data).hexdigest(), "the guest does not see the base image through its overlay"
    source.run(f"head -c {2 * MIB} /dev/urandom > /tmp/d && dd if=/tmp/d of={disk} bs=1M seek=4 conv=fsync 2>/dev/null"
               f" && sha256sum < /tmp/d > /tmp/overlay.sha && rm /tmp/d", check=True)
    # A writer that keeps going while the guest moves: block at 8 MiB, then the count it wrote.
    writer = source.run(f"(i=0; while :; do i=$((i+1)); printf '%-511s\\n' $i | dd of={disk} bs=512 seek=16384 conv=fsync "
               f"2>/dev/null && echo $i > /tmp/written.new && mv /tmp/written.new /tmp/written; sleep 0.05; done) "
               f">/dev/null 2>&1 </dev/null & "
               f"echo $!", check=True)
    GuestState.prepare(source)
    before = GuestState.read(source)

    dest_overlay = create_overlay(kvm_peer.transport, f"{kvm_peer.host_run.run_dir}/shared/dst-{tag}.qcow2", bases[1])
    dest, uri = destination(boot_vm, kvm_run, kvm_peer, source, disk_paths=(dest_overlay,))
    address = kvm_peer.spec.migration_address
    port = export_disks(dest, address)
    mirror_disks(source, address, port)
    written_before = int(source.run("cat /tmp/written", check=True).stdout)
    info = migrate(source, uri, timeout=120, destination=dest, before_switchover=lambda: finish_mirrors(source))
    dest.qmp.cmd("nbd-server-stop")
    kvm_note("migration", f"{kvm_host.name} -> {kvm_peer.name} (same backing image, mirror to nbd:{address}:{port})"
                          f": {stats(info)}")
    assert source.qmp.cmd("query-status")["status"] == "postmigrate"
    problems = continuity_problems(before, dest)
    assert not problems, "continuity broken:\n" + "\n".join(problems)

    # The writer moved with the guest: stop it there, so the counts below are final.
    writer_pid = writer.stdout.strip()
    assert dest.run(["kill", writer_pid]).ok, f"the disk writer (pid {writer_pid}) is not running on the destination"
    assert poll(lambda: not dest.run(["kill", "-0", writer_pid]).ok, 5, 0.1), f"the writer {writer_pid} did not stop"
    reads = dest.run(f"dd if={disk} bs=1M count=1 2>/dev/null | sha256sum; dd if={disk} bs=1M skip=4 count=2 "
                     f"2>/dev/null | sha256sum; cat /tmp/overlay.sha", check=True).stdout.split()
    assert reads[0] == sha_base, "the base image's data changed on the destination"
    assert reads[2] == reads[4], "data written to the overlay before the migration is not on the destination"
    written = int(dest.run("cat /tmp/written", check=True).stdout)
    on_disk = int(dest.run(f"dd if={disk} bs=512 skip=16384 count=1 2>/dev/null", check=True).stdout.split()[0])
    assert written > written_before, "the writer did not write while the guest moved"
    assert on_disk >= written, f"the disk holds write {on_disk}, the guest last completed {written}: writes were lost"
    allocated = sum(e["length"] for e in json.loads(kvm_peer.transport.run(
        [kvm_peer.spec.qemu_img, "map", "-U", "--output=json", dest_overlay], timeout=30).check().stdout)
        if e["depth"] == 0 and e["data"])
    assert allocated >= 2 * MIB, f"the destination's own overlay holds only {allocated} bytes: nothing was copied"


def test_static_migration_savevm_loadvm(running_source, peer, boot_vm, kvm_run):
    source = running_source
    before = GuestState.read(source)
    out = source.qmp.hmp("savevm kvmcheck-static")
    assert "Error" not in out, f"savevm failed: {out}"
    snapshots = source.qmp.hmp("info snapshots")
    assert "kvmcheck-static" in snapshots, f"savevm left no snapshot:\n{snapshots}"
    source.stop()
    restored = boot_vm.adopt(successor(kvm_run, peer.name, source, "-loadvm", "kvmcheck-static"))
    restored.start()
    assert restored.qmp.cmd("query-status")["status"] == "running"
    assert_continuity(before, restored)


def test_static_migration_to_file(running_source, peer, boot_vm, kvm_run):
    source = running_source
    state_file = source.path("state.bin")
    before = GuestState.read(source)
    migrate(source, f"exec:cat > {state_file}", timeout=120)
    assert source.qmp.cmd("query-status")["status"] == "postmigrate"
    source.stop()
    restored = boot_vm.adopt(successor(kvm_run, peer.name, source, "-incoming", f"exec:cat {state_file}"))
    restored.start()
    assert poll(lambda: restored.qmp.cmd("query-status")["status"] == "running", 30, 0.1), \
        f"the restored guest did not run: {restored.qmp.cmd('query-status')}"
    assert_continuity(before, restored)


def test_handbook_block_migration(kvm_host, kvm_note):
    """``migrate -b``: deprecated in 8.2, removed in 9.1; blockdev-mirror + NBD replaces it.

    The host's QEMU schema must agree with the table: a ``blk`` argument to ``migrate``
    exactly when the table says block migration is not yet removed.
    """
    row = form("migrate -b tcp:HOST:PORT")
    kvm_note("handbook", describe(row))
    arguments = command_arguments(kvm_host, "migrate")
    assert "uri" in arguments, f"QMP migrate without a uri argument? {sorted(arguments)}"
    removed = row.removed_in(kvm_host.caps.qemu_version)
    assert ("blk" not in arguments) == removed, \
        f"QEMU {kvm_host.caps.qemu_version_text}: migrate arguments {sorted(arguments)}; the table says block " \
        f"migration is {'removed' if removed else 'still there'}"
    mirror = command_arguments(kvm_host, "blockdev-mirror")
    assert {"device", "target", "sync"} <= mirror, f"blockdev-mirror lacks what replaces migrate -b: {sorted(mirror)}"


# --------------------------------------------------------------------------- what must fail, and how

def test_mismatched_destination_is_refused_and_the_source_survives(running_source, peer, boot_vm, kvm_run):
    """A destination with another device layout: the pre-flight names it, QEMU refuses the stream."""
    source = running_source
    before = GuestState.read(source)
    other = successor(kvm_run, peer.name, source, "-incoming", "defer")
    other.spec = other.spec.with_(balloon=False)
    boot_vm.adopt(other).start()
    mismatch = layout_mismatch(source, other)
    assert "lacks virtio-balloon-pci#balloon0" in mismatch, f"the pre-flight did not name the balloon: {mismatch!r}"
    other.qmp.cmd("migrate-incoming", uri=f"tcp:{peer.spec.migration_address}:0")
    address = other.qmp.cmd("query-migrate")["socket-address"][0]
    with pytest.raises(MigrationFailed, match="lacks virtio-balloon-pci#balloon0") as failed:
        migrate(source, f"tcp:{address['host']}:{address['port']}", timeout=60, destination=other)
    # Both sides' words: the destination QEMU's own reason, not just "failed".
    assert f"the destination {other.name}" in str(failed.value) and "its QEMU stderr:\n" in str(failed.value), \
        f"the failure does not carry the destination's reason: {failed.value}"
    assert poll(lambda: source.qmp.cmd("query-status")["status"] == "running", 10, 0.1), \
        f"the source must resume: {source.qmp.cmd('query-status')}"
    after = GuestState.read(source)
    assert after.marker == before.marker and after.counter > before.counter, "the source guest did not carry on"


def test_unreachable_destination_fails_in_bounded_time(running_source):
    source = running_source
    started = time.monotonic()
    with pytest.raises(MigrationFailed, match="failed"):
        migrate(source, "tcp:127.0.0.1:9", timeout=30)  # the discard port: nothing listens there
    assert time.monotonic() - started < 30
    assert source.qmp.cmd("query-status")["status"] == "running"
    assert source.run("true").ok, "the source guest must stay reachable"


@pytest.mark.parametrize("auto_converge", [False, True], ids=["plain", "auto-converge"])
def test_guest_dirtying_faster_than_the_link(running_source, peer, boot_vm, kvm_run, auto_converge, kvm_note):
    """Seed: migration cannot finish while pages are dirtied faster than they are sent.

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
    poll(dirtier.count, 10, 0.1)  # the loop is writing
    dest, uri = destination(boot_vm, kvm_run, peer, source)
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
            source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": int(seen["link"] * MIB)})
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
        assert source.qmp.cmd("query-status")["status"] == "running", "a cancelled migration leaves the source running"
        assert source.run("true").ok, "the source guest must stay reachable"
    else:
        assert dest.qmp.cmd("query-status")["status"] == "running"
    if auto_converge:
        assert throttle > 0, f"auto-converge never throttled a guest rewriting {rate:.1f} MiB/s over a " \
                             f"{link:.2f} MiB/s link ({outcome} after {elapsed:.1f} s)"
    else:
        assert outcome == "did not converge", \
            f"a guest rewriting {rate:.1f} MiB/s converged over a {link:.2f} MiB/s link"
        assert throttle == 0, "the CPU was throttled without auto-converge"
