"""kvmcheck doctor's table: aligned rows, then one verdict per host; FAIL rows make a host unusable."""
from pytest_kvmcheck.doctor import Row, render, unusable

ROWS = [Row("lab-1", "connection", "ok", "ssh://root@127.0.0.1:2201, host key known"),
        Row("lab-1", "vhost-net", "warn", "/dev/vhost-net is missing; modprobe vhost_net"),
        Row("node3", "connection", "FAIL", "host node3: its host key is not in known_hosts; ssh-keyscan ...")]


def test_rows_then_a_verdict_per_host():
    lines = render(ROWS).splitlines()
    assert lines[0].split() == ["HOST", "CHECK", "STATUS", "WHAT", "IT", "FOUND"]
    assert lines[1] == "lab-1  connection  ok      ssh://root@127.0.0.1:2201, host key known"
    assert lines[-2:] == ["host lab-1: ready, with warnings: vhost-net",
                          "host node3: cannot run the suites (connection)"]


def test_only_a_fail_makes_a_host_unusable():
    assert unusable(ROWS) == ["node3"]
    assert unusable(ROWS[:2]) == []
