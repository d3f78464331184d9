"""Cutting a host's power: its spec's ``power_cycle=`` command, run on this machine.

A power loss is what durability is about: a host's page cache goes with it, which no signal
to QEMU can show. The command (a BMC's ``chassis power cycle``, the lab's ``kvmcheck lab
power-cycle lab-power``) cuts the power and turns it back on; the host is back when it
answers with a new boot id.
"""
from __future__ import annotations

import subprocess
import time

from ..errors import HostError, HostKeyUnknown, KvmCheckError
from .transport import Host

BOOT_ID = "/proc/sys/kernel/random/boot_id"
POLL_S = 1.0  # between asks for the boot id while the host is away


def power_cycle(host: Host, timeout: float = 600.0) -> float:
    """Power-cycle ``host`` and wait until it is back; returns the seconds it took.
    Every VM there is gone: their objects must be told (``VM.lost``)."""
    command = list(host.spec.power_cycle)
    if not command:
        raise HostError(f"host {host.name}: no power_cycle= command in its spec")
    before = host.read_text(BOOT_ID).strip()
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"host {host.name}: power_cycle command {command[0]!r} did not run: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()
        raise HostError(f"host {host.name}: power_cycle command failed (exit {done.returncode}): "
                        f"{said[-1500:] if said else 'no output'}")
    host.close()  # its connection died with the host
    deadline = started + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            now = host.read_text(BOOT_ID).strip()
            if now and now != before:
                return time.monotonic() - started
            last = "it answers with the boot id it had before: the power was not cut"
        except HostKeyUnknown as exc:  # back, but not as the host it was: no use waiting on
            raise HostError(f"host {host.name} came back from its power cycle with another SSH host key: {exc}") from None
        except KvmCheckError as exc:
            last = str(exc)
        time.sleep(POLL_S)
    raise HostError(f"host {host.name}: not back within {timeout:.0f} s of its power cycle ({last})")
