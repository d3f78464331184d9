"""Host+module scopes for xdist: a module's tests stay together per host, hosts apart."""
from pytest_kvmcheck.schedule import host_in_id, scope_of

HOSTS = ("lab-1", "lab-10", "local", "lab-power")


def test_the_host_is_a_whole_part_of_the_parameters():
    assert host_in_id("suites/test_net.py::test_link[lab-1-vhost]", HOSTS) == "lab-1"
    assert host_in_id("suites/test_net.py::test_link[userspace-lab-10]", HOSTS) == "lab-10"
    assert host_in_id("suites/test_blk.py::test_power[lab-power]", HOSTS) == "lab-power"
    assert host_in_id("suites/test_net.py::test_link[lab-100]", HOSTS) is None  # not lab-1, not lab-10
    assert host_in_id("tests/unit/test_x.py::test_plain", HOSTS) is None


def test_scopes_split_modules_by_host_only():
    assert scope_of("suites/test_net.py::test_link[lab-1-vhost]", HOSTS) == "suites/test_net.py@lab-1"
    assert scope_of("suites/test_net.py::test_rate[lab-1]", HOSTS) == "suites/test_net.py@lab-1"
    assert scope_of("suites/test_net.py::test_link[local-vhost]", HOSTS) == "suites/test_net.py@local"
    assert scope_of("tests/unit/test_x.py::Case::test_plain", HOSTS) == "tests/unit/test_x.py::Case"
