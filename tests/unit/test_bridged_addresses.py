"""Guests' addresses on a shared bridge: leased run-wide, never two guests on one address."""
import pytest

from pytest_kvmcheck.errors import VMError
from pytest_kvmcheck.hosts.footprint import HostRun
from pytest_kvmcheck.qemu.spec import VMSpec
from pytest_kvmcheck.qemu.vm import VM

CIDR = "10.202.150.1/24"


def vm(name, leases, seed=45):
    made = VM(None, VMSpec(), name=name, host_run=HostRun("/w/runs/r", "", "", ""), run_key=None, accel="tcg")
    made.seed, made.address_leases = seed, leases
    return made


def test_two_guests_with_one_seed_get_two_addresses(tmp_path):
    first, second = vm("gw0-21", tmp_path), vm("gw1-21", tmp_path)
    assert first.bridged_address(1, CIDR) == "10.202.150.246/24"
    assert second.bridged_address(1, CIDR) == "10.202.150.247/24"  # .246 is leased: the next one
    assert first.bridged_address(1, CIDR) == "10.202.150.246/24"  # asked again: the same lease


def test_a_lease_ends_with_its_vm_and_none_is_left_for_the_51st(tmp_path, monkeypatch):
    guests = [vm(f"gw0-{i}", tmp_path) for i in range(50)]
    taken = {g.bridged_address(1, CIDR) for g in guests}
    assert len(taken) == 50
    with pytest.raises(VMError, match="every guest address .200-.249 of 10.202.150.0/24 is taken"):
        vm("gw0-50", tmp_path).bridged_address(1, CIDR)
    for g in guests:  # what destroy does once QEMU has stopped and the dir is gone
        monkeypatch.setattr(g, "stop", lambda: None)
        monkeypatch.setattr(g, "host", type("H", (), {"remove_tree_now": lambda self, d: True})())
        g.destroy()
    assert not list(tmp_path.iterdir())
    assert vm("gw0-51", tmp_path).bridged_address(1, CIDR) == "10.202.150.246/24"
