"""The QEMU monitor of one VM: QMP through qemu.qmp, HMP through human-monitor-command.

A thin layer over qemu.qmp's synchronous adapter that keeps a transcript (attached to
reports, and logged to the ``pytest_kvmcheck.qemu.monitor`` logger), turns QMP errors into
:class:`QMPCommandError` and a broken connection into :class:`QMPLost`, and waits for events
with a deadline. Arguments are Python keywords: ``node_name=`` is sent as ``node-name``, as
QEMU's own ``QEMUMachine.qmp`` does; a dict passes names that must keep an underscore.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any, Callable

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import EventTimeout, QMPCommandError, QMPLost, QMPTimeout

__all__ = ["Monitor", "QMPCommandError"]

READ_LIMIT = 16 * 1024 * 1024  # one QMP message, at most
log = logging.getLogger(__name__)


def qmp_arguments(args: dict | None, keywords: dict) -> dict:
    """``args`` as given, then ``keywords`` with ``_`` turned into ``-`` (QMP's own spelling)."""
    out = dict(args or {})
    out.update({key.replace("_", "-"): value for key, value in keywords.items()})
    return out


def event_matches(event: dict, match: dict | Callable[[dict], bool] | None) -> bool:
    """Whether ``event`` has every key and value of ``match`` (nested dicts compared the same way)."""
    if match is None:
        return True
    if callable(match):
        return bool(match(event))
    for key, want in match.items():
        if key not in event:
            return False
        have = event[key]
        if isinstance(want, dict):
            if not isinstance(have, dict) or not event_matches(have, want):
                return False
        elif have != want:
            return False
    return True


class Monitor:
    def __init__(self, sock: socket.socket, vm_name: str, timeout: float = 30.0,
                 diagnose: Callable[[], str] = lambda: "QEMU probably exited: see its console log"):
        """``diagnose`` says, once the connection broke or a command went unanswered, what
        became of QEMU (exited, or still running), for the error's message."""
        self.vm_name = vm_name
        self._diagnose = diagnose
        self.transcript: list[str] = []
        self._events: list[dict] = []
        self._qmp = QEMUMonitorProtocol(sock)
        # qemu.qmp reads at most 64 KiB a message by default; query-qmp-schema is several times
        # that. The legacy wrapper does not pass readbuflen on, so set it on its client.
        self._qmp._qmp.readbuflen = READ_LIMIT
        self.timeout = timeout
        try:
            greeting = self._qmp.connect(negotiate=True)
        except (QMPError, OSError, EOFError) as exc:
            raise QMPLost(f"VM {vm_name}: no QMP greeting: {exc}") from None
        self._log("<-", greeting)

    @property
    def timeout(self) -> float:
        """Seconds a command may go unanswered before :class:`QMPTimeout`."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        self._qmp.settimeout(seconds)

    def _log(self, direction: str, message: Any) -> None:
        stamp = time.strftime("%H:%M:%S")
        text = json.dumps(message, default=str)
        self.transcript.append(f"{stamp} {direction} {text}")
        log.debug("%s %s %s", self.vm_name, direction, text if len(text) < 2000 else text[:2000] + " ...")

    def cmd(self, name: str, args: dict | None = None, /, **keywords: Any) -> Any:
        """Run a QMP command and return its ``return`` value.

        ``cmd("blockdev-del", node_name="d0")`` sends ``{"node-name": "d0"}``; names with an
        underscore of their own (some device properties) go in ``args``, sent as they are.
        """
        return self._execute(name, qmp_arguments(args, keywords), oob=False)

    def cmd_within(self, timeout: float, name: str, args: dict | None = None, /, **keywords: Any) -> Any:
        """:meth:`cmd` with its own answer timeout, for a command QEMU answers only after slow
        work in its main loop (``snapshot-save`` answers once the guest's RAM is written)."""
        return self._execute(name, qmp_arguments(args, keywords), oob=False, timeout=timeout)

    def cmd_oob(self, name: str, args: dict | None = None, /, **keywords: Any) -> Any:
        """Run a QMP command out of band (``exec-oob``): QEMU's monitor thread answers it even
        while the main thread is blocked, as a destination's is in a paused postcopy
        (``migrate-recover``, ``migrate-pause``). Needs a QEMU that offered the oob capability."""
        return self._execute(name, qmp_arguments(args, keywords), oob=True)

    def _execute(self, name: str, args: dict, oob: bool, timeout: float | None = None) -> Any:
        timeout = timeout or self.timeout
        verb = "exec-oob" if oob else "execute"
        self._log("->", {verb: name, "arguments": args} if args else {verb: name})
        try:
            result = self._qmp._sync(self._qmp._qmp.execute(name, args, oob=oob), timeout)
        except ExecuteError as exc:
            # qemu.qmp: error_class is QEMU's class, str(exc) its desc (error.error.desc).
            desc = str(exc)
            self._log("<-", {"error": {"class": exc.error_class, "desc": desc}})
            raise QMPCommandError(name, desc, exc.error_class) from None
        except (asyncio.TimeoutError, TimeoutError):
            self._log("!!", f"no answer within {timeout:.0f} s")
            raise QMPTimeout(f"VM {self.vm_name}: QEMU did not answer QMP {name} within {timeout:.0f} s; "
                             f"{self._diagnose()}") from None
        except (QMPError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
            self._log("!!", f"connection lost: {type(exc).__name__}: {exc}")
            raise QMPLost(f"VM {self.vm_name}: QMP connection lost during {name} "
                          f"({type(exc).__name__}: {exc}); {self._diagnose()}") from None
        self._log("<-", {"return": result})
        return result

    def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """Run an HMP command (as the handbook types them) and return its text output; ``timeout``
        for one that does a job's work before it answers (``savevm`` writes all guest RAM)."""
        return self._execute("human-monitor-command", {"command-line": command_line}, oob=False, timeout=timeout)

    def _drain(self, wait: float = 0.0) -> None:
        try:
            for event in self._qmp.get_events(wait=wait):
                self._log("<-", event)
                self._events.append(event)
        except asyncio.TimeoutError:
            pass
        except (QMPError, OSError, EOFError) as exc:
            raise QMPLost(f"VM {self.vm_name}: QMP connection lost while waiting for events: {exc}") from None

    def events(self, name: str | None = None) -> list[dict]:
        """Events received so far (optionally only those called ``name``)."""
        self._drain()
        return [e for e in self._events if name is None or e.get("event") == name]

    def clear_events(self) -> None:
        self._drain()
        self._events.clear()

    def wait_event(self, name: str, timeout: float = 10.0,
                   match: dict | Callable[[dict], bool] | None = None) -> dict:
        """Wait for an event ``name`` (seen since the last clear_events) until ``timeout``.

        ``match`` narrows it: ``{"data": {"device": "nic1"}}`` (every key and value present),
        or a predicate over the event.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            for event in self._events:
                if event.get("event") == name and event_matches(event, match):
                    self._events.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                what = f" matching {match}" if isinstance(match, dict) else ""
                raise EventTimeout(f"VM {self.vm_name}: no {name} event{what} within {timeout:.1f} s")
            self._drain(wait=min(left, 0.5))

    def close(self) -> None:
        try:
            self._qmp.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
            pass
