"""kvmcheck-net's output read back, medians over rounds, and QEMU's CPU time from /proc stat lines."""
import pytest

from pytest_kvmcheck.errors import VMError
from pytest_kvmcheck.hosts.tools import cpu_ticks
from pytest_kvmcheck.qemu.netperf import LinkSpeed, mbps, median_speed, parse_round_trips, parse_stream


def test_streams_and_round_trips_parse():
    assert parse_stream("bytes 250000000 seconds 2.000\n") == (250000000, 2.0)
    assert mbps(250000000, 2.0) == pytest.approx(1000.0)
    assert parse_round_trips("count 1000 median_us 212.5 p99_us 406.0\n") == (212.5, 406.0)
    with pytest.raises(VMError, match="kvmcheck-net's stream said 'connect: Connection refused'"):
        parse_stream("connect: Connection refused\n")  # never read as a number
    with pytest.raises(VMError, match="round trips"):
        parse_round_trips("")


def test_median_over_rounds_takes_each_number_apart():
    runs = [LinkSpeed(100, 50, 300, 900, 2.0), LinkSpeed(900, 40, 200, 400, 1.0), LinkSpeed(120, 45, 250, 500, 3.0)]
    assert median_speed(runs) == LinkSpeed(120, 45, 250, 500, 2.0)
    assert "backend CPU 2.00 s/GiB" in str(median_speed(runs))
    assert "host CPU" not in str(LinkSpeed(1, 1, 1, 1))


def test_cpu_ticks_sum_utime_and_stime_of_every_line():
    qemu = "4242 (qemu-system-x86) S 1 4241 4241 0 -1 4194560 100 0 0 0 1500 300 0 0 20 0 9 0 1 2 3"
    vhost = "4250 (vhost-4242) S 2 0 0 0 -1 2129984 0 0 0 0 10 700 0 0 20 0 1 0 5 0 0"
    odd = "77 (a) b (c) R 1 1 1 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 1 0 0"  # a name with ") " in it
    assert cpu_ticks("\n".join((qemu, vhost, odd))) == 1500 + 300 + 10 + 700 + 1 + 2
