"""A run's footprint on a host: its work dir, its owner record, and removing what dead runs left.

Every run gets ``<workdir>/runs/<run_id>/`` on each host, and ``<scratch>/runs/<run_id>/``
where the host has a scratch dir for guests that stay on it; every VM lives in a subdirectory
of one of them with its pidfile, QMP socket, console log and disks. ``owner.json`` says which client
process owns the run, so the start of the next run can tell a dead run from a live one and
remove what the dead one left (QEMU processes included).
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from dataclasses import dataclass, replace

from .transport import Host

STALE_AFTER_S = 24 * 3600
PIDFILE = "qemu.pid"
KEEP_MARKER = "KEPT"  # a VM left running on purpose by --kvm-keep-failed


def _local_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def owner_record(pid: int | None = None) -> dict:
    """Who owns a run: the client machine (and its boot) and the controlling pytest process."""
    return {"client": socket.gethostname(), "boot_id": _local_boot_id(), "pid": pid or os.getpid(),
            "started": time.time()}


def owner_is_dead(owner: dict) -> bool:
    """Whether the process an :func:`owner_record` names is gone (or the record is a day old)."""
    if time.time() - float(owner.get("started", 0)) > STALE_AFTER_S:
        return True
    if owner.get("client") != socket.gethostname():
        return False  # another client's run: only age tells
    if owner.get("boot_id") != _local_boot_id():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def runs_dirs(host: Host) -> list[str]:
    """Where the host keeps runs: under its workdir, and under its scratch dir if it has one."""
    bases = [host.spec.workdir or host.default_workdir(), *([host.spec.scratch] if host.spec.scratch else [])]
    return list(dict.fromkeys(posixpath.join(base, "runs") for base in bases))


def kill_vm_dir(host: Host, vm_dir: str, grace: float = 3.0) -> bool:
    """Kill the QEMU whose pidfile is in ``vm_dir`` (only if its argv names that pidfile).

    Checking the argv guards against a recycled pid. Returns True if a process was killed.
    """
    pidfile = posixpath.join(vm_dir, PIDFILE)
    text = host.read_root_text(pidfile, default="").strip()
    if not text.isdigit():
        return False
    pid = int(text)
    if pidfile not in host.process_cmdline(pid):
        return False
    host.kill(pid, "TERM")
    deadline = time.monotonic() + grace
    while host.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if host.pid_alive(pid):
        host.kill(pid, "KILL")
    return True


def remove_run(host: Host, run_dir: str, keep_kept: bool = False, remove: bool = True) -> list[str]:
    """Kill every QEMU of a run and remove its dir (``remove``). Returns what was killed or kept.

    Hosts sharing a work dir (shared storage) share the run dir: kill on every host first,
    then remove, or the first removal hides the other hosts' VM dirs from the kill.
    """
    notes = []
    kept = False
    for name in host.listdir(run_dir):
        vm_dir = posixpath.join(run_dir, name)
        if keep_kept and host.exists(posixpath.join(vm_dir, KEEP_MARKER)):
            kept = True
            notes.append(f"kept {vm_dir}")
            continue
        if kill_vm_dir(host, vm_dir):
            notes.append(f"killed QEMU of {vm_dir}")
    if remove and not kept:
        host.remove_tree(run_dir)
    return notes


def reap_stale_runs(host: Host, current: str | None = None, everything: bool = False) -> list[str]:
    """Remove runs whose owner is dead (or every run but ``current`` if ``everything``)."""
    notes = []
    for base, run_id in [(runs, run_id) for runs in runs_dirs(host) for run_id in host.listdir(runs)]:
        if run_id == current:
            continue
        run_dir = posixpath.join(base, run_id)
        try:
            owner = json.loads(host.read_text(posixpath.join(run_dir, "owner.json"), default="{}"))
        except ValueError:
            owner = {}
        if everything or not owner or owner_is_dead(owner):
            # Kept VMs of dead runs stay until `kvmcheck cleanup` (everything=True).
            notes += [f"{run_id}: {n}" for n in remove_run(host, run_dir, keep_kept=not everything)]
            notes.append(f"removed stale run {run_id}")
    return notes


@dataclass(frozen=True)
class HostRun:
    """Where one run lives on one host, and where the tiny image is there."""

    run_dir: str
    kernel: str  # tiny guest: kernel and initramfs; "" for a disk-image guest
    initrd: str
    host_public_key: str  # the guest's SSH host key, which the guest must present
    boot_disk: str = ""  # disk-image guest: the image (VMs boot from an overlay of it)
    seed: str = ""  # disk-image guest: the cloud-init seed ISO of this run
    net_probe: str = ""  # tiny guest: kvmcheck-net for the host's end (the guest has its own)
    filesystem: str = ""  # the run dir's (stat -f -c %T): a network one changes disks' default cache
    scratch_dir: str = ""  # the run's dir in the host's scratch dir, for guests that stay ("": run_dir)
    scratch_filesystem: str = ""
    initrd_kvm: str = ""  # tiny guest: the initramfs with the KVM modules, for guests that are KVM hosts

    @property
    def dirs(self) -> list[str]:
        return [self.run_dir, *([self.scratch_dir] if self.scratch_dir else [])]

    def staying(self) -> "HostRun":
        """Where a guest that stays on the host lives: the scratch dir if there is one."""
        return replace(self, run_dir=self.scratch_dir, filesystem=self.scratch_filesystem) if self.scratch_dir else self

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict) -> "HostRun":
        return cls(**d)


def start_run(host: Host, run_id: str, owner_pid: int | None = None) -> tuple[list[str], list[str]]:
    """Reap dead runs and create this run's dirs (see :func:`runs_dirs`) with their owner
    records. Returns (dirs, the workdir's first; notes)."""
    notes = reap_stale_runs(host, current=run_id)
    run_dirs = [posixpath.join(base, run_id) for base in runs_dirs(host)]
    for run_dir in run_dirs:
        host.makedirs(run_dir)
        host.write_bytes(posixpath.join(run_dir, "owner.json"), json.dumps(owner_record(owner_pid)).encode())
    return run_dirs, notes


def place_files(host: Host, name: str, files: dict[str, str], executable: tuple[str, ...] = ()) -> dict[str, str]:
    """Copy local ``files`` (remote name -> local path) to ``<workdir>/images/<name>/`` once,
    ``executable`` ones with mode 0755 (SFTP keeps no mode).

    Returns remote name -> path on the host. A local host uses the files where they are.
    """
    if host.spec.transport == "local":
        return dict(files)
    remote = posixpath.join(host.spec.workdir or host.default_workdir(), "images", name)
    placed = {key: posixpath.join(remote, key) for key in files}
    if not host.exists(posixpath.join(remote, "complete")):
        host.makedirs(remote)
        for key, local in files.items():
            host.put_file(local, placed[key])
        if executable:
            host.run(["chmod", "0755", *(placed[key] for key in executable)]).check()
        host.write_bytes(posixpath.join(remote, "complete"), b"")
    return placed
