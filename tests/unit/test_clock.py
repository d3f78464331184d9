"""Clock offsets: the reading with the shortest round trip counts; readings parse from GNU date and busybox adjtimex."""
import pytest

from pytest_kvmcheck.clock import Offset, best_offset, measure_offset, parse_wall_clock
from pytest_kvmcheck.errors import VMError
from pytest_kvmcheck.qemu.migration import guest_pause


def test_the_shortest_round_trip_wins():
    samples = [(100.0, 150.9, 101.0), (200.0, 250.02, 200.04), (300.0, 350.5, 300.5)]
    offset = best_offset(samples)
    assert offset.seconds == pytest.approx(50.0)
    assert offset.uncertainty == pytest.approx(0.02)


def test_differences_add_their_uncertainties():
    step = Offset(1.5, 0.01) - Offset(0.5, 0.02)
    assert step.seconds == pytest.approx(1.0) and step.uncertainty == pytest.approx(0.03)
    assert str(Offset(-0.0123, 0.0004)) == "-12.3 ms (±0.4 ms)"


def test_measure_brackets_each_reading():
    ticks = iter([10.0, 10.2, 20.0, 20.01])
    offset = measure_offset(lambda: 5.0, samples=2, here=lambda: next(ticks))
    assert offset.seconds == pytest.approx(5.0 - 20.005) and offset.uncertainty == pytest.approx(0.005)


def test_wall_clock_from_date_and_from_busybox_adjtimex():
    assert parse_wall_clock("1795723814.123456789\n") == pytest.approx(1795723814.123456789)
    adjtimex = ("    mode:         0\n-o  offset:       0 us\n    time.tv_sec:  1795723817\n"
                "    time.tv_usec: 641895\n    return value: 5 (clock not synchronized)\n")
    assert parse_wall_clock(adjtimex) == pytest.approx(1795723817.641895)
    with pytest.raises(ValueError):
        parse_wall_clock("1795723814.%N")  # a date without nanoseconds must not pass for one


class _Events:
    def __init__(self, name, **events):
        self.name, self._events = name, events
        self.qmp = self

    def events(self, name):
        return [{"event": name, "timestamp": {"seconds": int(t), "microseconds": round(t % 1 * 1e6)}}
                for t in self._events.get(name, [])]


def test_the_guest_stood_still_from_its_last_stop_before_it_resumed():
    """The pause runs from the source's STOP (the last before the destination's RESUME: a
    stop/cont after the move does not count) to that RESUME, on this machine's clock."""
    source = _Events("src", STOP=[100.0, 103.5, 109.0])  # a pause before, the switch-over, one after
    dest = _Events("dst", RESUME=[1104.25])               # its host's clock is 1000 s ahead of ours
    pause = guest_pause(source, dest, Offset(0.0, 0.002), Offset(1000.0, 0.003))
    assert pause.seconds == pytest.approx(0.75) and pause.uncertainty == pytest.approx(0.005)


def test_no_resume_on_the_destination_is_an_error_not_a_pause():
    with pytest.raises(VMError, match="no RESUME event"):
        guest_pause(_Events("src", STOP=[1.0]), _Events("dst"), Offset(0, 0), Offset(0, 0))
    with pytest.raises(VMError, match="no STOP event before the guest resumed on dst"):
        guest_pause(_Events("src", STOP=[9.0]), _Events("dst", RESUME=[5.0]), Offset(0, 0), Offset(0, 0))
