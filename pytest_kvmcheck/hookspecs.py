"""Hooks a user's conftest.py may implement, to act when a host is ready or a VM started.

    def pytest_kvmcheck_host_prepared(host):   # a PreparedHost: .name, .spec, .caps, .transport
        ...
    def pytest_kvmcheck_vm_started(vm):        # a VM whose QEMU runs (its guest may still boot)
        ...

Each is called in the process that uses the host or VM (an xdist worker, or the only one).
"""
from __future__ import annotations




def pytest_kvmcheck_host_prepared(host) -> None:
    """A host of ``--kvm-hosts`` was prepared (connected, probed) for this process's tests."""


def pytest_kvmcheck_vm_started(vm) -> None:
    """A VM's QEMU was started for a test (by the factory: booted, a destination, a successor)."""
