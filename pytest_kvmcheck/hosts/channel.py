"""Reading an SSH channel (paramiko's ``Channel``, by duck typing: paramiko is imported by whoever opens one)."""
from __future__ import annotations

import select
import time
from typing import Callable


def read_channel(channel, deadline: float, timed_out: Exception,
                 done: Callable[[bytearray, bytearray], bool] | None = None,
                 closed: Exception | None = None) -> tuple[bytearray, bytearray]:
    """Read a channel's stdout and stderr until ``done(out, err)`` (default: the remote command
    exited and everything it wrote was read); raise ``timed_out`` at the deadline and ``closed``
    if the channel closes first. The one read loop of hosts' and guests' SSH sessions."""
    out, err = bytearray(), bytearray()
    while not (done is not None and done(out, err)):
        if channel.recv_ready():
            out += channel.recv(65536)
        elif channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        elif channel.exit_status_ready() and (done is None or channel.eof_received):
            if done is not None and closed is not None and not done(out, err):
                # The remote side ended before the awaited output (a guest's persistent shell
                # exited): what arrived is not the command's whole answer. Returned, it read as
                # "exited 255" with no output, a host's FAIL; it is our session that broke.
                # (Asked again: the command may have ended since the loop's test, which for an
                # exec channel is just what ``done`` waits for.)
                raise closed
            break
        elif closed is not None and channel.closed:
            raise closed
        elif time.monotonic() > deadline:
            raise timed_out
        else:
            select.select([channel], [], [], 0.05)
    return out, err
