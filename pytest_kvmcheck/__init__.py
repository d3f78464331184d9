"""pytest-kvmcheck: a conformance suite for KVM/QEMU hosts, as a pytest plugin.

What suites import: VM specs, the shared-guest fixture maker, and the waiting helpers.
"""
from .errors import premise
from .fixtures import vm_fixture
from .qemu.spec import Disk, Nic, VMSpec
from .qemu.vm import VM
from .waiting import poll, wait_until

__all__ = ["VM", "VMSpec", "Nic", "Disk", "vm_fixture", "poll", "wait_until", "premise"]
__version__ = "0.1.0"
