"""Opening a host: the transport its spec names, its backend imported only when needed.

A run against local hosts never imports paramiko.
"""
from __future__ import annotations

from ..errors import HostError
from .spec import HostSpec
from .transport import Host


def connect(spec: HostSpec) -> Host:
    """Open the transport named by the spec (backends imported lazily)."""
    if spec.transport == "local":
        from .local import LocalHost
        return LocalHost(spec)
    if spec.transport == "ssh":
        from .ssh import SSHHost
        return SSHHost(spec)
    raise HostError(f"host {spec.name}: unknown transport {spec.transport!r}")
