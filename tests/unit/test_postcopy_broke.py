"""What a migration broken in postcopy says about the guest's fate, from the destination's side."""
from types import SimpleNamespace

from pytest_kvmcheck.qemu.migration import postcopy_broke


class Destination:
    """A destination QEMU whose liveness answers in turn (the last answer repeats)."""

    def __init__(self, *alive: bool):
        self.name, self._alive = "dest", list(alive)
        self.qmp = SimpleNamespace(cmd=lambda command: {"status": "postcopy-paused"})

    def alive(self) -> bool:
        return self._alive.pop(0) if len(self._alive) > 1 else self._alive[0]

    def log_tail(self, lines: int) -> str:
        return ""


SOURCE = SimpleNamespace(name="src")


def test_a_destination_that_exited_loses_the_guest():
    said = postcopy_broke(SOURCE, "tcp:x:1", "postcopy-paused", {}, Destination(False))
    assert "the destination dest: its QEMU exited: the guest is lost" in said, said


def test_a_destination_that_exits_while_it_is_asked_loses_the_guest_too():
    """Alive when first asked, gone by the end (a lab run: killed by the test a moment before)."""
    said = postcopy_broke(SOURCE, "tcp:x:1", "postcopy-paused", {}, Destination(True, False))
    assert "the guest is lost" in said, said


def test_the_destination_is_asked_whether_it_runs_twice():
    """Before it is asked where its migration stands, and after (the race above): no more."""
    destination = Destination(True, True, False)
    assert "query-migrate status postcopy-paused" in postcopy_broke(SOURCE, "tcp:x:1", "postcopy-paused", {},
                                                                    destination)
    assert destination._alive == [False], "asked more than twice"


def test_a_live_destination_says_where_its_migration_stands():
    said = postcopy_broke(SOURCE, "tcp:x:1", "postcopy-paused", {}, Destination(True))
    assert "query-migrate status postcopy-paused" in said and "lost" not in said, said
