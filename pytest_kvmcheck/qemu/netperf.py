"""Network speed between a guest and its host, over a tap NIC: kvmcheck-net at both ends.

The guest serves (``kvmcheck-net serve``, started once per VM on :data:`PORT`); the host's
copy of the same static program (placed beside the guest's kernel) is the client and does
the timing: bytes the guest confirmed receiving, bytes it sent, and round trips of one byte
one at a time (the request/response latency the handbook's "lowers latency" is about).
"""
from __future__ import annotations

import re
import threading
import statistics
from dataclasses import dataclass
from typing import Callable

from ..errors import CommandTimeout, VMError
from ..hosts.transport import Host
from ..waiting import poll
from .vm import VM

PORT = 47011


GIB = 1024 ** 3


@dataclass(frozen=True)
class LinkSpeed:
    """One NIC's numbers: Mbit/s each way, round-trip times in microseconds, and (where
    measured) the host CPU seconds QEMU's backends (its threads but the vCPUs', and its vhost
    workers) spent per GiB the streams moved."""

    to_guest_mbps: float
    from_guest_mbps: float
    median_us: float
    p99_us: float
    cpu_s_per_gib: float = 0.0

    def __str__(self) -> str:
        cpu = f", backend CPU {self.cpu_s_per_gib:.2f} s/GiB" if self.cpu_s_per_gib else ""
        return (f"to the guest {self.to_guest_mbps:.0f} Mbit/s, from it {self.from_guest_mbps:.0f} Mbit/s, "
                f"round trip median {self.median_us:.0f} us, p99 {self.p99_us:.0f} us{cpu}")


def _fields(pattern: str, text: str, what: str) -> tuple[str, ...]:
    match = re.fullmatch(pattern, text)
    if match is None:
        raise VMError(f"kvmcheck-net's {what} said {text.strip()[:200]!r}, not what it prints")
    return match.groups()


def parse_stream(text: str) -> tuple[int, float]:
    """(bytes, seconds) from ``bytes B seconds S``."""
    nbytes, seconds = _fields(r"bytes (\d+) seconds ([\d.]+)\s*", text, "stream")
    return int(nbytes), float(seconds)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


def parse_round_trips(text: str) -> tuple[float, float]:
    """(median, p99) in microseconds from ``count N median_us M p99_us P``."""
    median, p99 = _fields(r"count \d+ median_us ([\d.]+) p99_us ([\d.]+)\s*", text, "round trips")
    return float(median), float(p99)


def median_speed(runs: list[LinkSpeed]) -> LinkSpeed:
    """Each number's median over several runs (one slow run is noise, not the NIC)."""
    return LinkSpeed(*(statistics.median(getattr(r, f) for r in runs)
                       for f in ("to_guest_mbps", "from_guest_mbps", "median_us", "p99_us", "cpu_s_per_gib")))


class NetProbe:
    """kvmcheck-net serving in ``vm``; ``speed(address)`` measures the link to one of its addresses."""

    def __init__(self, vm: VM, host: Host, host_program: str):
        if not host_program:
            raise VMError(f"VM {vm.name}: the host has no kvmcheck-net (it comes with the tiny guest)")
        self.vm, self.host, self.program = vm, host, host_program
        vm.guest.start(f"exec kvmcheck-net serve {PORT}")

    def _client(self, mode: str, address: str, amount: float, timeout: float) -> str:
        result = self.host.run([self.program, mode, address, str(PORT), f"{amount:g}"], timeout=timeout)
        return result.check(f"kvmcheck-net {mode} from host {self.host.name} to {address}").stdout

    def stream_to_guest(self, address: str, seconds: float) -> tuple[int, float]:
        """Stream from the host to the guest for ``seconds``: (bytes the guest confirmed, seconds)."""
        return parse_stream(self._client("send", address, seconds, seconds + 60))

    def wait_ready(self, address: str, timeout: float = 30.0) -> None:
        """Until the guest's server answers on ``address`` (its NIC is up and it listens). An
        attempt that hangs (the SYN unanswered while the guest's NIC comes up, a loaded host)
        is one more "not yet", not the end of the wait."""
        last = ["no attempt finished"]

        def answers() -> bool:
            try:
                result = self.host.run([self.program, "rr", address, str(PORT), "1"], timeout=5)
            except CommandTimeout as exc:
                last[0] = str(exc)
                return False
            last[0] = (result.stderr or result.stdout).strip()[-200:] or f"exit status {result.exit_status}"
            return result.ok

        if not poll(answers, timeout, 0.2):
            raise VMError(f"VM {self.vm.name}: kvmcheck-net in the guest does not answer on {address}:{PORT} "
                          f"within {timeout:.0f} s (last attempt: {last[0]})")

    def speed(self, address: str, seconds: float = 2, round_trips: int = 2000,
              cpu: Callable[[], float] | None = None) -> LinkSpeed:
        """Stream ``seconds`` each way, then ``round_trips`` one-byte round trips; ``cpu`` (a
        reader of the host CPU seconds to count) is read around the streams."""
        cpu_before = cpu() if cpu else 0.0
        to_guest = self.stream_to_guest(address, seconds)
        from_guest = parse_stream(self._client("recv", address, seconds, seconds + 60))
        per_gib = (cpu() - cpu_before) / ((to_guest[0] + from_guest[0]) / GIB) if cpu else 0.0
        return LinkSpeed(mbps(*to_guest), mbps(*from_guest),
                         *parse_round_trips(self._client("rr", address, round_trips, 120)), cpu_s_per_gib=per_gib)


class Streaming:
    """A stream from the host to the guest's kvmcheck-net for ``seconds``, run in a thread
    while the test does something else (migrates the guest); :meth:`result` waits for it:
    (bytes the guest confirmed, seconds). A stream that broke raises the host's error."""

    def __init__(self, probe: NetProbe, address: str, seconds: float):
        self._outcome: list = []
        self._thread = threading.Thread(target=self._run, args=(probe, address, seconds), daemon=True)
        self._thread.start()
        self.seconds = seconds

    def _run(self, probe: NetProbe, address: str, seconds: float) -> None:
        try:
            self._outcome.append(probe.stream_to_guest(address, seconds))
        except BaseException as exc:  # handed to result(), in the test's thread
            self._outcome.append(exc)

    def result(self) -> tuple[int, float]:
        self._thread.join(self.seconds + 90)
        if not self._outcome:
            raise VMError(f"the host's stream to the guest did not end within {self.seconds + 90:.0f} s")
        if isinstance(self._outcome[0], BaseException):
            raise self._outcome[0]
        return self._outcome[0]
