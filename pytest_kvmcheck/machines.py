"""A machine's CPUs for a measurement: a run-wide reader-writer lock per physical machine.

A speed comparison must not share its machine with the run's other tests. In the lab run, with
two workers on one 2-core machine, a healthy host's virtio-net measured 1.21x e1000's throughput
(the check wants 1.3x) and vhost-net 1.05x the userspace NIC's (it wants 1.1x): the other
worker's guests took the CPU the faster NIC needed. So every kvmcheck test holds the machines
its hosts run on shared (:class:`MachineHold`), and a measurement runs in
:meth:`MachineHold.alone`: it starts once the tests running there have ended, and no other
starts there until it ends. Only the measurement is alone, not its guest's boot; hosts on other
machines go on.

A turnstile keeps a waiting measurement from being starved: a test takes it, briefly, before
its shared lock; a measurement holds it while it waits and runs. Several machines are locked in
name order, so two tests never wait on each other. The locks are ``flock`` on files in the
user's cache (:func:`~pytest_kvmcheck.paths.machine_locks_dir`), which every xdist worker of
the run sees, and every other run of the user on this controller: a measurement is alone also
beside another run's tests (a healthy switch-over measured beside other runs' guests in CI
took three times its downtime limit). A process that dies releases its locks with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)


class MachineHold:
    """Machines held shared from ``__enter__`` to ``__exit__`` (a test's setup to its
    teardown), alone for a while in :meth:`alone`."""

    def __init__(self, directory: Path, machines: Iterable[str]):
        self.directory = Path(directory)
        self.machines = sorted(set(machines))

    def _open(self, machine: str, kind: str) -> int:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", machine)
        return os.open(self.directory / f"machine-{safe}.{kind}", os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> "MachineHold":
        """Hold the machines shared; ``waited`` is how long another test's measurement kept
        them (a test's setup that took that long was not slow itself)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fds = [(self._open(m, "turnstile"), self._open(m, "lock")) for m in self.machines]
        started = time.monotonic()
        try:
            self._shared()
        except BaseException:  # interrupted while waiting (a time limit): no descriptor kept
            self.__exit__()
            raise
        self.waited = time.monotonic() - started
        if self.waited >= 1:
            log.info("machines %s: held after waiting %.1f s", ", ".join(self.machines), self.waited)
        return self

    def __exit__(self, *exc) -> None:
        for turnstile, lock in self._fds:
            os.close(lock)  # closing releases the lock
            os.close(turnstile)

    def _shared(self) -> None:
        for turnstile, lock in self._fds:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_SH)
            finally:
                fcntl.flock(turnstile, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def alone(self) -> Iterator[float]:
        """The block runs alone on the machines; yields the seconds it waited for them. The
        shared hold is let go first (two tests upgrading in place would wait on each other)
        and taken again after."""
        for _, lock in self._fds:
            fcntl.flock(lock, fcntl.LOCK_UN)
        started = time.monotonic()
        held = []
        try:
            for turnstile, lock in self._fds:
                fcntl.flock(turnstile, fcntl.LOCK_EX)
                held.append(turnstile)
                fcntl.flock(lock, fcntl.LOCK_EX)
                held.append(lock)
            waited = time.monotonic() - started
            log.info("machines %s: alone after waiting %.1f s", ", ".join(self.machines), waited)
            yield waited
        finally:
            for fd in reversed(held):
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._shared()

