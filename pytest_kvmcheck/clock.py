"""Comparing clocks across machines: a remote clock read over a command, against this one.

A remote read takes a round trip, so each reading is bracketed by this machine's clock
before and after; the remote instant lies somewhere in between. Of several readings the one
with the shortest round trip is kept (the least uncertain), as NTP does with its samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Offset:
    """A remote clock minus this machine's, give or take ``uncertainty`` (seconds)."""

    seconds: float
    uncertainty: float

    def __sub__(self, other: "Offset") -> "Offset":
        return Offset(self.seconds - other.seconds, self.uncertainty + other.uncertainty)

    def __str__(self) -> str:
        return f"{self.seconds * 1000:+.1f} ms (±{self.uncertainty * 1000:.1f} ms)"


def best_offset(samples: list[tuple[float, float, float]]) -> Offset:
    """From (here before, remote, here after) readings, the offset of the shortest round trip."""
    before, remote, after = min(samples, key=lambda s: s[2] - s[0])
    return Offset(remote - (before + after) / 2, (after - before) / 2)


def measure_offset(read_remote: Callable[[], float], samples: int = 5,
                   here: Callable[[], float] = time.time) -> Offset:
    """The offset of the clock ``read_remote`` returns (seconds since the epoch) from ``here``."""
    readings = []
    for _ in range(samples):
        before = here()
        remote = read_remote()
        readings.append((before, remote, here()))
    return best_offset(readings)


def event_time(event: dict) -> float:
    """A QMP event's time: seconds since the epoch by the clock of the host its QEMU runs on."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def parse_wall_clock(text: str) -> float:
    """Seconds since the epoch from ``date +%s.%N`` output, or from busybox ``adjtimex``
    (tv_sec and tv_usec), the one with sub-second digits where busybox's date has none."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "time.tv_sec" in {k.strip() for k in fields}:
        values = {k.strip(): v.split()[0] for k, v in fields.items()}
        return int(values["time.tv_sec"]) + int(values["time.tv_usec"]) / 1e6
    value = text.strip().replace(",", ".")  # bash's $EPOCHREALTIME takes the locale's decimal point
    if not value or "%" in value:
        raise ValueError(f"not a wall clock reading: {text!r}")
    return float(value)
