"""A machine's CPUs for a measurement: a run-wide reader-writer lock per physical machine.

A test that compares speeds (``@pytest.mark.kvm_exclusive``) must not share its machine with the
run's other tests. In the lab run, with two workers on one 2-core machine, a healthy host's
virtio-net measured 1.21x e1000's throughput (the check wants 1.3x) and vhost-net 1.05x the
userspace NIC's efficiency (it wants 1.1x): the other worker's guests took the CPU the faster
NIC needed. So every kvmcheck test holds the locks of the machines its hosts run on shared,
and a ``kvm_exclusive`` test holds them exclusively: it starts once the tests already running
there have ended, and no other starts there until it ends. Hosts on other machines go on.

A turnstile keeps a waiting measurement from being starved: a test takes it, briefly, before
its shared lock; a measurement holds it while it waits and runs. Several machines are locked in
name order, so two tests never wait on each other. The locks are ``flock`` on files in the
run's state directory, which every xdist worker of the run sees; a worker that dies releases
its locks with its process.
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


class MachineLocks:
    """The run's per-machine locks, in ``directory``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _file(self, machine: str, kind: str) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", machine)
        return os.open(self.directory / f"machine-{safe}.{kind}", os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def hold(self, machines: Iterable[str], exclusive: bool = False) -> Iterator[float]:
        """Hold ``machines`` shared (or exclusively) for the ``with`` block; yields the seconds
        spent waiting for them."""
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            for machine in sorted(set(machines)):
                turnstile = self._file(machine, "turnstile")
                stack.callback(os.close, turnstile)
                lock = self._file(machine, "lock")
                stack.callback(os.close, lock)
                fcntl.flock(turnstile, fcntl.LOCK_EX)
                if exclusive:
                    stack.callback(fcntl.flock, turnstile, fcntl.LOCK_UN)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                else:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_SH)
                    finally:
                        fcntl.flock(turnstile, fcntl.LOCK_UN)
                stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
            waited = time.monotonic() - started
            if exclusive:
                log.info("machines %s: alone after waiting %.1f s", ", ".join(sorted(set(machines))), waited)
            yield waited
