"""A power cycle's wait for the host: until a new boot id; a host that comes back as another host
ends it at once, one that does not come back ends it at the deadline with its last answer."""
import time

import pytest

from pytest_kvmcheck.errors import HostError, HostKeyUnknown, HostUnreachable
from pytest_kvmcheck.hosts import power
from pytest_kvmcheck.hosts.power import power_cycle
from pytest_kvmcheck.hosts.spec import HostSpec


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(power, "POLL_S", 0.01)


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


def test_a_host_is_waited_for_until_it_answers_with_a_new_boot_id():
    """Not answering, then answering with the old boot id (the power was not cut yet): both
    are waited through; the new boot id ends the wait."""
    host = Returning(HostUnreachable("refused"), "before", "after")
    took = power_cycle(host, timeout=30)
    assert host.answers == ["after"] and 0.02 <= took < 5, (host.answers, took)


def test_a_host_that_does_not_come_back_is_an_error_with_its_last_answer():
    with pytest.raises(HostError, match=r"host p: not back within 0 s of its power cycle \(refused\)"):
        power_cycle(Returning(HostUnreachable("refused")), timeout=0.2)
    with pytest.raises(HostError, match="it answers with the boot id it had before: the power was not cut"):
        power_cycle(Returning("before"), timeout=0.2)
