"""A power cycle's wait for the host: a host that comes back as another host ends it at once."""
import time

import pytest

from pytest_kvmcheck.errors import HostError, HostKeyUnknown, HostUnreachable
from pytest_kvmcheck.hosts.power import power_cycle
from pytest_kvmcheck.hosts.spec import HostSpec


class Returning:
    """A host that answers the boot id, then as the answers say (an exception is raised)."""

    def __init__(self, *answers):
        self.spec = HostSpec(name="p", transport="ssh", power_cycle=("true",))
        self.name, self.answers = "p", ["before", *answers]

    def read_text(self, path):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self):
        pass


def test_a_host_back_with_another_ssh_key_fails_at_once():
    started = time.monotonic()
    with pytest.raises(HostError, match="came back from its power cycle with another SSH host key"):
        power_cycle(Returning(HostKeyUnknown("host p: its key changed")), timeout=30)
    assert time.monotonic() - started < 5


def test_a_host_not_yet_back_is_waited_for():
    assert power_cycle(Returning(HostUnreachable("refused"), "after"), timeout=30) >= 0
