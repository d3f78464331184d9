"""Verdict classes end to end: each kind of ending reads as its verdict in every report.

Inline tests against the local host end as PASS, FAIL (an assertion; a QMP command a real
QEMU refuses), ERROR (a premise that does not hold), BROKEN (our own code raising) and
SKIP; the terminal table, JUnit, the HTML report and the Allure results must all agree,
and BROKEN is counted apart.
"""
import json
import re
import xml.etree.ElementTree as ET

from .conftest import assert_nothing_left, run_pytest

INLINE = """
import pytest
from pytest_kvmcheck import VMSpec, vm_fixture
from pytest_kvmcheck.errors import QMPCommandError, premise

guest = vm_fixture(VMSpec())

def test_pass(guest):
    assert guest.run("true").ok

def test_fail_assertion(guest):
    assert guest.run("echo 1").stdout.strip() == "2", "the guest counts differently"

def test_fail_refused_qmp(guest):
    # slot 0 holds the host bridge: QEMU refuses the plug
    guest.qmp.cmd("device_add", driver="virtio-net-pci", id="refused", bus="pci.0", addr="0x0")

def test_refused_qmp_carries_qemus_words(guest):
    with pytest.raises(QMPCommandError) as refused:
        guest.qmp.cmd("device_add", driver="no-such-device-kvmcheck", id="x")
    assert refused.value.error_class == "GenericError"
    assert "no-such-device-kvmcheck" in refused.value.desc
    assert '"class": "GenericError"' in "\\n".join(guest.qmp.transcript)

def test_error_premise(kvm_host):
    premise(False, "a premise this host cannot give")

def test_broken_our_bug(kvm_host):
    {}["a key our code forgot"]

def test_skip(kvm_host):
    pytest.skip(f"host {kvm_host.name}: needs nothing-at-all: for the test")
"""

EXPECTED = {"test_pass": "PASS", "test_fail_assertion": "FAIL", "test_fail_refused_qmp": "FAIL",
            "test_refused_qmp_carries_qemus_words": "PASS", "test_error_premise": "ERROR",
            "test_broken_our_bug": "BROKEN", "test_skip": "SKIP"}
ALLURE = {"PASS": "passed", "FAIL": "failed", "ERROR": "unknown", "BROKEN": "broken", "SKIP": "skipped"}


def test_every_report_shows_the_verdict_class(pytester, workdir):
    pytester.makepyfile(test_endings=INLINE)
    out = pytester.path / "reports"
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--junitxml={out}/junit.xml",
                        f"--html={out}/r.html", "--self-contained-html", f"--alluredir={out}/allure")
    text = result.stdout.str()
    assert result.ret == 1, text[-3000:]
    # Terminal: the cell names the worst host verdict, the counts name every class, BROKEN apart.
    assert re.search(r"^local\s+test_endings\s+FAIL\s+\(2 PASS, 2 FAIL, 1 ERROR, 1 BROKEN, 1 SKIP\)", text, re.M), \
        text[-3000:]
    assert "kvmcheck verdicts: 2 PASS, 2 FAIL, 1 ERROR, 1 BROKEN, 1 SKIP (1 BROKEN: bugs in kvmcheck itself" in text
    # A refused QMP command reads as QEMU's own words, never as our AttributeError.
    assert "AttributeError" not in text
    assert re.search(r"QMP device_add refused by QEMU: GenericError: .*slot 0 function 0 not available", text), text[-3000:]

    root = ET.parse(out / "junit.xml").getroot()
    cases = {case.get("name").split("[")[0]: case for case in root.iter("testcase")}
    for name, verdict in EXPECTED.items():
        props = {p.get("name"): p.get("value") for p in cases[name].iter("property")}
        assert props.get("kvm_verdict") == verdict, (name, props)
    assert "AttributeError" not in (out / "junit.xml").read_text()
    suite_props = {p.get("name"): p.get("value") for p in root.find("testsuite").find("properties")}
    assert suite_props["kvm_BROKEN"] == "1" and suite_props["kvm_FAIL"] == "2", suite_props

    html = (out / "r.html").read_text()
    assert "kvmcheck verdicts" in html and "1 BROKEN" in html and "col-kvm-verdict" in html

    statuses = {}
    for path in (out / "allure").glob("*-result.json"):
        r = json.loads(path.read_text())
        statuses[r["name"].split("[")[0]] = r["status"]
    assert statuses == {name: ALLURE[v] for name, v in EXPECTED.items()}, statuses
    assert_nothing_left(workdir, text)
