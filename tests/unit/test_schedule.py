"""Host+module scopes for xdist: a module's tests stay together per host, hosts apart."""
from pytest_kvmcheck.schedule import busy_elsewhere, host_in_id, next_scope, scope_of

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


def test_a_free_worker_goes_to_the_host_that_runs_the_least():
    queue = {"suites/test_migration.py@lab-1": {"a": False, "b": False, "c": False},
             "suites/test_hotplug.py@lab-1": {"d": False, "e": False},
             "suites/test_migration.py@lab-2": {"f": False, "g": False},
             "suites/test_virtio_blk.py@lab-power": {"h": False}}
    assert next_scope(queue, {}) == "suites/test_migration.py@lab-1"  # the largest, hosts alike
    assert next_scope(queue, {"lab-1": 1}) == "suites/test_migration.py@lab-2"  # not a second on lab-1
    # lab-power's one check starts while the others run, not last and alone
    assert next_scope(queue, {"lab-1": 1, "lab-2": 1}) == "suites/test_virtio_blk.py@lab-power"
    assert next_scope({"tests/unit/test_x.py": {"i": False}}, {"lab-1": 2}) == "tests/unit/test_x.py"


def test_a_worker_leaving_a_host_does_not_count_itself_there():
    gw0, gw1 = object(), object()
    assigned = {gw0: {"suites/test_virtio_balloon.py@lab-2": {"a": True, "b": False}},
                gw1: {"suites/test_hotplug.py@lab-1": {"c": False}, "suites/test_nested.py@lab-2": {"d": True}}}
    assert busy_elsewhere(assigned, gw0) == {"lab-1": 1}  # gw1's nested is done; gw0's own balloon ends soon
    assert busy_elsewhere(assigned, gw1) == {"lab-2": 1}
    queue = {"suites/test_security.py@lab-1": {"x": False, "y": False}, "suites/test_ksm.py@lab-2": {"z": False}}
    assert next_scope(queue, busy_elsewhere(assigned, gw0)) == "suites/test_ksm.py@lab-2"


def test_a_host_not_yet_begun_goes_before_a_second_scope_of_a_begun_one():
    queue = {"suites/test_migration.py@lab-1": {str(i): False for i in range(20)},
             "suites/test_virtio_blk.py@lab-power": {"power": False}}
    assert next_scope(queue, {"lab-2": 1}) == "suites/test_migration.py@lab-1"  # by count alone
    assert next_scope(queue, {"lab-2": 1}, {"lab-1": 1, "lab-2": 1}) == "suites/test_virtio_blk.py@lab-power"
