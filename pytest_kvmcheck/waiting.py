"""Waiting with a deadline instead of sleeping: :func:`poll` and :func:`wait_until`.

A leaf module: every layer polls (a guest's console, a host's pid, a QMP status).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from .errors import WaitTimeout

T = TypeVar("T")


def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(read: Callable[[], T], timeout: float, what: str, done: Callable[[T], object] = bool,
               show: Callable[[T], str] = repr, interval: float = 0.1, stall: float | None = None) -> T:
    """Call ``read`` until ``done(value)`` holds; return that value.

    At ``timeout`` raise :class:`WaitTimeout` (the check's FAIL: the host did not do what it
    must in time), saying ``what`` was awaited and the last value seen, as ``show`` puts it.
    With ``stall``, the wait also ends when the value has not changed for ``stall`` seconds,
    and ``timeout`` only bounds the whole: a slow host that keeps moving (a balloon inflating
    under nested KVM) gets its time, a stuck one fails early.
    """
    started = changed = time.monotonic()
    last: list = []
    while True:
        value = read()
        now = time.monotonic()
        if not last or value != last[0]:
            changed = now
        last[:] = [value]
        if done(value):
            return value
        if now - started >= timeout or (stall is not None and now - changed >= stall):
            why = f"nothing changed for {now - changed:.0f} s" if stall is not None and now - started < timeout \
                else f"not within {timeout:g} s"
            raise WaitTimeout(f"{what}: {why}; last seen: {show(value)}")
        time.sleep(interval)
