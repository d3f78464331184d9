"""Continuity across a migration: what differs is named, on the guest's side and QEMU's."""
from pytest_kvmcheck.qemu.migration import GuestState, MachineState

PCI = ("00:00.0 8086:1237 class 0x0600 id=", "00:02.0 1af4:1000 class 0x0200 id=nic0")
MACHINE = MachineState("pc-i440fx-7.2-machine", PCI, ("balloon0", "nic0"), 1, 512 << 20, 384 << 20)
BEFORE = GuestState(10.0, "abc", 5, "42", ("00:00.0 0600: 8086:1237", "00:02.0 0200: 1af4:1000"), MACHINE)


def test_the_same_machine_shows_no_difference():
    after = GuestState(12.0, "abc", 9, "42", BEFORE.lspci, MACHINE)
    assert BEFORE.differences(after) == []


def test_one_device_more_on_the_destination_is_named_on_both_sides():
    extra = "00:05.0 1af4:1005 class 0x00ff id="
    machine = MachineState(MACHINE.machine_type, (*PCI, extra), MACHINE.peripherals, 1, 512 << 20, 384 << 20)
    after = GuestState(12.0, "abc", 9, "42", (*BEFORE.lspci, "00:05.0 00ff: 1af4:1005"), machine)
    problems = BEFORE.differences(after)
    assert problems == [
        "the guest's PCI functions (lspci -n) after the move: extra 00:05.0 00ff: 1af4:1005",
        f"QEMU's PCI functions (query-pci) after the move: extra {extra}",
    ]


def test_machine_type_cpus_memory_balloon_and_ids():
    other = MachineState("pc-q35-7.2-machine", PCI, ("nic0",), 2, 1024 << 20, None)
    problems = MACHINE.differences(other)
    assert problems[0] == "the machine type changed from pc-i440fx-7.2-machine to pc-q35-7.2-machine"
    assert "QEMU's device ids (/machine/peripheral) after the move: missing balloon0" in problems
    assert "QEMU's vCPUs changed from 1 to 2" in problems and any("RAM bytes" in p for p in problems)
    assert "QEMU's balloon target changed from 402653184 to None" in problems


def test_a_reboot_and_a_stopped_process_are_named():
    after = GuestState(2.0, "abc", 5, "43", BEFORE.lspci, MACHINE)
    problems = BEFORE.differences(after)
    assert any("rebooted" in p for p in problems) and any("changed pid" in p for p in problems)
    assert any("stopped at 5" in p for p in problems)
