"""Host settings a test changes and must give back: sysfs knobs and device bindings.

A test that turns a host-wide knob takes a :class:`SysfsSettings` first: it records the
values, writes new ones through the host's transport (``tee``, an argv: no shell), and
:meth:`SysfsSettings.restore` writes the recorded values back and checks they took. A test
that assigns a PCI device takes a :class:`VfioBinding`: only devices the host's inventory
lists as assignable, handed to vfio-pci and back to the driver they had. A run leaves every
host as it found it, and says so when it cannot.

Before its first change, each writes how to undo it to a :class:`ChangeJournal` on the host
itself (never on shared storage: another host must not replay it), and removes the entry
once the restore is verified. A run that was killed leaves its entry behind:
:func:`replay_stale_changes` (at the start of the next run there, and in ``kvmcheck
cleanup``) undoes it. Tests that make such changes carry ``@pytest.mark.kvm_changes_host``
and run only where the host's spec allows it (``allow_host_changes``).
"""
from __future__ import annotations

import json
import os
import posixpath
import secrets
import socket
import time

from ..errors import HostError
from .footprint import owner_is_dead, owner_record
from .transport import Host

JOURNAL_DIR = "/tmp/kvmcheck-host-changes"  # on the host's own /tmp: each host replays only its own

LOCK_STALE_S = 1800.0  # a lock older than this was left by a run that was killed
LOCK_WAIT_S = 900.0


class HostLock:
    """A named mutex on one host, across processes, xdist workers and runs.

    Host-wide knobs (KSM) and devices (a PCI function) must have one user at a time: two
    runs on one machine, or two workers of one run, would otherwise undo each other.
    ``mkdir`` is atomic on every filesystem, so the lock is a directory in the host's /tmp.
    """

    def __init__(self, host: Host, name: str, wait: float = LOCK_WAIT_S):
        self.host, self.name, self.wait = host, name, wait
        self.path = f"/tmp/kvmcheck-lock-{name.replace('/', '_')}"
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"

    def _age(self) -> float | None:
        now = self.host.run(["date", "+%s"], timeout=30).stdout.strip()
        made = self.host.run(["stat", "-c", "%Y", self.path], timeout=30).stdout.strip()
        return float(now) - float(made) if now.isdigit() and made.isdigit() else None

    def __enter__(self) -> "HostLock":
        deadline = time.monotonic() + self.wait
        while not self.host.run(["mkdir", self.path], timeout=30).ok:
            age = self._age()
            if age is not None and age > LOCK_STALE_S:
                self.host.remove_tree(self.path)  # its run was killed: nothing releases it
                continue
            if time.monotonic() > deadline:
                holder = self.host.read_text(f"{self.path}/owner", default="unknown").strip()
                raise HostError(f"host {self.host.name}: {self.name} is in use by another kvmcheck run ({holder}) "
                                f"for over {self.wait:.0f} s; if that run is gone, remove {self.path} on the host")
            time.sleep(0.5)
        self.host.write_bytes(f"{self.path}/owner", self.owner.encode())
        return self

    def __exit__(self, *exc) -> None:
        self.host.remove_tree(self.path)


def write_sysfs(host: Host, path: str, value) -> None:
    result = host.run(["tee", path], input=f"{value}\n", timeout=60, root=True)
    if not result.ok:
        raise HostError(f"host {host.name}: cannot write {str(value)!r} to {path}: "
                        f"{result.stderr.strip() or 'exit ' + str(result.exit_status)} "
                        f"(the test needs root on the host and a writable /sys)")


class ChangeJournal:
    """How to undo one test's host-wide changes, kept on the host until they are undone."""

    def __init__(self, host: Host, what: str):
        self.host, self.what = host, what
        self.path = posixpath.join(JOURNAL_DIR, f"{secrets.token_hex(8)}.json")
        self.undo: list[dict] = []

    def record(self, *steps: dict) -> None:
        """Add undo steps (run last first) and write the entry, before the change is made."""
        self.undo += steps
        entry = json.dumps({"owner": owner_record(), "what": self.what, "undo": self.undo})
        self.host.run(["mkdir", "-p", JOURNAL_DIR], timeout=30, root=True).check(f"mkdir {JOURNAL_DIR}")
        self.host.run(["tee", self.path], input=entry, timeout=30, root=True).check(f"writing {self.path}")

    def done(self) -> None:
        """The changes are undone and verified: nothing to replay."""
        self.undo = []
        self.host.run(["rm", "-f", self.path], timeout=30, root=True)


def undo(host: Host, step: dict) -> str:
    """Carry out one undo step; return what is wrong afterwards ("" when it took)."""
    if step["kind"] == "sysfs":
        write_sysfs(host, step["path"], step["value"])
        now = host.read_text(step["path"], default="").strip()
        return "" if step.get("verify") is False or now == str(step["value"]) else \
            f"{step['path']} is {now!r}, not {step['value']!r}"
    if step["kind"] == "binding":
        now = give_back(host, step["bdf"], step["driver"])
        return "" if now == step["driver"] else f"{step['bdf']} is on {now or 'no driver'}, not {step['driver']}"
    raise ValueError(f"unknown undo step {step!r}")


def replay_stale_changes(host: Host) -> list[str]:
    """Undo what killed runs changed on ``host`` and did not give back; return notes."""
    notes = []
    for name in host.listdir(JOURNAL_DIR):
        path = posixpath.join(JOURNAL_DIR, name)
        try:
            entry = json.loads(host.read_text(path, default="{}"))
        except ValueError:
            entry = {}
        if entry and not owner_is_dead(entry.get("owner", {})):
            continue  # a live test's changes: it gives them back itself
        wrong = []
        for step in reversed(entry.get("undo", [])):
            try:
                wrong.append(undo(host, step))
            except HostError as exc:  # one knob that will not take its value must not stop the rest
                wrong.append(str(exc))
        wrong = [problem for problem in wrong if problem]
        if wrong:
            notes.append(f"could not undo what a killed run changed ({entry.get('what')}): {'; '.join(wrong)}; "
                         f"the record stays in {path}")
            continue
        host.run(["rm", "-f", path], timeout=30, root=True)
        if entry.get("undo"):
            notes.append(f"undid what a killed run changed ({entry.get('what')})")
    return notes


def link_name(host: Host, path: str) -> str:
    """The last part of a sysfs symlink's target (a driver, an IOMMU group), "" if there is none."""
    result = host.run(["readlink", path], timeout=30)
    return posixpath.basename(result.stdout.strip()) if result.ok else ""


class SysfsSettings:
    """Knobs in one sysfs directory, recorded before a test changes them and given back.

    ``restore_first`` is written before the recorded values go back, for each of its knobs the
    test wrote (KSM's ``run=2`` stops ksmd and unmerges; ``sriov_numvfs=0`` must precede
    another VF count); it is not checked.
    """

    def __init__(self, host: Host, directory: str, names: tuple[str, ...], restore_first: dict | None = None):
        self.host, self.directory, self.names = host, directory, names
        self.restore_first = dict(restore_first or {})
        self.original = {name: self.read(name) for name in names}
        self.changed = False
        self.written: set[str] = set()
        self.journal = ChangeJournal(host, f"{', '.join(names)} in {directory}")

    def path(self, name: str) -> str:
        return posixpath.join(self.directory, name)

    def read(self, name: str) -> str:
        return self.host.read_text(self.path(name)).strip()

    def read_int(self, name: str) -> int:
        return int(self.read(name))

    def write(self, name: str, value) -> None:
        # Undo steps run last first: restore_first's (recorded later), then the original values.
        if not self.changed:
            self.journal.record(*({"kind": "sysfs", "path": self.path(n), "value": self.original[n]}
                                  for n in self.names))
        if name in self.restore_first and name not in self.written:
            self.journal.record({"kind": "sysfs", "path": self.path(name), "value": self.restore_first[name],
                                 "verify": False})
        write_sysfs(self.host, self.path(name), value)
        self.changed = True
        self.written.add(name)

    def restore(self) -> dict[str, tuple[str, str]]:
        """Write the recorded values back (``restore_first`` first); return what differs."""
        if not self.changed:
            return {}
        for name, value in self.restore_first.items():
            if name in self.written:
                write_sysfs(self.host, self.path(name), value)
        for name in reversed(self.names):
            if self.read(name) != self.original[name]:
                write_sysfs(self.host, self.path(name), self.original[name])
        self.changed = False
        self.written.clear()
        left = {name: (self.original[name], now) for name in self.names
                if (now := self.read(name)) != self.original[name]}
        if not left:
            self.journal.done()
        return left


class NotAssignable(HostError):
    """A test asked for a device the host's inventory does not list as assignable."""


class VfioBinding:
    """One assignable PCI device, handed to vfio-pci for a guest and given back afterwards.

    The modern form of the handbook's pci-stub steps: ``driver_override`` names vfio-pci,
    the device is unbound from its driver and ``drivers_probe`` binds it; :meth:`restore`
    clears the override and probes again, so the original driver takes it back.
    """

    def __init__(self, host: Host, bdf: str, assignable: tuple[str, ...] | list[str]):
        self.host, self.bdf, self.assignable = host, bdf, tuple(assignable)
        self.dev = f"/sys/bus/pci/devices/{bdf}"
        if not host.exists(self.dev):
            raise HostError(f"host {host.name}: the assignable device {bdf} does not exist ({self.dev})")
        self.original_driver = self.driver()
        self.bound = False
        self.lock = HostLock(host, f"pci-{bdf}")
        self.journal = ChangeJournal(host, f"{bdf} bound to vfio-pci (from {self.original_driver or 'no driver'})")

    def driver(self) -> str:
        return link_name(self.host, f"{self.dev}/driver")

    @property
    def ids(self) -> str:
        """``vendor:device`` as lspci -n shows it."""
        read = lambda name: self.host.read_text(f"{self.dev}/{name}").strip().removeprefix("0x")  # noqa: E731
        return f"{read('vendor')}:{read('device')}"

    @property
    def iommu_group(self) -> str:
        return link_name(self.host, f"{self.dev}/iommu_group")

    def group_members(self) -> dict[str, str]:
        """Every device in the IOMMU group, with its driver ("" for none)."""
        group = f"/sys/kernel/iommu_groups/{self.iommu_group}/devices"
        return {bdf: link_name(self.host, f"{group}/{bdf}/driver") for bdf in self.host.listdir(group)}

    def bind(self) -> "VfioBinding":
        """Hand the device to vfio-pci; a device the inventory does not list is refused first,
        before any lock is taken or anything is written."""
        if self.bdf not in self.assignable:
            raise NotAssignable(f"host {self.host.name}: {self.bdf} is not listed as assignable (assignable= in the "
                                f"host spec lists {', '.join(self.assignable) or 'nothing'}); refusing to touch it")
        if not self.bound:
            self.lock.__enter__()  # one test at a time holds a device
            self.journal.record({"kind": "binding", "bdf": self.bdf, "driver": self.original_driver})
        self.bound = True
        write_sysfs(self.host, f"{self.dev}/driver_override", "vfio-pci")
        if self.original_driver and self.original_driver != "vfio-pci":
            write_sysfs(self.host, f"{self.dev}/driver/unbind", self.bdf)
        if self.driver() != "vfio-pci":
            write_sysfs(self.host, "/sys/bus/pci/drivers_probe", self.bdf)
        if self.driver() != "vfio-pci":
            raise HostError(f"host {self.host.name}: {self.bdf} did not bind to vfio-pci (driver now "
                            f"{self.driver() or 'none'}): is the vfio-pci module loaded?")
        return self

    def restore(self) -> str:
        """Give the device back to its original driver; return the driver it has now."""
        if not self.bound:
            return self.driver()
        now = give_back(self.host, self.bdf, self.original_driver)
        self.bound = False
        if now == self.original_driver:
            self.journal.done()
        self.lock.__exit__(None, None, None)
        return now

    def __enter__(self) -> "VfioBinding":
        return self.bind()

    def __exit__(self, *exc) -> None:
        now = self.restore()
        if exc[0] is None and now != self.original_driver:
            raise HostError(f"host {self.host.name}: {self.bdf} should be back on {self.original_driver or 'no driver'}, "
                            f"it is on {now or 'no driver'}")


def give_back(host: Host, bdf: str, driver: str) -> str:
    """Hand PCI device ``bdf`` from vfio-pci back to ``driver``; return the driver it has now."""
    dev = f"/sys/bus/pci/devices/{bdf}"
    if link_name(host, f"{dev}/driver") == "vfio-pci" and driver != "vfio-pci":
        write_sysfs(host, f"{dev}/driver/unbind", bdf)
    write_sysfs(host, f"{dev}/driver_override", "")
    if driver and link_name(host, f"{dev}/driver") != driver:
        write_sysfs(host, "/sys/bus/pci/drivers_probe", bdf)
    return link_name(host, f"{dev}/driver")
