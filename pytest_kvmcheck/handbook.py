"""The handbook's 2016 commands against today's QEMU: does the host's QEMU still take them?

Suites use :func:`try_options` to run the host's QEMU with a legacy option (no guest:
``-machine none``, quit at once over QMP on stdin) and :func:`describe` to put the
table's verdict into the report.
"""
from __future__ import annotations

import json
import posixpath
import secrets

from .errors import QMPLost
from .monitor import Monitor
from .session import PreparedHost
from .transport import CommandResult
from .vm import poll
from .vmspec import LEGACY_FORMS, LegacyForm

_QUIT = json.dumps({"execute": "qmp_capabilities"}) + "\n" + json.dumps({"execute": "quit"}) + "\n"


def form(legacy: str) -> LegacyForm:
    """The table row whose legacy form starts with ``legacy``."""
    for row in LEGACY_FORMS:
        if row.legacy.startswith(legacy):
            return row
    raise KeyError(f"no handbook form {legacy!r} in LEGACY_FORMS")


def try_options(host: PreparedHost, options: list[str]) -> CommandResult:
    """Start the host's QEMU with ``options`` and no guest; exit status 0 means accepted."""
    argv = [host.spec.qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", "stdio", *options]
    return host.transport.run(argv, timeout=30, input=_QUIT)


def qmp_answers(host: PreparedHost, *commands: str) -> list:
    """Ask the host's QEMU (no guest) QMP ``commands``; their ``return`` values in order.

    QEMU runs daemonized with its monitor on a unix socket, and is told to quit only once
    every answer is in: a ``quit`` written right behind a long answer on stdio could end
    QEMU before the answer was flushed (a cut-off schema).
    """
    transport = host.transport
    directory = posixpath.join(host.host_run.run_dir, f"noguest-{secrets.token_hex(4)}")
    sock, pidfile = posixpath.join(directory, "qmp.sock"), posixpath.join(directory, "qemu.pid")
    argv = [host.spec.qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", pidfile, "-daemonize"]
    transport.makedirs(directory)
    pid = None
    try:
        transport.run(argv, timeout=30).check(f"QEMU without a guest on {host.name}")
        pid = int(transport.read_text(pidfile).strip())
        monitor = Monitor(transport.connect_unix(sock), f"QEMU without a guest on {host.name}")
        try:
            answers = [monitor.cmd(command) for command in commands]
            try:
                monitor.cmd("quit")
            except QMPLost:  # QEMU may close the socket before it answers
                pass
        finally:
            monitor.close()
        return answers
    finally:
        if pid is not None and not poll(lambda: not transport.pid_alive(pid), 5.0):
            transport.kill(pid, "KILL")
        transport.remove_tree(directory)


def command_arguments(host: PreparedHost, command: str) -> set[str]:
    """The argument names the host's QEMU accepts for a QMP command (from its schema)."""
    (schema,) = qmp_answers(host, "query-qmp-schema")
    by_name = {entry["name"]: entry for entry in schema}
    entry = by_name.get(command)
    if entry is None:
        return set()
    return {m["name"] for m in by_name[entry["arg-type"]].get("members", [])}


def describe(row: LegacyForm) -> str:
    return f"handbook: {row.legacy} -> today: {row.modern} ({row.status} since {row.since}; {row.note})"
