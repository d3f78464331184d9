"""--kvm-spread's plan: identical hosts split the features; every feature runs somewhere."""
from collections import Counter

from pytest_kvmcheck import matrix, spread
from pytest_kvmcheck.verdicts import Verdicts

FP = {"qemu_sha256": "ab", "kernel": "6.1"}


def state(**fingerprint):
    return {"caps": {"fingerprint": {**FP, **fingerprint}}}


def test_hosts_group_by_fingerprint_needs_and_expectations():
    keys = {"a": spread.group_key(state(), met=["kvm"]), "b": spread.group_key(state(), met=["kvm"]),
            "c": spread.group_key(state(kernel="6.2"), met=["kvm"]),  # another kernel
            "d": spread.group_key(state(), met=["kvm", "iommu"]),  # another capability (a spec's assignable=)
            "e": spread.group_key(state(), expect=["kvm"], met=["kvm"]),  # an inventory that expects more
            "f": spread.group_key({"error": "unreachable"}), "g": spread.group_key({"error": "unreachable"})}
    assert spread.groups(keys) == [["a", "b"]]


def test_each_feature_runs_on_one_host_of_a_group_and_the_work_is_balanced():
    weights = Counter({(f, h): n for f, n in (("net", 14), ("blk", 12), ("nested", 6), ("ksm", 2), ("clock", 4))
                       for h in ("a", "b")})
    weights[("solo", "c")] = 3  # a host of no group keeps its features
    assignment = spread.plan(weights, [["a", "b"]])
    assert assignment[("net", "a")] == assignment[("net", "b")] == "a"
    assert assignment[("blk", "a")] == "b"
    load = Counter()
    for (feature, host), chosen in assignment.items():
        if host == chosen:
            load[host] += weights[(feature, host)]
    assert sorted(load.values()) == [18, 20]  # the best split of 14, 12, 6, 4, 2
    assert ("solo", "c") not in assignment
    assert all(chosen in ("a", "b") for chosen in assignment.values())


def test_a_feature_only_one_host_has_stays_on_it():
    weights = Counter({("net", "a"): 5, ("net", "b"): 5, ("sriov", "b"): 3})
    assignment = spread.plan(weights, [["a", "b"]])
    assert assignment[("sriov", "b")] == "b"
    assert assignment[("net", "a")] == assignment[("net", "b")]


def test_the_report_says_who_stood_for_whom():
    assignment = {("net", "a"): "a", ("net", "b"): "a", ("blk", "a"): "b", ("blk", "b"): "b"}
    stood = spread.stood_in_by(assignment)
    assert stood == {"a": {"blk": "b"}, "b": {"net": "a"}}
    assert spread.summary_lines(stood) == [
        "spread: host a (same fingerprint) was stood for by b in blk",
        "spread: host b (same fingerprint) was stood for by a in net"]
    collected = Verdicts()
    collected.tests = {"x[a]": ("a", "net", "PASS"), "y[b]": ("b", "blk", "FAIL"), "z[b]": ("b", "net", "PASS")}
    rows = {(h, f): (cell, detail) for h, f, cell, detail in collected.rows(stood)}
    assert rows[("a", "blk")] == ("FAIL", "b stood for it: FAIL")
    assert rows[("b", "net")] == ("PASS", "1 PASS; a stood for it: PASS")  # its own peer test, and a's
    tests = [{"host": h, "feature": f, "verdict": v} for h, f, v in collected.tests.values()]
    table = matrix.matrix_table(tests, stood_in_by=stood)
    assert "b stood for it: FAIL" in table and 'data-verdict="FAIL"' in table


def test_moves_are_spread_only_between_alike_pairs():
    same = spread.group_key(state(), met=["kvm"])
    other = spread.group_key(state(kernel="6.2"), met=["kvm"])
    # The lab: two clones, each the other's peer: a move from either checks the same pair.
    assert spread.pair_groups({"a": same, "b": same}, {"a": "b", "b": "a"}) == [["a", "b"]]
    # a -> b and b -> c are different pairs (c is another build): neither stands for the other.
    assert spread.pair_groups({"a": same, "b": same, "c": other}, {"a": "b", "b": "c", "c": "a"}) == []
    # Three clones in a ring: every move is between two of them.
    assert spread.pair_groups({"a": same, "b": same, "c": same}, {"a": "b", "b": "c", "c": "a"}) == [["a", "b", "c"]]
    # A host that is its own peer moves nothing between hosts.
    assert spread.pair_groups({"a": same, "b": same}, {"a": "a", "b": "b"}) == []


def test_moves_take_turns_and_fold_into_their_feature_in_the_report():
    moves = Counter({(f"mig::t{i}", h): 1 for i in range(4) for h in ("a", "b")})
    assignment = spread.plan(moves, [["a", "b"]])
    assert Counter(chosen for (unit, host), chosen in assignment.items() if host == "a") == {"a": 2, "b": 2}
    stood = spread.stood_in_by(assignment)
    assert spread.by_feature(stood) == {"a": {"mig": "b"}, "b": {"mig": "a"}}
    assert spread.summary_lines(stood)[0] == "spread: host a (same fingerprint) was stood for by b in mig (2 of its moves)"


def test_durations_weigh_tests_by_an_earlier_runs_seconds():
    record = {"tests": [
        {"feature": "test_net", "test": "suites/test_net.py::test_speed", "duration_s": 60.0},
        {"feature": "test_net", "test": "suites/test_net.py::test_speed", "duration_s": 80.0},  # another host's
        {"feature": "test_net", "test": "suites/test_net.py::test_link[vhost]", "duration_s": 2.0},
        {"feature": "test_blk", "test": "other/checkout/test_blk.py::test_io", "duration_s": 10.0},
        {"feature": "test_blk", "test": "suites/test_blk.py::test_skipped", "duration_s": None}]}
    durations = spread.Durations(record)
    assert durations.of("test_net", "suites/test_net.py::test_speed") == 70.0  # the hosts' median
    assert durations.of("test_blk", "x/test_blk.py::test_io") == 10.0  # whatever the path
    assert durations.of("test_net", "suites/test_net.py::test_new") == 36.0  # its feature's median test
    assert durations.of("test_ksm", "suites/test_ksm.py::test_merge") == 10.0  # the record's median
    assert spread.Durations(None).of("test_net", "suites/test_net.py::test_speed") == 1.0  # by count


def test_the_spread_by_seconds_lets_alike_hosts_finish_together():
    # One long feature with few tests and many short ones: by count the long one's host gets
    # the short ones too; by seconds it gets nothing else.
    tests = {"long": [300.0, 300.0], "a": [20.0] * 6, "b": [20.0] * 6, "c": [20.0] * 6}
    by_count = {(f, h): len(t) for f, t in tests.items() for h in ("x", "y")}
    by_seconds = {(f, h): sum(t) for f, t in tests.items() for h in ("x", "y")}

    def loads(weights):
        assignment = spread.assign(weights, {"x": "k", "y": "k"}, {})
        load = Counter()
        for (feature, host), chosen in assignment.items():
            if host == chosen:
                load[host] += sum(tests[feature])
        return sorted(load.values())
    assert loads(by_count) == [240, 720]
    assert loads(by_seconds) == [360, 600]
