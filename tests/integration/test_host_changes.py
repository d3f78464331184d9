"""Host-wide changes are always given back: a change whose test process is killed is undone by
the next run's start or by ``kvmcheck cleanup``, from the record it left on the host. (That a
host whose spec does not allow changes keeps every knob through a full run is shown by
test_suites_run.py's run on the backports QEMU.)
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

from pytest_kvmcheck.hosts.settings import JOURNAL_DIR

from .conftest import KSM, knobs

KVMCHECK = str(Path(sys.executable).parent / "kvmcheck")
CHANGE_AND_HANG = """
import sys, time
from pytest_kvmcheck.hosts.local import LocalHost
from pytest_kvmcheck.hosts.settings import SysfsSettings
from pytest_kvmcheck.hosts.spec import HostSpec
settings = SysfsSettings(LocalHost(HostSpec(name="local")), "/sys/kernel/mm/ksm", ("pages_to_scan", "sleep_millisecs"))
settings.write("pages_to_scan", int(settings.original["pages_to_scan"]) + 7)
settings.write("sleep_millisecs", int(settings.original["sleep_millisecs"]) + 3)
print(settings.journal.path, flush=True)
time.sleep(600)
"""


def test_a_killed_runs_changes_are_undone_by_cleanup(workdir, ksm_held):
    before = knobs()
    proc = subprocess.Popen([sys.executable, "-c", CHANGE_AND_HANG], stdout=subprocess.PIPE, text=True)
    try:
        journal = proc.stdout.readline().strip()
        assert journal.startswith(JOURNAL_DIR), journal
        assert knobs()[f"{KSM}/pages_to_scan"] == str(int(before[f"{KSM}/pages_to_scan"]) + 7)
        # While its owner lives, nobody undoes it.
        live = subprocess.run([KVMCHECK, "cleanup", f"--kvm-hosts=local?workdir={workdir}"], capture_output=True,
                              text=True, timeout=120)
        assert "undid" not in live.stdout and os.path.exists(journal), live.stdout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.exists(journal), "the killed process's record is gone"
    cleanup = subprocess.run([KVMCHECK, "cleanup", f"--kvm-hosts=local?workdir={workdir}"], capture_output=True,
                             text=True, timeout=120)
    assert cleanup.returncode == 0, cleanup.stderr
    # Undone by this cleanup, or by a run that started meanwhile (CI's other job: its run's start
    # replays stale records too, and once left this cleanup "nothing left behind").
    assert "undid what a killed run changed (pages_to_scan, sleep_millisecs in /sys/kernel/mm/ksm)" in cleanup.stdout \
        or cleanup.stdout.strip() == "host local: nothing left behind", cleanup.stdout
    assert knobs() == before
    assert not os.path.exists(journal)
