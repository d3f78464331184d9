"""Comparing two run records: verdict regressions, host changes, metrics by a permutation test."""
import pytest

from pytest_kvmcheck.compare import compare, permutation_p, render_html, render_text, smallest_p
from pytest_kvmcheck.record import bare_test_id


def run(run_id, tests, hosts=None):
    return {"schema": "kvmcheck-run/1", "run_id": run_id, "tests": tests,
            "hosts": hosts or {"local": {"capabilities": ["ksm", "tap"], "fingerprint": {"qemu": "7.2.22"}}}}


def t(test, verdict="PASS", host="local", feature="test_virtio_blk", metrics=None, reason=""):
    return {"test": test, "host": host, "feature": feature, "verdict": verdict, "reason": reason,
            "metrics": metrics or {}}


def boot(samples):
    return {"boot_to_ready": {"unit": "s", "direction": "lower", "scope": "host", "samples": samples}}


def test_the_test_key_drops_the_host():
    assert bare_test_id("suites/test_virtio_blk.py::test_x[lab-1-qcow2]", "lab-1") == "suites/test_virtio_blk.py::test_x[qcow2]"
    assert bare_test_id("suites/test_net.py::test_y[userspace-lab-1]", "lab-1") == "suites/test_net.py::test_y[userspace]"
    assert bare_test_id("suites/test_net.py::test_y[lab-1]", "lab-1") == "suites/test_net.py::test_y"
    assert bare_test_id("suites/test_net.py::test_y[lab-10-x]", "lab-1") == "suites/test_net.py::test_y[lab-10-x]"
    assert bare_test_id("suites/test_ksm.py::test_y[local]", "local") == "suites/test_ksm.py::test_y"


def test_permutation_p():
    assert permutation_p([1, 2, 3, 4, 5], [11, 12, 13, 14, 15]) == pytest.approx(2 / 252)
    assert permutation_p([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 1.0
    assert permutation_p(list(range(30)), [x + 100 for x in range(30)]) < 0.001  # sampled: 60 choose 30 splits
    assert smallest_p(3, 3) == pytest.approx(0.1) and smallest_p(5, 5) < 0.01


def test_a_run_against_itself_has_no_regression():
    a = run("a", [t("test_x", metrics=boot([3.1, 3.2, 3.0, 3.3, 3.1])), t("test_y", "SKIP")])
    c = compare(a, a)
    assert not c.regressed and not c.fixes and not c.hosts
    assert [m.outcome for m in c.metrics] == ["unchanged"]
    assert "no regression" in render_text(c)


def test_exactly_the_regressions():
    base = run("a", [t("test_x"), t("test_y", "SKIP"), t("test_gone"), t("test_z", "FAIL"),
                     t("test_b", metrics=boot([3.1, 3.2, 3.0, 3.3, 3.1]))])
    cand = run("b", [t("test_x", "FAIL", reason="expected virtio_blk, got ''"), t("test_y", "SKIP"), t("test_new"),
                     t("test_z"), t("test_b", metrics=boot([4.1, 4.2, 4.0, 4.3, 4.2]))],
               hosts={"local": {"capabilities": ["tap"], "fingerprint": {"qemu": "10.0.0"}}})
    c = compare(base, cand)
    assert c.regressions == ["local: test_virtio_blk: test_x: PASS -> FAIL: expected virtio_blk, got ''"]
    assert c.fixes == ["local: test_virtio_blk: test_z: FAIL -> PASS"]
    assert c.appeared == ["local: test_virtio_blk: test_new (PASS)"]
    assert c.disappeared == ["local: test_virtio_blk: test_gone (was PASS)"]
    assert c.hosts == ["local: capabilities lost ksm", "local: qemu 7.2.22 -> 10.0.0"]
    (metric,) = c.metric_regressions
    assert metric.name == "boot_to_ready" and metric.p < 0.01 and "+32.5 %" in metric.describe()
    text = render_text(c)
    assert "regressions (2):" in text and "REGRESSED" in text
    assert "<li>local: test_virtio_blk: test_x: PASS -&gt; FAIL" in render_html(c)


def test_noise_and_direction():
    base = run("a", [t("test_b", metrics=boot([3.10, 3.12, 3.11, 3.13, 3.12]))])
    slower_a_little = run("b", [t("test_b", metrics=boot([3.20, 3.22, 3.21, 3.23, 3.22]))])  # +3 %: noise
    assert [m.outcome for m in compare(base, slower_a_little).metrics] == ["unchanged"]
    assert [m.outcome for m in compare(base, slower_a_little, thresholds={"boot_to_ready": 0.01}).metrics] == \
        ["regression"]
    faster = run("b", [t("test_b", metrics=boot([2.0, 2.1, 2.0, 2.1, 2.0]))])
    assert [m.outcome for m in compare(base, faster).metrics] == ["improvement"]


def test_too_few_samples_says_so():
    c = compare(run("a", [t("test_b", metrics=boot([3.0, 3.1]))]), run("b", [t("test_b", metrics=boot([9.0, 9.1]))]))
    (metric,) = c.metrics
    assert metric.outcome == "too few samples" and not c.regressed
    assert "no permutation test can reach p<0.01" in metric.describe()


def test_renamed_hosts_are_mapped():
    base = run("a", [t("test_x", host="old-1")], hosts={"old-1": {"capabilities": [], "fingerprint": {}}})
    cand = run("b", [t("test_x", "ERROR", host="new-1")], hosts={"new-1": {"capabilities": [], "fingerprint": {}}})
    c = compare(base, cand, host_map={"old-1": "new-1"})
    assert c.regressions == ["new-1: test_virtio_blk: test_x: PASS -> ERROR"] and not c.hosts
