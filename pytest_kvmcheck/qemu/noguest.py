"""QEMU without a guest: asked whether it takes an option, or asked over QMP, then gone.

The handbook's legacy forms, the host probe (seccomp, migration capabilities) and the
monitor suite all ask a host's QEMU things that need no guest. :func:`try_options` starts
it with ``-machine none`` and QMP on stdin (exit 0: accepted); :class:`NoGuestQemu` runs it
daemonized with QMP on a unix socket in its own directory, for as many questions as needed.
"""
from __future__ import annotations

import json
import posixpath
import secrets

from ..errors import QMPLost
from ..hosts.transport import CommandResult, Host
from ..hosts.footprint import kill_vm_dir
from ..waiting import poll
from .monitor import Monitor
from .spec import noguest_argv

# A QEMU with no guest (asked its version, its devices, an option) starts and answers in well
# under a second on a sound host. In CI a loaded lab host's first starts of its second QEMU
# (read from the lab's NFS) took over 30 s, twice: -sandbox on, then -version.
START_TIMEOUT_S = 120
_QUIT = json.dumps({"execute": "qmp_capabilities"}) + "\n" + json.dumps({"execute": "quit"}) + "\n"


def try_options(host: Host, options: list[str]) -> CommandResult:
    """Start the host's QEMU with ``options`` and no guest; exit status 0 means accepted."""
    return host.run(noguest_argv(host.spec.qemu, qmp="stdio") + list(options), timeout=START_TIMEOUT_S, input=_QUIT,
                    root=True)


class NoGuestQemu:
    """``with NoGuestQemu(host, workdir) as monitor:``: a stopped QEMU with no machine, and its QMP.

    It is told to quit only once every answer is in: a ``quit`` written right behind a long
    answer on stdio could end QEMU before the answer was flushed (a cut-off schema).
    """

    def __init__(self, host: Host, workdir: str, extra_args: tuple[str, ...] = ()):
        self.host, self.extra_args = host, tuple(extra_args)
        self.directory = posixpath.join(workdir, f"noguest-{secrets.token_hex(4)}")
        self.pid: int | None = None
        self.monitor: Monitor | None = None

    def __enter__(self) -> Monitor:
        sock, pidfile = posixpath.join(self.directory, "qmp.sock"), posixpath.join(self.directory, "qemu.pid")
        self.host.makedirs(self.directory)
        try:
            self.host.run(noguest_argv(self.host.spec.qemu, qmp=f"unix:{sock},server=on,wait=off", pidfile=pidfile)
                          + list(self.extra_args), timeout=START_TIMEOUT_S,
                          root=True).check(f"QEMU without a guest on {self.host.name}")
            self.pid = int(self.host.read_root_text(pidfile).strip())
            self.monitor = Monitor(self.host.connect_unix(sock), f"QEMU without a guest on {self.host.name}")
        except BaseException:
            self.__exit__()
            raise
        return self.monitor

    def __exit__(self, *exc) -> None:
        try:
            if self.monitor is not None:
                try:
                    self.monitor.cmd("quit")
                except QMPLost:  # QEMU may close the socket before it answers
                    pass
                self.monitor.close()
        finally:
            pid = self.pid
            if pid is None:  # started, but its pid was never read: find it by its pidfile
                kill_vm_dir(self.host, self.directory)
            elif not poll(lambda: not self.host.pid_alive(pid), 5.0):
                self.host.kill(pid, "KILL")
            self.host.remove_tree(self.directory)
