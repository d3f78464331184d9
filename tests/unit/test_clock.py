"""Clock offsets: the reading with the shortest round trip counts; readings parse from GNU date and busybox adjtimex."""
import pytest

from pytest_kvmcheck.clock import Offset, best_offset, measure_offset, parse_wall_clock


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
