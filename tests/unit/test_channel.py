"""The one read loop of SSH sessions: a command that ends is its answer, a shell that ends first is not."""
import pytest

from pytest_kvmcheck.errors import VMError
from pytest_kvmcheck.hosts.channel import read_channel


class EndedChannel:
    """A channel whose command has sent everything; its exit status arrives after the first look
    (the transport thread sets it between two reads), as it did in a lab run."""

    def __init__(self):
        self.looks = 0
        self.eof_received = True
        self.closed = False

    def recv_ready(self):
        return False

    def recv_stderr_ready(self):
        return False

    def exit_status_ready(self):
        self.looks += 1
        return self.looks > 1


def test_a_command_that_ends_between_two_looks_is_its_answer():
    channel = EndedChannel()
    done = lambda out, err: channel.exit_status_ready() and channel.eof_received  # noqa: E731 - as an exec channel waits
    out, err = read_channel(channel, deadline=float("inf"), timed_out=TimeoutError("deadline"), done=done,
                            closed=VMError("ended before it finished"))
    assert (out, err) == (bytearray(), bytearray())


def test_a_shell_that_ends_before_the_awaited_output_is_our_session_breaking():
    channel = EndedChannel()
    channel.looks = 1  # ended already
    with pytest.raises(VMError, match="ended before it finished"):
        read_channel(channel, deadline=float("inf"), timed_out=TimeoutError("deadline"),
                     done=lambda out, err: b"TOKEN" in out, closed=VMError("ended before it finished"))
