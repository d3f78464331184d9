"""Which verdict an ending gets, and how a host x feature cell and Allure read it."""
import json
from collections import Counter

import pytest

from pytest_kvmcheck import errors, verdicts
from pytest_kvmcheck.errors import (GuestBootError, GuestCrashed, GuestCommandError, HostUnreachable, MigrationFailed, PremiseError, QemuExited,
                                    QMPCommandError, QMPLost)


def ending(exc: BaseException) -> pytest.ExceptionInfo:
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - the point is to capture whatever it is
        return pytest.ExceptionInfo.from_current()


@pytest.mark.parametrize("exc, verdict", [
    (AssertionError("host wrong"), "FAIL"),
    (QMPCommandError("device_add", "Bus 'pci.0' does not support hotplugging", "GenericError"), "FAIL"),
    (MigrationFailed("failed", {}), "FAIL"),
    (QMPLost("QEMU died"), "FAIL"),
    (QemuExited("QEMU exited before its guest took an SSH session"), "FAIL"),
    (GuestCrashed("no SSH session to the guest; rcu: INFO: rcu_preempt detected stalls"), "FAIL"),
    (HostUnreachable("no route"), "ERROR"),
    (GuestBootError("no ready marker"), "ERROR"),
    (PremiseError("the guest dirties too slowly"), "ERROR"),
    (ConnectionResetError("peer reset"), "ERROR"),
    (AttributeError("'ExecuteError' object has no attribute 'error_message'"), "BROKEN"),
    (KeyError("x"), "BROKEN"),
    (TypeError("bad call"), "BROKEN"),
    (json.JSONDecodeError("Unterminated string", "{", 0), "BROKEN"),
])
def test_classify(exc, verdict):
    assert verdicts.classify(ending(exc)) == verdict


def test_guest_command_errors_of_our_own_making_are_broken():
    refused = GuestCommandError("dd exited 1", 1, "dd: error writing '/dev/vda': Operation not permitted")
    ours = GuestCommandError("head exited 1", 1, "head: invalid number '4M'")
    missing = GuestCommandError("fio exited 127", 127, "sh: fio: not found")
    assert [verdicts.classify(ending(e)) for e in (refused, ours, missing)] == ["FAIL", "BROKEN", "BROKEN"]


def test_classify_pytest_outcomes():
    assert verdicts.classify(None) == "PASS"
    assert verdicts.classify(ending(pytest.skip.Exception("host x: needs y: z"))) == "SKIP"
    assert verdicts.classify(ending(pytest.fail.Exception("explicit"))) == "FAIL"


def test_qmp_error_message_names_qemus_class_and_words():
    exc = QMPCommandError("device_add", "Bus 'pci.0' does not support hotplugging", "GenericError")
    assert str(exc) == "QMP device_add refused by QEMU: GenericError: Bus 'pci.0' does not support hotplugging"


@pytest.mark.parametrize("counts, cell", [
    ({"PASS": 3, "SKIP": 1}, "PASS"),
    ({"PASS": 3, "BROKEN": 1}, "BROKEN"),
    ({"PASS": 1, "FAIL": 1, "BROKEN": 1}, "FAIL"),
    ({"PASS": 1, "ERROR": 1}, "ERROR"),
    ({"SKIP": 2}, "SKIP"),
])
def test_cell_verdict(counts, cell):
    assert verdicts.cell_verdict(Counter(counts)) == cell


def test_allure_results_take_the_verdicts_status(tmp_path):
    def result(name, status, verdict):
        (tmp_path / f"{name}-result.json").write_text(json.dumps({
            "name": name, "status": status, "statusDetails": {"message": "QMP device_add refused"},
            "labels": [{"name": "kvm_verdict", "value": verdict}]}))
    result("refused", "broken", "FAIL")  # allure-pytest calls any non-assertion exception broken
    result("bug", "broken", "BROKEN")
    result("premise", "broken", "ERROR")
    assert verdicts.retag_allure_results(tmp_path) == 2
    statuses = {p.name.split("-")[0]: json.loads(p.read_text())["status"] for p in tmp_path.glob("*.json")}
    assert statuses == {"refused": "failed", "bug": "broken", "premise": "unknown"}
    message = json.loads((tmp_path / "refused-result.json").read_text())["statusDetails"]["message"]
    assert message == "FAIL: QMP device_add refused"


@pytest.mark.parametrize("exc", [
    errors.GuestBootError("VM g did not boot"),
    errors.QMPCommandError("device_add", "Bus 'pci.0' does not support hotplugging", "GenericError"),
    errors.MigrationFailed("migration failed", {"status": "failed"}),
])
def test_a_shared_guests_boot_error_is_raised_again_as_a_copy(exc):
    try:
        raise exc
    except errors.KvmCheckError:
        pass
    copy = errors.again(exc)
    assert type(copy) is type(exc) and str(copy) == str(exc) and vars(copy) == vars(exc)
    assert copy is not exc and copy.__traceback__ is None
