"""pytest-kvmcheck: a conformance suite for KVM/QEMU hosts, as a pytest plugin."""
from .fixtures import vm_fixture
from .vm import VM
from .vmspec import Disk, Nic, VMSpec

__all__ = ["VM", "VMSpec", "Nic", "Disk", "vm_fixture"]
__version__ = "0.1.0"
