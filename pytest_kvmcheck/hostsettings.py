"""Host settings a test changes and must give back: sysfs knobs (KSM now; device bindings next).

A test that turns a host-wide knob takes a :class:`SysfsSettings` first: it records the
values, writes new ones through the host's transport (``tee``, an argv: no shell), and
:meth:`SysfsSettings.restore` writes the recorded values back and checks they took, so a
run leaves every host as it found it and says so when it cannot.
"""
from __future__ import annotations

import posixpath

from .errors import HostError
from .transport import Host


class SysfsSettings:
    def __init__(self, host: Host, directory: str, names: tuple[str, ...]):
        self.host, self.directory, self.names = host, directory, names
        self.original = {name: self.read(name) for name in names}
        self.changed = False

    def path(self, name: str) -> str:
        return posixpath.join(self.directory, name)

    def read(self, name: str) -> str:
        return self.host.read_text(self.path(name)).strip()

    def read_int(self, name: str) -> int:
        return int(self.read(name))

    def write(self, name: str, value) -> None:
        result = self.host.run(["tee", self.path(name)], input=f"{value}\n", timeout=60)
        if not result.ok:
            raise HostError(f"host {self.host.name}: cannot write {value} to {self.path(name)}: "
                            f"{result.stderr.strip() or 'exit ' + str(result.exit_status)} "
                            f"(the test needs root on the host and a writable /sys)")
        self.changed = True

    def restore(self, before: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
        """Write the recorded values back (``before`` first, e.g. KSM's unmerge); return what differs."""
        if not self.changed:
            return {}
        for name, value in (before or {}).items():
            self.write(name, value)
        for name in reversed(self.names):
            if self.read(name) != self.original[name]:
                self.write(name, self.original[name])
        self.changed = False
        return {name: (self.original[name], now) for name in self.names
                if (now := self.read(name)) != self.original[name]}
