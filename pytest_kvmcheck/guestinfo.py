"""What a guest sees: small readers over guest commands, shared by the suites.

Each returns plain data; the suites assert on it and say what they expected and what
the guest showed.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re

from .vm import VM
from .vmspec import nic_mac

MIB = 1024 * 1024


def lspci(vm: VM) -> list[str]:
    """``lspci`` lines, names resolved through pci.ids as the handbook shows them."""
    return vm.run("lspci", check=True).stdout.splitlines()


def pci_ids(vm: VM) -> list[str]:
    """vendor:device of every PCI function the guest sees (``lspci -n``), in bus order."""
    return [line.split()[2] for line in vm.run("lspci -n", check=True).stdout.splitlines()]


def lspci_line(vm: VM, name: str) -> str | None:
    return next((line for line in lspci(vm) if name in line), None)


def driver_of(vm: VM, sysfs_device: str) -> str:
    """The driver bound to a sysfs device dir ('' if none)."""
    out = vm.run(["readlink", f"{sysfs_device}/driver"]).stdout.strip()
    return out.rsplit("/", 1)[-1]


def pci_driver(vm: VM, vendor_device: str) -> str:
    """The driver bound to the first PCI device with ``vendor:device`` (e.g. 1af4:1000)."""
    out = vm.run(f"lspci -n -D -d {vendor_device}", check=True).stdout.split()
    if not out:
        return ""
    return driver_of(vm, f"/sys/bus/pci/devices/{out[0]}")


def iface_by_mac(vm: VM, mac: str) -> str:
    for name in vm.run("ls /sys/class/net", check=True).stdout.split():
        if vm.run(["cat", f"/sys/class/net/{name}/address"]).stdout.strip() == mac.lower():
            return name
    raise AssertionError(f"guest {vm.name}: no interface with MAC {mac}; it has: "
                         f"{vm.run('ip -o link').stdout.strip()}")


def bring_up_bridged_nic(vm: VM, index: int, cidr: str) -> str:
    """Give bridged NIC ``index`` its address on the bridge's subnet; returns the bare address."""
    address = vm.bridged_address(index, cidr)
    iface = iface_by_mac(vm, nic_mac(vm.spec, index, vm.seed))
    vm.run(["ip", "addr", "add", address, "dev", iface], check=True)
    vm.run(["ip", "link", "set", iface, "up"], check=True)
    return address.split("/")[0]


def nic_counters(vm: VM, iface: str) -> tuple[int, int]:
    out = vm.run(f"cat /sys/class/net/{iface}/statistics/rx_bytes /sys/class/net/{iface}/statistics/tx_bytes",
                 check=True).stdout.split()
    return int(out[0]), int(out[1])


def meminfo(vm: VM) -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in vm.run("cat /proc/meminfo", check=True).stdout.splitlines():
        m = re.match(r"(\w+):\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def transfer_through_guest(vm: VM, nbytes: int = MIB) -> dict:
    """Send ``nbytes`` of random data into the guest and get as much back, over its SSH (its NIC).

    Returns the checksums on both sides and the bytes moved, for the caller to compare.
    """
    payload = os.urandom(nbytes)
    sent = vm.guest.run("base64 -d | sha256sum", input=base64.b64encode(payload).decode(), timeout=60)
    back = vm.run(f"head -c {nbytes} /dev/urandom > /tmp/kvmcheck.out && sha256sum /tmp/kvmcheck.out "
                  f"&& base64 /tmp/kvmcheck.out && rm /tmp/kvmcheck.out", timeout=60, check=True)
    lines = back.stdout.split("\n", 1)
    returned = base64.b64decode(lines[1])
    return {
        "sent_sha256": hashlib.sha256(payload).hexdigest(),
        "guest_received_sha256": sent.stdout.split()[0] if sent.stdout else "",
        "guest_sent_sha256": lines[0].split()[0],
        "received_sha256": hashlib.sha256(returned).hexdigest(),
        "received_bytes": len(returned),
    }


def disk_round_trip(vm: VM, device: str, mib: int = 4) -> tuple[str, str]:
    """Write ``mib`` MiB of random data to ``device``, drop caches, read back; both sha256s."""
    vm.run(f"head -c {mib * MIB} /dev/urandom > /tmp/pattern", check=True, timeout=60)
    written = vm.run("sha256sum /tmp/pattern", check=True).stdout.split()[0]
    # dd keeps its stderr: a refused write must say why.
    vm.run(f"dd if=/tmp/pattern of={device} bs=1M conv=fsync && rm /tmp/pattern", check=True, timeout=60)
    vm.run("sync; echo 3 > /proc/sys/vm/drop_caches", check=True)
    read = vm.run(f"dd if={device} bs=1M count={mib} 2>/dev/null | sha256sum", check=True,
                  timeout=60).stdout.split()[0]
    return written, read


def block_device_by_serial(vm: VM, serial: str) -> str:
    """The block device (``vdb``) whose serial is ``serial``: names depend on the guest's boot disk."""
    for name in vm.run("ls /sys/block", check=True).stdout.split():
        if vm.run(["cat", f"/sys/block/{name}/serial"]).stdout.strip() == serial:
            return name
    raise AssertionError(f"guest {vm.name}: no block device with serial {serial!r}; it has: "
                         f"{vm.run('ls /sys/block').stdout.split()}")


def block_size_bytes(vm: VM, name: str) -> int:
    return int(vm.run(["cat", f"/sys/block/{name}/size"], check=True).stdout) * 512
