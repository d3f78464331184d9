"""Handbook 1.x, virtio-net: the paravirtual NIC, with the data path in QEMU or in vhost-net.

The handbook writes ``-net nic,model=virtio`` (still accepted, hub-based) and
``-net tap,vhost=on``; today's form is ``-netdev ...,id=n0 -device virtio-net-pci,netdev=n0``.
In "userspace" mode QEMU moves the packets (user-mode network, the guest's SSH NIC); in
"vhost" mode a second NIC sits on a tap device with vhost=on and the host kernel's
vhost-net moves them, visible as a ``vhost-<qemu pid>`` kernel thread.
"""
import pytest

from pytest_kvmcheck import Nic, VMSpec, vm_fixture
from pytest_kvmcheck.guests.shows import MIB
from pytest_kvmcheck.qemu.legacy import describe, form

net_guest = vm_fixture({
    "userspace": VMSpec(nics=(Nic("virtio-net-pci"),)),
    "vhost": pytest.param(VMSpec(nics=(Nic("virtio-net-pci"), Nic("virtio-net-pci", vhost=True))),
                          marks=pytest.mark.kvm_requires("tap", "vhost-net")),
})


def nic_under_test(vm):
    """The NIC the mode is about (its index, and the guest's view of it)."""
    index = 1 if vm.mode == "vhost" else 0
    return index, vm.guest.nic(vm.mac(index))


def tap_addresses(vm) -> tuple[str, str]:
    """A /30 of the run's own tap link: (host side, guest side)."""
    third, fourth = (vm.seed >> 6) & 0xff, (vm.seed & 0x3f) * 4
    return f"10.201.{third}.{fourth + 1}", f"10.201.{third}.{fourth + 2}"


def test_lspci_shows_virtio_network_device(net_guest):
    """Handbook 1.x: lspci lists "Red Hat, Inc. Virtio network device"."""
    nic = net_guest.guest.pci(name="Virtio network device")
    assert nic and "Red Hat" in nic.name, "expected 'Red Hat, Inc. Virtio network device' in lspci, the guest " \
        "showed:\n" + "\n".join(map(str, net_guest.guest.pci_functions()))


def test_virtio_net_driver_is_bound(net_guest):
    """Handbook 1.x: the NIC is driven by virtio_net on a virtio-pci function."""
    _, nic = nic_under_test(net_guest)
    assert (nic.driver, nic.bus_driver) == ("virtio_net", "virtio-pci"), \
        f"expected {nic.name} driven by virtio_net on a virtio-pci function, got {nic.driver!r} on {nic.bus_driver!r}"


def test_link_is_up(net_guest):
    """Handbook 1.x: the NIC has carrier once up."""
    _, nic = nic_under_test(net_guest)
    if net_guest.mode == "vhost":
        nic.up()
    assert nic.carrier() == "1", f"expected carrier 1 on {nic.name}, the guest shows {nic.carrier()!r}"


def test_traffic_flows_between_guest_and_host(net_guest, kvm_host):
    """Handbook 1.x: traffic crosses the NIC both ways intact, and its counters count it."""
    vm = net_guest
    index, nic = nic_under_test(vm)
    rx0, tx0 = nic.counters()
    if vm.mode == "vhost":
        host_ip, guest_ip = tap_addresses(vm)
        kvm_host.transport.ip.add_address(vm.tap(index), f"{host_ip}/30")
        kvm_host.transport.ip.link_up(vm.tap(index))
        nic.up(f"{guest_ip}/30")
        answered, output = nic.ping(host_ip, count=20, size=1400)
        assert answered, f"expected 20 pings over the vhost NIC to {host_ip} to answer, the guest showed:\n{output}"
        minimum = 20 * 1400
    else:
        moved = vm.guest.transfer(MIB)
        assert moved["guest_received_sha256"] == moved["sent_sha256"], \
            f"1 MiB sent to the guest arrived with another checksum: {moved}"
        assert moved["received_sha256"] == moved["guest_sent_sha256"], \
            f"1 MiB sent by the guest arrived with another checksum: {moved}"
        minimum = MIB
    rx1, tx1 = nic.counters()
    assert rx1 - rx0 >= minimum and tx1 - tx0 >= minimum, \
        f"expected at least {minimum} bytes each way through {nic.name}, its counters moved rx +{rx1 - rx0}, " \
        f"tx +{tx1 - tx0}"


def test_vhost_thread_matches_mode(net_guest, kvm_host):
    """Handbook 1.x: vhost=on shows a vhost-<pid> kernel thread on the host; QEMU's own data path shows none."""
    found = net_guest.process.has_task(f"vhost-{net_guest.pid}")
    assert found == (net_guest.mode == "vhost"), \
        f"{net_guest.mode} mode: expected {'a' if net_guest.mode == 'vhost' else 'no'} vhost-{net_guest.pid} " \
        f"thread on host {kvm_host.name}, found {'one' if found else 'none'}"


def test_handbook_net_option(kvm_host, kvm_note):
    """Handbook 1.x: ``-net nic,model=virtio`` is still accepted (hub-based); -netdev/-device is the form to use."""
    kvm_note("handbook", describe(form("-net nic,model=virtio")))
    legacy = kvm_host.accepts(["-machine", "pc", "-net", "nic,model=virtio", "-net", "user"])
    assert legacy.ok, f"expected QEMU {kvm_host.caps.qemu_version_text} to accept -net nic,model=virtio: " \
                      f"{legacy.stderr.strip()}"
    modern = kvm_host.accepts(["-machine", "pc", "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
    assert modern.ok, f"expected the -netdev/-device form to be accepted: {modern.stderr.strip()}"
