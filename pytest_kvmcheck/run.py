"""One run of the suites: its id, key, local state, and each host prepared once.

Nothing happens until a test needs a host: ``--help``, ``--collect-only`` and runs without
kvmcheck tests create no state dir and no key. The controller (or the only process,
without xdist) names the run and its local state dir; xdist workers receive both. The
first process that needs the state creates it (the run's SSH key inside), under a lock.
A host is prepared lazily too, by whichever process needs it first, under a file lock:
connect, reap dead runs, create the run's work dir, place the image, probe capabilities.
The result is written to the state dir as JSON and every other process reads it, so each
host is probed once per run. The controller's :meth:`KvmRun.finish` removes each prepared
host's run dir (and any QEMU still in it), and the state dir.
"""
from __future__ import annotations

import fcntl
import stat
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import pytest

from .hosts.capabilities import PAIR_NEEDS, Capabilities, load_probe_cache, probe, unmet_needs
from .errors import HostError, KvmCheckError
from .guests.session import RunKey
from .hosts.spec import HostSpec
from .images.cloud import CloudImage, seed_iso
from .images.tiny import TinyImage, build_tiny
from .paths import cache_dir, machine_locks_dir
from .hosts.footprint import KEEP_MARKER, HostRun, place_files, remove_run, start_run
from .hosts.settings import replay_stale_changes
from .machines import MachineHold
from .hosts.connect import connect
from .hosts.transport import Host
from .qemu.vm import VM, stop_all_vms
from .hosts.transport import CommandResult
from .qemu.legacy import command_arguments
from .qemu.noguest import try_options
from .qemu.spec import VMSpec


@dataclass(frozen=True)
class Unmet:
    """A need of a test that a host does not meet, and whether its inventory said it would."""

    host: str
    need: str
    why: str
    expected: bool = False

    def __str__(self) -> str:
        if self.expected:
            return f"host {self.host}: expected {self.need} (its inventory's expect), but {self.why}"
        return f"host {self.host}: needs {self.need}: {self.why}"


PREPARE_AT_ONCE = 16  # hosts prepared at the same time (connections, image copies, probes)


@dataclass
class PreparedHost:
    """A host as this process sees it: its connection, its run dir and capabilities."""

    spec: HostSpec
    transport: Host
    host_run: HostRun
    caps: Capabilities

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> str:
        """This run's directory on the host (removed at the run's end)."""
        return self.host_run.run_dir

    def accepts(self, options: list[str]) -> CommandResult:
        """Start the host's QEMU with ``options`` and no guest (exit 0: QEMU took them)."""
        return try_options(self.transport, options)

    def qmp_arguments(self, command: str) -> set[str]:
        """The argument names the host's QEMU takes for a QMP command, from its own schema."""
        return command_arguments(self.transport, self.run_dir, command)


class KvmRun:
    def __init__(self, specs: list[HostSpec], state_dir: Path, run_id: str, accel: str = "auto",
                 worker: str = "main", progress=None, guest: str = "tiny", owner_pid: int | None = None):
        self.specs = {s.name: s for s in specs}
        self.state_dir, self.run_id, self.accel, self.worker = state_dir, run_id, accel, worker
        self.guest = guest  # "tiny" or the path of a qcow2 cloud image
        self.progress = progress or (lambda msg: None)
        self.on_host_prepared = lambda prepared: None  # the plugin calls its hook from here
        self._run_key: RunKey | None = None
        self._hosts: dict[str, PreparedHost] = {}
        self._errors: dict[str, str] = {}
        self._host_locks: dict[str, threading.Lock] = {}  # a host's preparation, one thread at a time
        self._announced: set[str] = set()  # hosts whose on_host_prepared was called
        self._told: set[str] = set()  # hosts whose cause of failure host() has raised once
        self._lock = threading.Lock()  # the dicts above; held only for moments
        self._vm_counter = 0
        self.owner_pid = owner_pid or os.getpid()
        self.finished = False

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, specs: list[HostSpec], accel: str = "auto", progress=None, guest: str = "tiny") -> "KvmRun":
        """The controller's side: a fresh run id and the name of its state dir (nothing is created)."""
        run_id = time.strftime("%m%d%H%M") + "-" + secrets.token_hex(3)
        state_dir = Path(tempfile.gettempdir()) / f"{STATE_PREFIX}{run_id}-{secrets.token_hex(8)}"
        return cls(specs, state_dir, run_id, accel, progress=progress, guest=guest)

    def describe(self) -> dict:
        """What an xdist worker needs to join this run."""
        return {"state_dir": str(self.state_dir), "run_id": self.run_id, "accel": self.accel, "guest": self.guest,
                "pid": self.owner_pid}

    @classmethod
    def attach(cls, specs: list[HostSpec], described: dict, worker: str) -> "KvmRun":
        """An xdist worker's side: the controller's run, seen from another process."""
        return cls(specs, Path(described["state_dir"]), described["run_id"], described["accel"], worker=worker,
                   guest=described["guest"], owner_pid=described["pid"])

    @property
    def started(self) -> bool:
        """Whether any process of this run has made its state (needed a host)."""
        return (self.state_dir / "run.json").exists()

    def _ensure_state(self) -> None:
        """Make the state dir and the run's keys, once per run, whichever process comes first.

        The dir's name is unguessable and it is made 0700 here; one found in its place that
        is not ours (another owner, a symlink, group or world access) is refused.
        """
        if self._run_key is not None:
            return
        try:
            self.state_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.state_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise KvmCheckError(f"the run's state dir {self.state_dir} exists and is not this user's private "
                                "directory: refusing to keep the run's key there")
        with open(self.state_dir / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.state_dir / "run.json").exists():
                remove_dead_state_dirs()
                run_key = RunKey.create(self.state_dir / "id_ed25519")
                if self.guest != "tiny":  # a disk-image guest gets this run's host key and key through a seed ISO
                    host_key = RunKey.create(self.state_dir / "guest_host_key")
                    seed_iso(self.state_dir / "seed.iso", f"kvmcheck-{self.run_id}", run_key.public_line,
                             host_key.path.read_text(), host_key.public_line)
                (self.state_dir / "run.json").write_text(json.dumps(self.describe()))
        self._run_key = RunKey(self.state_dir / "id_ed25519")

    @property
    def run_key(self) -> RunKey:
        """The run's SSH key pair: guests accept this key and no other."""
        self._ensure_state()
        return self._run_key

    # ------------------------------------------------------------------ hosts
    def _state_file(self, name: str) -> Path:
        return self.state_dir / f"host-{name}.json"

    def host(self, name: str) -> PreparedHost:
        """The prepared host (preparing it first if no process has yet).

        Raises :class:`KvmCheckError` with the one-line reason if the host cannot be used.
        """
        try:
            prepared = self._prepared(name)
        except KvmCheckError:
            with self._lock:
                told = name in self._told
                self._told.add(name)
            if told:  # the cause was told with the first test on the host, and in the summary
                raise HostError(f"host {name} could not be prepared: the first test on it, and the run's "
                                "summary, say why") from None
            raise
        with self._lock:
            first = name not in self._announced
            self._announced.add(name)
        if first:
            self.on_host_prepared(prepared)
        return prepared

    def prepare_all(self, names: Iterable[str]) -> None:
        """Prepare these hosts at once, a thread each: a fleet is ready in about the time of its
        slowest host, not of all of them in turn (kvmcheck doctor, --kvm-spread's collection).
        A host that cannot be prepared keeps its error for :meth:`host` to raise."""
        names = list(dict.fromkeys(names))
        with self._lock:
            self._ensure_state()
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(names), PREPARE_AT_ONCE)),
                                  thread_name_prefix="kvmcheck-prepare")
        try:
            for future in [pool.submit(self._prepared, name) for name in names]:
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - host() raises it (or prepares again) where it is asked
                    pass
        finally:  # on Ctrl-C: no new preparation starts; the running ones end as they would
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepared(self, name: str) -> PreparedHost:
        """The host prepared once per process; hosts prepare in parallel, each under its own lock."""
        with self._lock:
            host_lock = self._host_locks.setdefault(name, threading.Lock())
        with host_lock:
            with self._lock:
                if name in self._hosts:
                    return self._hosts[name]
                if name in self._errors:
                    raise HostError(self._errors[name])
                self._ensure_state()
            spec = self.specs[name]
            transport = None
            try:
                with open(self.state_dir / f"host-{name}.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    state_file = self._state_file(name)
                    if state_file.exists():
                        state = json.loads(state_file.read_text())
                    else:
                        transport = connect(spec)
                        state = self._prepare(spec, transport)
                        state_file.write_text(json.dumps(state))
                if "error" in state:
                    raise HostError(state["error"])
                transport = transport or connect(spec)
                caps = Capabilities.from_dict(state["caps"])
                # The binaries the preparation found (or the spec named), for every process of the run.
                transport.spec = spec = replace(spec, qemu=caps.qemu_binary or spec.qemu,
                                                qemu_img=caps.qemu_img_binary or spec.qemu_img)
                prepared = PreparedHost(spec, transport, HostRun.from_dict(state["host_run"]), caps)
            except KvmCheckError as exc:
                if transport is not None:
                    transport.close()
                with self._lock:
                    self._errors[name] = str(exc)
                raise
            with self._lock:
                self._hosts[name] = prepared
            return prepared

    def _prepare(self, spec: HostSpec, transport: Host) -> dict:
        run_dirs: list[str] = []
        try:
            tiny = build_tiny(progress=self.progress)  # its kernel also serves the KVM probe
            run_dirs, notes = start_run(transport, self.run_id, self.owner_pid)
            run_dir = run_dirs[0]
            notes += replay_stale_changes(transport)  # host-wide changes a killed run did not give back
            # Hosts sharing storage share the run dir: a peer that sees this marker shares it with us.
            transport.write_bytes(f"{run_dir}/host-{spec.name}", b"")
            filesystems = [transport.run(["stat", "-f", "-c", "%T", d], timeout=15).stdout.strip() for d in run_dirs]
            host_run = replace(self._place_guest(transport, run_dir, tiny), filesystem=filesystems[0])
            if len(run_dirs) > 1:
                host_run = replace(host_run, scratch_dir=run_dirs[1], scratch_filesystem=filesystems[1])
            probe_kernel = place_files(transport, f"probe-{tiny.digest}", {"vmlinuz": str(tiny.directory / "vmlinuz")})
            probe_file = cache_dir() / "probes" / (hashlib.sha256(spec.url.encode()).hexdigest()[:16] + ".json")
            cache = load_probe_cache(probe_file)
            caps = probe(transport, self.accel, probe_kernel["vmlinuz"], f"{run_dir}/kvm-probe-{spec.name}", cache)
            caps.guest = "tiny" if self.guest == "tiny" else "disk-image"
            probe_file.parent.mkdir(parents=True, exist_ok=True)
            probe_file.write_text(json.dumps(cache))
            return {"host_run": host_run.to_dict(), "caps": caps.to_dict(), "notes": notes}
        except KvmCheckError as exc:
            for run_dir in run_dirs:  # an unusable host keeps nothing of this run
                remove_run(transport, run_dir)
            return {"error": str(exc)}
        except BaseException:  # Ctrl-C mid-probe: the state file is not written yet, so clean up here
            for run_dir in run_dirs:
                remove_run(transport, run_dir)
            raise

    def _place_guest(self, transport: Host, run_dir: str, tiny: TinyImage) -> HostRun:
        """Put the guest's files on the host: the tiny kernel + initramfs, or the cloud image + seed."""
        if self.guest == "tiny":
            placed = place_files(transport, tiny.placement_name,
                                 {"vmlinux": str(tiny.kernel), "initrd.img": str(tiny.initrd),
                                  "initrd-kvm.img": str(tiny.initrd_kvm), "kvmcheck-net": str(tiny.net_probe)},
                                 executable=("kvmcheck-net",))
            return HostRun(run_dir, placed["vmlinux"], placed["initrd.img"], tiny.host_public_key,
                           net_probe=placed["kvmcheck-net"], initrd_kvm=placed["initrd-kvm.img"])
        cloud = CloudImage.open(self.guest)
        placed = place_files(transport, f"cloud-{cloud.digest}", {"disk.qcow2": str(cloud.path)})
        seed = f"{run_dir}/seed.iso"
        transport.put_file(str(self.state_dir / "seed.iso"), seed)
        host_key = (self.state_dir / "guest_host_key.pub").read_text().split()
        return HostRun(run_dir, "", "", " ".join(host_key[:2]), boot_disk=placed["disk.qcow2"], seed=seed)

    def other_qemu(self, name: str) -> PreparedHost:
        """Host ``name`` running the second QEMU its spec names (``other_qemu=``): prepared as a
        host of its own, ``NAME.other-qemu`` (its own probe: that QEMU's version, machine types
        and capabilities), on the same machine and in the same run dir. It takes no test of its
        own and is no one's peer; tests reach it through here (the ``kvm_other_qemu`` fixture)."""
        spec = self.specs[name]
        if not spec.other_qemu:
            raise HostError(f"host {name}: no other_qemu= in its spec")
        variant = f"{name}.other-qemu"
        with self._lock:
            self.specs.setdefault(variant, replace(spec, name=variant, qemu=spec.other_qemu, other_qemu=None,
                                                   only=("other-qemu",)))
        return self.host(variant)

    def peer(self, name: str) -> PreparedHost:
        """The host ``name`` migrates to: the next one in --kvm-hosts order, or itself if alone.
        A host kept for some tests alone (only=) is no one's peer."""
        return self.host(self.peer_name(name))

    def peer_name(self, name: str) -> str:
        """The name of :meth:`peer`, without preparing it."""
        names = [n for n, spec in self.specs.items() if not spec.only or n == name]
        return names[(names.index(name) + 1) % len(names)]

    def unmet(self, name: str, needs: list[str], peer_needs: list[str] = ()) -> list[Unmet]:
        """What keeps the test from running on host ``name``: its unmet ``needs``, and
        ``peer_needs`` of its migration peer (``shared-storage``: the peer sees this host's run
        files); each says whether that host's inventory expected it. Empty when all are met."""
        host = self.host(name)
        out = [Unmet(name, need, why, need in host.spec.expect) for need, why in unmet_needs(host.caps, needs)]
        if peer_needs:
            peer = self.peer(name)
            for need, why in unmet_needs(peer.caps, [n for n in peer_needs if n not in PAIR_NEEDS]):
                missing = Unmet(peer.name, need, why, need in peer.spec.expect)
                if missing not in out:  # a host alone is its own peer
                    out.append(missing)
            if "shared-storage" in peer_needs and peer.name != name:
                marker = f"{host.host_run.run_dir}/host-{name}"
                if not peer.transport.exists(marker):
                    out.append(Unmet(peer.name, "shared-storage", f"it does not see host {name}'s run files ({marker}): "
                                     f"no storage shared with {name} at the same path",
                                     "shared-storage" in peer.spec.expect))
        return out

    def machine_hold(self, hosts: Iterable[str]) -> MachineHold:
        """The machines ``hosts`` run on, to hold for a test (machines.py)."""
        self._ensure_state()
        return MachineHold(machine_locks_dir(), (self.specs[h].machine_name for h in hosts))

    def write_spread(self, stood_in_by: dict[str, dict[str, str]]) -> None:
        """--kvm-spread's plan (host -> {feature: the host that ran it instead}), for the controller.
        Every worker computes the same plan; each writes it whole."""
        self._ensure_state()
        tmp = self.state_dir / f"spread.json.{os.getpid()}"
        tmp.write_text(json.dumps(stood_in_by))
        os.replace(tmp, self.state_dir / "spread.json")

    def spread(self) -> dict[str, dict[str, str]]:
        """The plan :meth:`write_spread` kept: empty without --kvm-spread."""
        path = self.state_dir / "spread.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def prepared_states(self) -> dict[str, dict]:
        out = {}
        if not self.started:
            return out
        for name in self.specs:
            f = self._state_file(name)
            if f.exists():
                out[name] = json.loads(f.read_text())
        return out

    # ------------------------------------------------------------------ VMs
    def new_vm(self, host_name: str, spec: VMSpec, boot_disk: str = "", mode: str = "", stays: bool = False) -> VM:
        """A VM of this run on a host (not started): tests get theirs from the VM factory.
        One that ``stays`` on the host (it never migrates) lives in the host's scratch dir."""
        prepared = self.host(host_name)
        with self._lock:
            self._vm_counter += 1
            name = f"{self.worker}-{self._vm_counter}"
        host_run = prepared.host_run.staying() if stays else prepared.host_run
        vm = VM(prepared.transport, spec, name=name, host_run=host_run, run_key=self.run_key,
                accel=prepared.caps.accel, qemu_version=prepared.caps.qemu_version, boot_disk=boot_disk, mode=mode)
        vm.address_leases = self.state_dir / "bridged-addresses"  # hosts may share a bridge: one lease per address
        return vm

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """A worker's end: drop its connections (its VMs were stopped by their fixtures)."""
        for prepared in self._hosts.values():
            prepared.transport.close()
        self._hosts.clear()

    def finish(self) -> list[str]:
        """The controller's end: remove each prepared host's run dir and the local state.

        Returns notes for the terminal (VMs killed or kept).
        """
        self.finished = True
        stop_all_vms()
        self.close()
        if not self.state_dir.exists():
            return []  # no test needed a host: nothing was made
        notes, kept = [], False
        states = {name: state for name, state in self.prepared_states().items() if "host_run" in state}
        for remove in (False, True):  # kill on every host before removing (hosts may share the run dir)
            for name, state in states.items():
                try:
                    transport = connect(self.specs[name])
                    try:
                        for note in (note for run_dir in HostRun.from_dict(state["host_run"]).dirs
                                     for note in remove_run(transport, run_dir, keep_kept=True, remove=remove)):
                            kept |= note.startswith("kept")
                            if f"host {name}: {note}" not in notes:  # a kept VM is seen by both passes
                                notes.append(f"host {name}: {note}")
                    finally:
                        transport.close()
                except KvmCheckError as exc:
                    if remove:
                        notes.append(f"host {name}: could not clean up ({exc}); the next run there will")
        if kept:
            (self.state_dir / KEEP_MARKER).write_text("")
            notes.append(f"the run's SSH key for kept VMs stays in {self.state_dir}")
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return notes


def remove_dead_state_dirs(including_kept: bool = False) -> list[str]:
    """Remove local state dirs of runs whose controller died (SIGKILL, crash) on this machine.

    A dir holding the key of kept VMs stays until ``kvmcheck cleanup`` (``including_kept``).
    """
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{STATE_PREFIX}*"):
        try:
            pid = json.loads((d / "run.json").read_text())["pid"]
            os.kill(pid, 0)
            continue  # its controller still runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            try:
                if time.time() - d.stat().st_mtime < 60:
                    continue  # being made right now by another run
            except OSError:
                continue
        if (d / KEEP_MARKER).exists() and not including_kept:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


RUN_KEY = pytest.StashKey[KvmRun]()
STATE_PREFIX = "kvmcheck-run-"
