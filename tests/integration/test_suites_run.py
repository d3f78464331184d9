"""The conformance suites run for real (QEMU under TCG here) and leave nothing behind."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from .conftest import (BACKPORTS_QEMU, SUITES, assert_nothing_left, assert_suites_passed, qemu_processes, run_pytest, skip_reasons)


# Depth checks that boot guests of their own (balloon, durability) (a cloud image takes a minute to boot on a
# busy CI machine); they run in the full suite runs.
OWN_GUEST_DEPTH = "free_page_reporting or deflate_on_oom or fsynced_writes"


# This machine in CI: 2 cores shared by two jobs, one of which may run a nested lab. A healthy
# switch-over measured here took 745 ms beside the other job's guests and 317 ms alone (the
# lab's VMs are no tests, so nothing waits for them), against the 250 ms downtime-limit the
# check sets. So the host declares the suite's default switch-over bound, as a slow host does
# (max_downtime_ms=); the limit check's own mutants, run with no declaration, FAIL by seconds.
CI_SWITCH_OVER_MS = 2000


def test_suites_pass_on_the_local_host(pytester, workdir):
    """Every suite on this machine, its second QEMU (the backports one) offered for version skew,
    on two workers as the README runs it (-n auto on this machine kind: its waits for guests
    and QEMU overlap)."""
    result = run_pytest(pytester, SUITES, f"--kvm-hosts=local?workdir={workdir}&other_qemu={BACKPORTS_QEMU}"
                                          f"&max_downtime_ms={CI_SWITCH_OVER_MS}", "-n", "2", "--dist", "loadscope")
    assert_suites_passed(result, "local")
    caps = next(line for line in result.outlines if line.startswith("kvmcheck: host local: QEMU"))
    if "accel tcg" in caps:
        assert any("needs kvm" in line for line in skip_reasons(result)), "kvm-clock must skip under TCG"
    assert not [line for line in skip_reasons(result) if "needs other-qemu" in line], "version skew must run here"
    assert_nothing_left(workdir, result.stdout.str())


def test_xdist_and_all_reports_together(pytester, workdir):
    out = pytester.path / "reports"
    # The module-shared guests' tests; the depth checks that boot guests of their own add nothing here.
    result = run_pytest(pytester, f"{SUITES}/test_virtio_balloon.py", f"{SUITES}/test_virtio_blk.py", "-n", "2",
                        "-k", f"not ({OWN_GUEST_DEPTH})",
                        f"--kvm-hosts=local?workdir={workdir}", f"--html={out}/r.html", "--self-contained-html",
                        f"--alluredir={out}/allure", f"--junitxml={out}/junit.xml", f"--kvm-artifacts={out}/art")
    assert result.ret == 0, result.stdout.str()[-3000:]
    html = (out / "r.html").read_text()
    for name in ("QEMU argv", "QMP transcript", "serial console", "host capabilities"):
        assert html.count(name) >= 12, f"HTML report lacks {name!r} attachments"
    assert "host local" in html, "HTML environment lacks the host"
    results = [r for p in (out / "allure").glob("*-result.json") for r in [json.loads(p.read_text())]
               if r["status"] != "skipped"]  # a skip (virtio-blk against IDE needs KVM) boots nothing
    assert len(results) == result.parseoutcomes()["passed"] == 15
    for r in results:
        names = {a["name"] for a in r.get("attachments", [])}
        wanted = {"handbook", "host capabilities"} if r["name"].startswith("test_handbook") else \
            {"QEMU argv", "QMP transcript", "serial console", "host capabilities"}
        assert wanted <= names, (r["name"], names)
    assert "host.local=QEMU" in (out / "allure" / "environment.properties").read_text()
    junit = (out / "junit.xml").read_text()
    assert 'name="kvm_host" value="local"' in junit and 'name="accel"' in junit
    assert 'name="handbook"' in junit and "virtio-balloon-pci" in junit
    assert any((out / "art").iterdir())
    assert "id_ed25519" not in html and "PRIVATE KEY" not in html, "a secret leaked into the report"
    assert_nothing_left(workdir, result.stdout.str())


def test_failed_test_carries_dmesg_and_can_keep_its_vm(pytester, workdir):
    pytester.makepyfile(test_fails="""
        from pytest_kvmcheck import VMSpec, vm_fixture
        guest = vm_fixture(VMSpec())
        def test_expect_the_impossible(guest):
            assert guest.run("cat /proc/cmdline").stdout == "nothing"
    """)
    out = pytester.path / "r.html"
    art = pytester.path / "art"
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--html={out}", "--self-contained-html",
                        "--kvm-keep-failed", f"--kvm-artifacts={art}")
    assert result.ret == 1
    assert "guest dmesg" in out.read_text()
    (dmesg,) = art.glob("*/guest_dmesg.txt")
    assert "Linux version" in dmesg.read_text()
    text = result.stdout.str()
    assert "left running" in text and "ssh -i" in text and "kvmcheck cleanup" in text
    assert len(qemu_processes(str(workdir))) == 1, "the failed test's VM should still run"
    cleanup = subprocess.run([sys.executable, "-m", "pytest_kvmcheck.cli", "cleanup",
                              f"--kvm-hosts=local?workdir={workdir}"], capture_output=True, text=True)
    assert cleanup.returncode == 0 and "killed QEMU" in cleanup.stdout, cleanup.stdout + cleanup.stderr
    assert_nothing_left(workdir)


def test_a_failed_tests_report_does_not_log_in_where_no_guest_ran(pytester, workdir):
    """A failed test's report reads each guest's dmesg, but a QEMU still waiting for an incoming
    migration has no guest, and a paused one does not run: it says so at once (a login tried
    there waited a minute per FAIL)."""
    pytester.makepyfile(test_fails_beside_a_destination="""
        from pytest_kvmcheck import VMSpec
        def test_fails(boot_vm):
            vm, paused = boot_vm.many(VMSpec(), 2)
            paused.qmp.cmd("stop")
            boot_vm.start(boot_vm.build(VMSpec(extra_args=("-incoming", "defer"))))
            assert vm.run("echo 1").stdout == "2"
    """)
    art = pytester.path / "art"
    started = time.monotonic()
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--kvm-artifacts={art}")
    took = time.monotonic() - started
    assert result.ret == 1, result.stdout.str()[-3000:]
    dmesgs = {p.name: p.read_text() for p in art.glob("*/*guest_dmesg.txt")}
    assert len(dmesgs) == 3, dmesgs.keys()
    assert sum("Linux version" in text for text in dmesgs.values()) == 1, dmesgs
    assert sum(text.startswith("(none: QEMU is in state inmigrate") for text in dmesgs.values()) == 1, dmesgs
    assert sum(text.startswith("(not read: QEMU is in state paused") for text in dmesgs.values()) == 1, dmesgs
    assert took < 45, f"the run took {took:.0f} s: its report tried to log in where no guest ran"
    assert_nothing_left(workdir)


@pytest.fixture(scope="session")
def cloud_image():
    """A Debian qcow2 cloud image with cloud-init, built from packages (cached; root only)."""
    if os.geteuid() != 0:
        pytest.skip("host local: building the cloud test image needs root (mmdebstrap, loop mount)")
    from pytest_kvmcheck.images.cloud import build_cloud
    return build_cloud().path


def test_suites_pass_with_a_cloud_image_guest(pytester, workdir, cloud_image):
    result = run_pytest(pytester, f"{SUITES}/test_virtio_blk.py", f"{SUITES}/test_virtio_balloon.py", "-n", "2",
                        "--dist", "loadscope", "-k", f"not ({OWN_GUEST_DEPTH})", f"--kvm-guest={cloud_image}",
                        f"--kvm-hosts=local?workdir={workdir}")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed") == 15, result.stdout.str()[-4000:]
    assert_nothing_left(workdir, result.stdout.str())


def test_spread_over_identical_hosts(pytester, workdir):
    """--kvm-spread over two hosts of one build (two names for this machine), each the other's
    migration peer: each host-local feature runs on one of them, and the move (TLS migration)
    runs once, from one to the other; the terminal, run.json and the HTML matrix say who stood
    for whom."""
    hosts = ",".join(f"local?name={n}&workdir={workdir / n}" for n in ("one", "two"))
    for n in ("one", "two"):
        (workdir / n).mkdir()
    result = run_pytest(pytester, f"{SUITES}/test_security.py", f"{SUITES}/test_cmdline.py", "--kvm-spread",
                        f"--kvm-hosts={hosts}", "-n", "2", "--dist", "loadscope", "--html=r.html",
                        "--self-contained-html")
    assert result.ret == 0, result.stdout.str()[-3000:]
    record = json.loads((pytester.path / "reports/run.json").read_text())
    ran = {}
    for t in record["tests"]:
        ran.setdefault((t["feature"], t["test"].rsplit("::", 1)[-1]), []).append(t["host"])
    assert len(ran) == 13 and all(len(where) == 1 for where in ran.values()), f"not spread: {ran}"
    security = ran[("test_security", "test_sandbox_on_installs_a_seccomp_filter")][0]
    cmdline = ran[("test_cmdline", "test_incoming_tcp_0_binds_where_told")][0]
    assert security != cmdline, "the two features went to one host: not balanced"
    mover = ran[("test_security", "test_live_migration_over_tls")][0]
    other = {"one": "two", "two": "one"}
    tls = next(t for t in record["tests"] if t["test"].endswith("test_live_migration_over_tls"))
    assert f"{mover} -> {other[mover]}" in json.dumps(tls["notes"]), f"the move did not cross hosts: {tls['notes']}"
    stood = {name: host["stood_in_by"] for name, host in record["hosts"].items()}
    assert stood[other[security]]["test_security"] == security
    assert stood[other[cmdline]]["test_cmdline"] == cmdline
    assert stood[other[mover]]["test_security::test_live_migration_over_tls"] == mover
    text = result.stdout.str()
    assert re.search(rf"spread: host {other[security]} \(same fingerprint\) was stood for by {security} in "
                     rf"[^\n]*test_security", text), text[-2000:]
    assert re.search(rf"^{other[security]}\s+test_security\s+PASS\s+\((\d+ PASS; )?{security} stood for it: PASS\)",
                     text, re.M), text[-2000:]
    assert f"{security} stood for it: PASS" in (pytester.path / "r.html").read_text()
    assert_nothing_left(workdir, text)
