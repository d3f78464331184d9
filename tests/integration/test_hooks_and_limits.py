"""What a user's conftest and a reviewer get from the plugin: its hooks, the test's description,
a time limit on every kvmcheck test, and a hung test reported as ERROR, with nothing left behind."""
import json

from .conftest import assert_nothing_left, run_pytest, verdicts_of

CONFTEST = """
import json, os

def _log(**record):
    with open(os.environ["KVMCHECK_HOOK_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")

def pytest_kvmcheck_host_prepared(host):
    _log(hook="host", name=host.name, accel=host.caps.accel)

def pytest_kvmcheck_vm_started(vm):
    _log(hook="vm", name=vm.name, pid=vm.pid, host=vm.host.name)
"""

TESTS = '''
import time
from pytest_kvmcheck import VMSpec
import pytest

def test_boots(boot_vm):
    """Handbook 0.1: a docstring that becomes the test's description."""
    vm = boot_vm(VMSpec())
    assert vm.run(["true"]).ok

def test_has_the_default_limit(request, kvm_host):
    assert request.node.get_closest_marker("timeout").args == (900.0,)

@pytest.mark.timeout(2)
def test_hangs(kvm_host):
    time.sleep(30)
'''


def test_hooks_description_and_time_limit(pytester, workdir, tmp_path, monkeypatch):
    log = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("KVMCHECK_HOOK_LOG", str(log))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_plugin_api=TESTS)
    junit = tmp_path / "junit.xml"
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--junitxml={junit}",
                        test_timeout=None)  # the plugin's own default limit is one of the things checked
    out = result.stdout.str()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["name"] for r in records if r["hook"] == "host"] == ["local"], records
    started = [r for r in records if r["hook"] == "vm"]
    assert len(started) == 1 and started[0]["pid"] > 0 and started[0]["host"] == "local", records
    verdicts = verdicts_of(junit)
    assert verdicts["test_boots[local]"][0] == "PASS" and verdicts["test_has_the_default_limit[local]"][0] == "PASS", \
        verdicts
    verdict, text = verdicts["test_hangs[local]"]
    assert verdict == "ERROR" and "Timeout" in text, (verdict, text)
    assert "Handbook 0.1: a docstring that becomes the test's description." in junit.read_text()
    assert_nothing_left(workdir, out)


MEASUREMENTS = '''
import os, time
import pytest

def _log(name, start, stop):
    with open(os.environ["KVMCHECK_ALONE_LOG"], "a") as log:
        log.write(f"{name} {start} {stop}\\n")

@pytest.mark.parametrize("n", range(2))
def test_measures(kvm_host, kvm_alone, n):
    time.sleep(0.5)  # its guest boots: beside other tests
    with kvm_alone():
        start = time.time()
        time.sleep(1.5)
        stop = time.time()  # inside: once the block ends, the other worker may start
    _log("alone", start, stop)

@pytest.mark.parametrize("n", range(6))
def test_other(kvm_host, n):
    start = time.time()  # its setup, which held the machine, has ended
    time.sleep(0.5)
    _log("other", start, time.time())
'''


def test_a_speed_measurement_runs_alone_on_its_machine(pytester, workdir, tmp_path, monkeypatch):
    """Two workers on one host: a kvm_alone() block overlaps no other test (the lab's two
    workers read a healthy virtio-net as 1.21x e1000, below the check's 1.3x, without it),
    while the other tests still run two at a time."""
    monkeypatch.setenv("KVMCHECK_ALONE_LOG", str(tmp_path / "alone.log"))
    pytester.makepyfile(test_alone=MEASUREMENTS)
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", "-n", "2", "--dist", "load")
    assert result.ret == 0, result.stdout.str()[-3000:]
    spans = [line.split() for line in (tmp_path / "alone.log").read_text().splitlines()]
    alone = [(float(start), float(stop)) for kind, start, stop in spans if kind == "alone"]
    others = sorted((float(start), float(stop)) for kind, start, stop in spans if kind == "other")
    assert len(alone) == 2 and len(others) == 6, spans
    for start, stop in alone:
        beside = [(s, e) for s, e in others if s < stop and e > start]
        assert not beside, f"a measurement ({start:.1f}-{stop:.1f}) ran beside other tests: {beside}"
    assert any(b[0] < a[1] for a, b in zip(others, others[1:], strict=False)), f"the other tests never ran together: {others}"


OUTSIDE_THE_TEST = '''
import subprocess, sys, time
import pytest
from pytest_kvmcheck.hosts.capabilities import Capabilities
from pytest_kvmcheck.paths import machine_locks_dir
from pytest_kvmcheck.run import RUN_KEY

MEASURE_ELSEWHERE = """
import sys, time
from pytest_kvmcheck.machines import MachineHold
with MachineHold(sys.argv[1], [sys.argv[2]]).__enter__().alone():
    open(sys.argv[3], "w").close()
    time.sleep(8)
"""

def test_report_evidence_breaks(kvm_host, monkeypatch):
    def our_bug(self):
        raise RuntimeError("a bug in the evidence")
    monkeypatch.setattr(Capabilities, "summary", our_bug)  # read for the report, after the test's call

def test_another_worker_starts_a_measurement(request, kvm_host, tmp_path):
    run = request.config.stash[RUN_KEY]
    started = tmp_path / "measuring"
    subprocess.Popen([sys.executable, "-c", MEASURE_ELSEWHERE, str(machine_locks_dir()),
                      run.specs[kvm_host.name].machine_name, str(started)])
    time.sleep(1)  # it waits for this test to let go of the machine, then measures for 8 s
    assert not started.exists()

@pytest.mark.timeout(3)
def test_waits_for_the_machine_past_its_limit(kvm_host):
    pass

def test_after_the_measurement(kvm_host):
    pass
'''


def test_what_goes_wrong_outside_a_test_ends_only_that_test(pytester, workdir, tmp_path):
    """Work the plugin does around a test, outside its phases, never ends the xdist worker
    (an INTERNALERROR that lost a CI run's lab tests): evidence for the report that cannot be
    gathered is a note on that report, and a wait for the machine cut short by the time
    limit is that test's ERROR; the tests after them still run, and a test that waited for
    its machine is not taken for a slow one."""
    pytester.makepyfile(test_outside=OUTSIDE_THE_TEST)
    junit = tmp_path / "junit.xml"
    artifacts = tmp_path / "artifacts"
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--junitxml={junit}", "-n", "1",
                        f"--kvm-artifacts={artifacts}")
    out = result.stdout.str()
    verdicts = verdicts_of(junit)
    assert {name: verdict for name, (verdict, _) in verdicts.items()} == {
        "test_report_evidence_breaks[local]": "PASS", "test_another_worker_starts_a_measurement[local]": "PASS",
        "test_waits_for_the_machine_past_its_limit[local]": "ERROR", "test_after_the_measurement[local]": "PASS"}, out[-3000:]
    assert "Timeout" in verdicts["test_waits_for_the_machine_past_its_limit[local]"][1], verdicts
    # The wait is the run record's waited_s, not the test's own seconds (what --kvm-durations weighs).
    after = next(t for t in json.loads((pytester.path / "reports" / "run.json").read_text())["tests"]
                 if t["test"].endswith("test_after_the_measurement"))
    assert after["waited_s"] >= 2 and after["duration_s"] < 2, after
    notes = [path.read_text() for path in artifacts.glob("*evidence_breaks*/kvmcheck__evidence_not_gathered.txt")]
    assert notes == ["kvmcheck's own code raised (a bug): RuntimeError: a bug in the evidence"], \
        sorted(map(str, artifacts.rglob("*")))
    assert_nothing_left(workdir, out)
