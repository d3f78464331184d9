"""The error hierarchy: every error's message says what went wrong and what to do.

Catch :class:`KvmCheckError` to handle anything this package raises on purpose;
the plugin turns these into one clear line (a usage error, a skip or a failure)
instead of a traceback.

Each class carries the verdict a test that ends on it gets (see :mod:`.verdicts`):
``FAIL`` when the host contradicted the check (QEMU refused what must work, QEMU died
under the test, a migration failed), ``ERROR`` when no verdict could be reached (the host
is unreachable, QEMU would not start, a guest never booted, a premise did not hold).
Anything else a test raises that is not an assertion is a bug of kvmcheck: ``BROKEN``.
"""
from __future__ import annotations


class KvmCheckError(Exception):
    """Base class of every error pytest-kvmcheck raises deliberately."""

    verdict = "ERROR"


class HostSpecError(KvmCheckError, ValueError):
    """A ``--kvm-hosts`` entry or inventory file is malformed."""


class HostError(KvmCheckError):
    """A host could not be used (unreachable, refused, missing tools)."""


class HostUnreachable(HostError):
    """The transport could not connect to the host."""


class HostKeyUnknown(HostUnreachable):
    """The SSH host key is not in known_hosts (or does not match)."""


class CommandTimeout(HostError):
    """A command on a host did not finish before its deadline."""


class QemuNotFound(HostError):
    """The host has no usable QEMU binary at the configured path."""


class ImageBuildError(KvmCheckError):
    """The guest image could not be built from the configured package sources."""


class VMError(KvmCheckError):
    """A VM could not be started, reached or stopped."""


class GuestLoginError(VMError):
    """The guest's SSH login did not complete: the connection closed or timed out before
    authentication. Transient just after a boot or a restore (the guest's network is not yet
    answering through QEMU), so callers try again within a deadline; a refused host key or
    key is a :class:`VMError`, never retried."""


class GuestBootError(VMError):
    """The guest did not reach its ready marker before the deadline.

    The message carries the tail of the serial console and QEMU's stderr.
    """


class PremiseError(KvmCheckError):
    """A premise the check needs could not be established on this host: no verdict.

    The message names the premise and what was measured (a dirty rate, a free slot, ...).
    """


def premise(condition: object, message: str) -> None:
    """Raise :class:`PremiseError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise PremiseError(message)


class MigrationFailed(VMError):
    """A migration failed or was cancelled; ``info`` is query-migrate's last answer."""

    verdict = "FAIL"

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


class MigrationDidNotConverge(MigrationFailed):
    """The guest dirtied memory faster than it was sent: cancelled at the deadline."""


class GuestCrashed(VMError):
    """A guest that ran answers no more, and its kernel reported a crash or a stalled CPU on
    its serial console (the message has the report): the host broke a running guest (our
    guest image boots and runs clean on a sound host)."""

    verdict = "FAIL"


class QemuExited(VMError):
    """QEMU exited while the check still needed its guest: it crashed or was killed, or its
    guest's kernel panicked (kvmcheck's guests run with ``panic=-1`` and ``-no-reboot``, so
    QEMU ends with them). The message carries QEMU's stderr and the serial console's tail."""

    verdict = "FAIL"


class QMPLost(VMError):
    """The QMP connection to a running VM broke (QEMU died or was killed)."""

    verdict = "FAIL"


class QMPTimeout(QMPLost):
    """QEMU did not answer a QMP command in time: hung in it (the message says whether QEMU
    still runs, and where its main thread waits)."""


class QMPCommandError(VMError):
    """QEMU answered a QMP command with an error: QEMU's ``class`` and ``desc`` are kept."""

    verdict = "FAIL"

    def __init__(self, command: str, desc: str, error_class: str = ""):
        super().__init__(f"QMP {command} refused by QEMU: {error_class + ': ' if error_class else ''}{desc}")
        self.command, self.desc, self.error_class = command, desc, error_class


class GuestCommandError(VMError):
    """A command in the guest failed where success was required.

    The guest image is ours: a program it lacks (exit 126/127) or a usage error the shell
    or a tool reports is a bug of kvmcheck (BROKEN), not the host's failure.
    """

    verdict = "FAIL"
    _USAGE = ("usage:", "invalid option", "illegal option", "unrecognized option", "invalid number", "syntax error")

    def __init__(self, message: str, exit_status: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.exit_status = exit_status
        if exit_status in (126, 127) or any(word in stderr.lower() for word in self._USAGE):
            self.verdict = "BROKEN"


class WaitTimeout(KvmCheckError, AssertionError):
    """Something the check waited for did not happen in time; the message has the last value seen."""

    verdict = "FAIL"


class EventTimeout(VMError):
    """QEMU did not emit an event the check waited for: the host did not do what it must."""

    verdict = "FAIL"


class LabError(KvmCheckError):
    """The virtual KVM lab could not be brought up (or down); the message says why."""


def again(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to raise once more (a module's shared guest that failed to boot, for each
    test that needs it): same class, message and attributes, no traceback of its own yet.
    Raising the stored one again would pile every test's traceback onto it."""
    clone = type(exc).__new__(type(exc), *exc.args)
    clone.__dict__.update(vars(exc))
    return clone
