"""The handbook's 2016 commands against today's QEMU: does the host's QEMU still take them?

Suites use :func:`try_options` to run the host's QEMU with a legacy option (no guest:
``-machine none``, quit at once over QMP on stdin) and :func:`describe` to put the
table's verdict into the report.
"""
from __future__ import annotations

import json

from .session import PreparedHost
from .transport import CommandResult
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
    """Ask the host's QEMU (no guest) QMP ``commands``; their ``return`` values in order."""
    script = "".join(json.dumps({"execute": c}) + "\n" for c in ("qmp_capabilities", *commands, "quit"))
    argv = [host.spec.qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"]
    out = host.transport.run(argv, timeout=30, input=script).check(f"QEMU on {host.name}").stdout
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    returns = [a["return"] for a in answers if "return" in a]
    return returns[1:1 + len(commands)]


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
