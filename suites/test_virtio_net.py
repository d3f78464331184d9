"""Handbook 1.x, virtio-net: the paravirtual NIC, with the data path in QEMU or in vhost-net.

The handbook writes ``-net nic,model=virtio`` (still accepted, hub-based) and
``-net tap,vhost=on``; today's form is ``-netdev ...,id=n0 -device virtio-net-pci,netdev=n0``.
In "userspace" mode QEMU moves the packets (user-mode network, the guest's SSH NIC); in
"vhost" mode a second NIC sits on a tap device with vhost=on and the host kernel's
vhost-net moves them, visible as a ``vhost-<qemu pid>`` kernel thread.
"""
import pytest

from pytest_kvmcheck import Nic, VMSpec, vm_fixture
from pytest_kvmcheck.guestinfo import (MIB, driver_of, iface_by_mac, lspci, lspci_line, nic_counters,
                                       transfer_through_guest)
from pytest_kvmcheck.handbook import describe, form, try_options
from pytest_kvmcheck.vmspec import nic_mac, tap_name

net_guest = vm_fixture({
    "userspace": VMSpec(nics=(Nic("virtio-net-pci"),)),
    "vhost": pytest.param(VMSpec(nics=(Nic("virtio-net-pci"), Nic("virtio-net-pci", vhost=True))),
                          marks=pytest.mark.kvm_requires("tap", "vhost-net")),
})


def nic_under_test(vm) -> tuple[int, str]:
    """(NIC index, guest interface) of the NIC the mode is about."""
    index = 1 if vm.mode == "vhost" else 0
    return index, iface_by_mac(vm, nic_mac(vm.spec, index, vm.seed))


def tap_addresses(vm) -> tuple[str, str]:
    """A /30 of the run's own tap link: (host side, guest side)."""
    third, fourth = (vm.seed >> 6) & 0xff, (vm.seed & 0x3f) * 4
    return f"10.201.{third}.{fourth + 1}", f"10.201.{third}.{fourth + 2}"


def test_lspci_shows_virtio_network_device(net_guest):
    line = lspci_line(net_guest, "Virtio network device")
    assert line and "Red Hat" in line, \
        "expected 'Red Hat, Inc. Virtio network device' in lspci, the guest showed:\n" + "\n".join(lspci(net_guest))


def test_virtio_net_driver_is_bound(net_guest):
    _, iface = nic_under_test(net_guest)
    virtio_driver = driver_of(net_guest, f"/sys/class/net/{iface}/device")
    pci_driver = driver_of(net_guest, f"/sys/class/net/{iface}/device/..")
    assert (virtio_driver, pci_driver) == ("virtio_net", "virtio-pci"), \
        f"expected {iface} driven by virtio_net on a virtio-pci function, got {virtio_driver!r} on {pci_driver!r}"


def test_link_is_up(net_guest):
    _, iface = nic_under_test(net_guest)
    if net_guest.mode == "vhost":
        net_guest.run(["ip", "link", "set", iface, "up"], check=True)
    state = net_guest.run(["cat", f"/sys/class/net/{iface}/carrier"]).stdout.strip()
    assert state == "1", f"expected carrier 1 on {iface}, the guest shows {state!r}"


def test_traffic_flows_between_guest_and_host(net_guest, kvm_host):
    vm = net_guest
    index, iface = nic_under_test(vm)
    rx0, tx0 = nic_counters(vm, iface)
    if vm.mode == "vhost":
        host_ip, guest_ip = tap_addresses(vm)
        tap = tap_name(vm.seed, index)
        kvm_host.transport.run(["ip", "addr", "add", f"{host_ip}/30", "dev", tap]).check()
        kvm_host.transport.run(["ip", "link", "set", tap, "up"]).check()
        vm.run(["ip", "link", "set", iface, "up"], check=True)
        vm.run(["ip", "addr", "add", f"{guest_ip}/30", "dev", iface], check=True)
        ping = vm.run(["ping", "-c", "20", "-i", "0.05", "-s", "1400", "-W", "2", host_ip], timeout=30)
        assert ping.ok and " 0% packet loss" in ping.stdout, \
            f"expected 20 pings over the vhost NIC to {host_ip} to answer, the guest showed:\n{ping.stdout}"
        minimum = 20 * 1400
    else:
        moved = transfer_through_guest(vm, MIB)
        assert moved["guest_received_sha256"] == moved["sent_sha256"], \
            f"1 MiB sent to the guest arrived with another checksum: {moved}"
        assert moved["received_sha256"] == moved["guest_sent_sha256"], \
            f"1 MiB sent by the guest arrived with another checksum: {moved}"
        minimum = MIB
    rx1, tx1 = nic_counters(vm, iface)
    assert rx1 - rx0 >= minimum and tx1 - tx0 >= minimum, \
        f"expected at least {minimum} bytes each way through {iface}, its counters moved rx +{rx1 - rx0}, tx +{tx1 - tx0}"


def test_vhost_thread_matches_mode(net_guest, kvm_host):
    """vhost=on shows a vhost-<pid> kernel thread on the host; QEMU's own data path shows none."""
    found = kvm_host.transport.run(["pgrep", "-x", f"vhost-{net_guest.pid}"]).ok
    assert found == (net_guest.mode == "vhost"), \
        f"{net_guest.mode} mode: expected {'a' if net_guest.mode == 'vhost' else 'no'} vhost-{net_guest.pid} " \
        f"thread on host {kvm_host.name}, found {'one' if found else 'none'}"


def test_handbook_net_option(kvm_host, kvm_note):
    """``-net nic,model=virtio``: still accepted (hub-based); -netdev/-device is the form to use."""
    row = form("-net nic,model=virtio")
    kvm_note("handbook", describe(row))
    legacy = try_options(kvm_host, ["-machine", "pc", "-net", "nic,model=virtio", "-net", "user"])
    assert legacy.ok, f"expected QEMU {kvm_host.caps.qemu_version_text} to accept -net nic,model=virtio: " \
                      f"{legacy.stderr.strip()}"
    modern = try_options(kvm_host, ["-machine", "pc", "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
    assert modern.ok, f"expected the -netdev/-device form to be accepted: {modern.stderr.strip()}"
