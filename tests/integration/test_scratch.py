"""A host's scratch dir: guests that never migrate live there, the rest in the (shared) workdir,
and a run leaves neither behind, nor a dead run's leftovers in either."""
import json
import os

from .conftest import assert_nothing_left, run_pytest, verdicts_of

TESTS = '''
import pytest
from pytest_kvmcheck import Disk, VMSpec

def test_a_guest_that_stays(boot_vm):
    vm = boot_vm(VMSpec(disks=(Disk(size_mib=16, serial="stay0"),)))
    assert vm.dir.startswith("{scratch}/runs/"), vm.dir
    assert vm.disk_paths[0].startswith(vm.dir), vm.disk_paths
    assert vm.disk_cache == "writeback"
    assert vm.guest.block_device("stay0").write_pattern(1)

def test_a_guest_with_a_peer(boot_vm, kvm_peer):
    vm = boot_vm.build(VMSpec())
    assert vm.dir.startswith("{workdir}/runs/"), vm.dir
'''


def test_guests_that_stay_live_in_the_scratch_dir(pytester, workdir, tmp_path):
    scratch = workdir / "scratch"
    stale = scratch / "runs" / "deadbeef"  # a killed run's dir there: the next run removes it
    stale.mkdir(parents=True)
    (stale / "owner.json").write_text(json.dumps({"client": os.uname().nodename, "pid": 2 ** 22 + 1,
                                                  "boot_id": "", "started": 0}))
    pytester.makepyfile(test_scratch=TESTS.format(scratch=scratch, workdir=workdir))
    junit = tmp_path / "junit.xml"
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}&scratch={scratch}&accel=tcg",
                        f"--junitxml={junit}")
    verdicts = verdicts_of(junit)
    assert {name: v for name, (v, _) in verdicts.items()} == {
        "test_a_guest_that_stays[local]": "PASS", "test_a_guest_with_a_peer[local]": "PASS"}, verdicts
    assert not stale.exists(), "a dead run's dir in the scratch dir was left"
    assert_nothing_left(workdir, result.stdout.str())
    assert_nothing_left(scratch, result.stdout.str())
