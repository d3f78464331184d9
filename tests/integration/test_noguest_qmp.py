"""The handbook's no-guest QEMU queries read the whole answer, every time, even on a busy CPU.

query-qmp-schema is the largest answer QEMU gives (hundreds of KiB on one line). Written on
stdio with ``quit`` right behind it, QEMU could exit before flushing it, and a suite then
failed on a cut-off JSON for no fault of the host's.
"""
from .conftest import assert_nothing_left, run_pytest

INLINE = """
import json, subprocess, sys
from pytest_kvmcheck.qemu.noguest import NoGuestQemu

def schema(kvm_host):
    with NoGuestQemu(kvm_host.transport, kvm_host.run_dir) as monitor:
        return monitor.cmd("query-qmp-schema")

def test_schema_fifty_times_under_load(kvm_host):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        first = schema(kvm_host)
        text = json.dumps(first, sort_keys=True)
        assert len(text) > 100_000 and any(e.get("name") == "migrate" for e in first), len(text)
        for attempt in range(49):
            again = schema(kvm_host)
            assert json.dumps(again, sort_keys=True) == text, f"read {attempt + 2} differs from the first"
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
"""


def test_schema_reads_complete_fifty_times_on_a_busy_cpu(pytester, workdir):
    pytester.makepyfile(test_schema=INLINE)
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}")
    assert result.ret == 0, result.stdout.str()[-3000:]
    result.assert_outcomes(passed=1)
    assert_nothing_left(workdir, result.stdout.str())
