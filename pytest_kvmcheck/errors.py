"""The error hierarchy: every error's message says what went wrong and what to do.

Catch :class:`KvmCheckError` to handle anything this package raises on purpose;
the plugin turns these into one clear line (a usage error, a skip or a failure)
instead of a traceback.
"""
from __future__ import annotations


class KvmCheckError(Exception):
    """Base class of every error pytest-kvmcheck raises deliberately."""


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


class GuestBootError(VMError):
    """The guest did not reach its ready marker before the deadline.

    The message carries the tail of the serial console and QEMU's stderr.
    """


class MigrationFailed(VMError):
    """A migration failed or was cancelled; ``info`` is query-migrate's last answer."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


class MigrationDidNotConverge(MigrationFailed):
    """The guest dirtied memory faster than it was sent: cancelled at the deadline."""


class QMPLost(VMError):
    """The QMP connection to a running VM broke (QEMU died or was killed)."""


class GuestCommandError(VMError):
    """A command in the guest failed where success was required."""


class LabError(KvmCheckError):
    """The virtual KVM lab could not be brought up (or down); the message says why."""
