"""The monitor's vocabulary: Python keywords become QMP's names; events match by their contents."""
import pytest

from pytest_kvmcheck.errors import WaitTimeout
from pytest_kvmcheck.qemu.monitor import event_matches, qmp_arguments
from pytest_kvmcheck.waiting import wait_until


def test_keywords_become_dashed_names_and_a_dict_passes_as_it_is():
    assert qmp_arguments(None, {"node_name": "d0", "job_id": "j", "driver": "qcow2"}) == \
        {"node-name": "d0", "job-id": "j", "driver": "qcow2"}
    assert qmp_arguments({"logical_block_size": 4096, "socket-id": 0}, {"id": "cpu1"}) == \
        {"logical_block_size": 4096, "socket-id": 0, "id": "cpu1"}


EVENT = {"event": "DEVICE_DELETED", "data": {"device": "nic1", "path": "/machine/peripheral/nic1"},
         "timestamp": {"seconds": 1, "microseconds": 2}}


@pytest.mark.parametrize("match, expected", [
    (None, True),
    ({"data": {"device": "nic1"}}, True),
    ({"data": {"device": "nic2"}}, False),
    ({"data": {"device": "nic1", "missing": 1}}, False),
    ({"data": "nic1"}, False),
    (lambda e: e["data"]["path"].endswith("nic1"), True),
])
def test_event_match(match, expected):
    assert event_matches(EVENT, match) is expected


def test_wait_until_returns_the_value_or_says_what_it_last_saw():
    values = iter([1, 2, 3, 4])
    assert wait_until(lambda: next(values), 5, "three", done=lambda v: v >= 3, interval=0) == 3
    with pytest.raises(WaitTimeout, match=r"the count at 10: not within 0.05 s; last seen: count 1"):
        wait_until(lambda: 1, 0.05, "the count at 10", done=lambda v: v == 10, show=lambda v: f"count {v}",
                   interval=0.01)
    assert WaitTimeout.verdict == "FAIL" and issubclass(WaitTimeout, AssertionError)


def test_wait_until_gives_a_moving_value_its_time_and_a_stuck_one_none():
    moving = iter(range(100))
    assert wait_until(lambda: next(moving), 5, "ten", done=lambda v: v >= 10, interval=0.01, stall=0.05) == 10
    with pytest.raises(WaitTimeout, match=r"stuck at 3: nothing changed for 0 s; last seen: 3"):
        wait_until(lambda: 3, 5, "stuck at 3", done=lambda v: v == 4, interval=0.01, stall=0.05)
