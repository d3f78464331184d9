"""What a guest shows, in the suites' words: its PCI functions, disks, NICs, clock, memory, CPUs.

``vm.guest.pci(vendor_device="1af4:1002")``, ``vm.guest.block_device("serial0").checksum(4)``,
``vm.guest.nic(mac).counters()``: every command a suite needs from inside a guest is written
here, once, its output parsed by a pure function tested in tests/unit/test_shows.py. A suite
asserts on the plain data these return and says what it expected and what the guest showed.
The tiny guest's tools are busybox plus pciutils, iproute2, dropbear.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from typing import Iterable

from ..clock import parse_wall_clock

MIB = 1024 * 1024


@dataclass(frozen=True)
class PciFunction:
    """One line of ``lspci -D -nn -k``."""

    address: str  # 0000:00:03.0
    class_name: str  # Ethernet controller
    class_id: str  # 0200
    name: str  # Red Hat, Inc. Virtio network device
    vendor_device: str  # 1af4:1000
    driver: str  # virtio-pci ("" if none is bound)

    def __str__(self) -> str:
        return f"{self.address} {self.class_name} [{self.class_id}]: {self.name} [{self.vendor_device}]" + \
            (f" (driver {self.driver})" if self.driver else " (no driver)")


_LSPCI = re.compile(r"^(\S+) (.+?) \[([0-9a-f]{4})\]: (.+?) \[([0-9a-f]{4}:[0-9a-f]{4})\]( \(rev [0-9a-f]+\))?"
                    r"( \(prog-if .*\))?$")


def listening_ports(text: str) -> set[int]:
    """The TCP ports in LISTEN state in /proc/net/tcp (and tcp6) lines: ``sl local rem st ...``,
    the local address ``HEXADDR:HEXPORT``, state 0A."""
    ports = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def parse_lspci(text: str) -> list[PciFunction]:
    """``lspci -D -nn -k`` output as :class:`PciFunction` records, in bus order."""
    out: list[PciFunction] = []
    for line in text.splitlines():
        m = _LSPCI.match(line)
        if m:
            out.append(PciFunction(m.group(1), m.group(2), m.group(3), m.group(4), m.group(5), ""))
        elif line.strip().startswith("Kernel driver in use:") and out:
            last = out[-1]
            out[-1] = PciFunction(last.address, last.class_name, last.class_id, last.name, last.vendor_device,
                                  line.split(":", 1)[1].strip())
    return out


def parse_cpu_list(text: str) -> set[int]:
    """A kernel CPU list (``0-2,4``) as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if "-" in part:
            first, last = part.split("-")
            cpus.update(range(int(first), int(last) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in KiB."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+)", text, re.M)}


def first_checksum(text: str) -> str:
    """The hash of ``sha256sum``'s first line."""
    return text.split()[0] if text.split() else ""


# The first line of a report the guest's kernel prints when it crashes (an oops, a BUG, a
# panic, a warning): what its console's last lines, all registers and trace, leave out.
_CRASH = re.compile(r"^(?:\[[ \d.]+\] )?(?:BUG: |Oops: |general protection fault|Kernel panic - |kernel BUG at "
                    r"|WARNING: CPU: |------------\[ cut here \]------------|rcu: INFO: rcu_\w+ detected stalls"
                    r"|watchdog: BUG: soft lockup)", re.M)


def kernel_crashed(text: str) -> bool:
    """Whether a guest's serial console holds its kernel's report of a crash or a stalled CPU."""
    return _CRASH.search(text) is not None


def crash_report(text: str) -> str:
    """The guest kernel's crash or stall report in a console or a kernel log, "" if none."""
    return console_excerpt(text, 1) if kernel_crashed(text) else ""


def console_excerpt(text: str, lines: int, report_lines: int = 30) -> str:
    """What an error shows of a guest's serial console: its last ``lines``; where the guest's
    kernel reported a crash, the report from its first line instead (its last lines are only
    registers), with the console's last line after it."""
    crash = _CRASH.search(text)
    if crash is None:
        return "\n".join(text.splitlines()[-lines:])
    report = text[crash.start():].splitlines()
    shown = report[:report_lines]
    if len(report) > report_lines:
        shown += [f"[... {len(report) - report_lines - 1} more lines ...]", report[-1]]
    return "the guest's kernel reported a crash or a stall:\n" + "\n".join(shown)


@dataclass(frozen=True)
class DirectReads:
    """What one run of kvmcheck-io read."""

    ops: int
    nbytes: int
    seconds: float

    @property
    def iops(self) -> float:
        return self.ops / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


class BlockDevice:
    """A disk the guest sees (``vdb``), found by its serial."""

    def __init__(self, guest: "GuestShows", name: str):
        self.guest, self.name = guest, name
        self.path = f"/dev/{name}"

    def __repr__(self) -> str:
        return f"<BlockDevice {self.name} of {self.guest.name}>"

    @property
    def size_bytes(self) -> int:
        return int(self.guest.read(f"/sys/block/{self.name}/size")) * 512

    @property
    def driver(self) -> str:
        return self.guest.driver_of(f"/sys/block/{self.name}/device")

    def write_pattern(self, mib: int, offset_mib: int = 0) -> str:
        """Write ``mib`` MiB of random data at ``offset_mib``, synced to the disk; returns its sha256."""
        p, err = "/tmp/kvmcheck-pattern", "/tmp/kvmcheck-dd.err"
        # dd's own words go to stderr when it fails: a refused write must say why.
        out = self.guest.run(f"head -c {mib * MIB} /dev/urandom > {p} && sha256sum < {p} && "
                             f"dd if={p} of={self.path} bs=1M seek={offset_mib} conv=fsync 2>{err} "
                             f"|| {{ cat {err} >&2; rm -f {p}; exit 1; }}; rm -f {p}", check=True, timeout=60).stdout
        return first_checksum(out)

    def checksum(self, mib: int, offset_mib: int = 0) -> str:
        """sha256 of ``mib`` MiB at ``offset_mib``, read from the disk (the page cache dropped first).

        Read into a file, not a pipe: a failed read must fail the command, and a disk-image
        guest's /bin/sh (dash) has no ``pipefail``."""
        f, err = "/tmp/kvmcheck-read", "/tmp/kvmcheck-dd.err"
        out = self.guest.run(f"sync; echo 3 > /proc/sys/vm/drop_caches; "
                             f"dd if={self.path} of={f} bs=1M skip={offset_mib} count={mib} 2>{err} "
                             f"|| {{ cat {err} >&2; exit 1; }}; sha256sum < {f}; rm -f {f}", check=True, timeout=60).stdout
        return first_checksum(out)

    def direct_reads(self, pattern: str, seconds: float) -> "DirectReads":
        """Read for ``seconds`` with O_DIRECT, one request at a time (the tiny guest's
        kvmcheck-io): ``seqread`` 1 MiB in order, ``randread`` 4 KiB at random offsets."""
        out = self.guest.run(["kvmcheck-io", pattern, self.path, f"{seconds:g}"], check=True,
                             timeout=seconds + 60).stdout
        ops, nbytes, took = re.fullmatch(r"ops (\d+) bytes (\d+) seconds ([\d.]+)\s*", out).groups()
        return DirectReads(int(ops), int(nbytes), float(took))

    def read_sector(self, sector: int) -> str:
        """The text in one 512-byte sector (a counter a writer left there)."""
        return self.guest.run(f"dd if={self.path} bs=512 skip={sector} count=1 2>/dev/null", check=True).stdout


class GuestNic:
    """A network interface of the guest, found by its MAC."""

    def __init__(self, guest: "GuestShows", name: str):
        self.guest, self.name = guest, name
        self.sysfs = f"/sys/class/net/{name}"

    def __repr__(self) -> str:
        return f"<GuestNic {self.name} of {self.guest.name}>"

    @property
    def driver(self) -> str:
        """The network driver (virtio_net, e1000, ...)."""
        return self.guest.driver_of(f"{self.sysfs}/device")

    @property
    def bus_driver(self) -> str:
        """The driver of the function under it (virtio-pci for a virtio NIC, the NIC's own otherwise)."""
        return self.guest.driver_of(f"{self.sysfs}/device/..")

    def carrier(self) -> str:
        return self.guest.run(["cat", f"{self.sysfs}/carrier"]).stdout.strip()

    def counters(self) -> tuple[int, int]:
        """(rx_bytes, tx_bytes)."""
        out = self.guest.run(["cat", f"{self.sysfs}/statistics/rx_bytes", f"{self.sysfs}/statistics/tx_bytes"],
                             check=True).stdout.split()
        return int(out[0]), int(out[1])

    def up(self, address: str | None = None) -> "GuestNic":
        """Set the link up, with ``address`` (CIDR) added first if given."""
        if address:
            self.guest.run(["ip", "addr", "add", address, "dev", self.name], check=True)
        self.guest.run(["ip", "link", "set", self.name, "up"], check=True)
        return self

    def ping(self, address: str, count: int = 20, size: int = 1400) -> tuple[bool, str]:
        """(every ping answered, ping's output)."""
        result = self.guest.run(["ping", "-c", str(count), "-i", "0.05", "-s", str(size), "-W", "2", address],
                                timeout=30)
        return result.ok and " 0% packet loss" in result.stdout, result.stdout


@dataclass
class HeldMemory:
    """Guest RAM taken by :meth:`GuestShows.hold_memory`; ``release()`` gives it back."""

    guest: "GuestShows"
    where: str

    def release(self) -> None:
        self.guest.run(["umount", self.where], check=True)


class GuestShows:
    """The guest vocabulary; mixed into :class:`~.session.GuestSession`, which supplies ``run``."""

    name: str

    def run(self, command, timeout: float = 30.0, check: bool = False, input: str | None = None):
        raise NotImplementedError  # pragma: no cover - GuestSession's

    def read(self, path: str) -> str:
        return self.run(["cat", path], check=True).stdout

    def write(self, path: str, text: str) -> None:
        """Write ``text`` (and a newline) to ``path``."""
        self.run(["sh", "-c", 'printf "%s\\n" "$1" > "$2"', "sh", text, path], check=True)

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path]).ok

    def driver_of(self, sysfs_device: str) -> str:
        """The driver bound to a sysfs device dir ("" if none)."""
        return self.run(["readlink", f"{sysfs_device}/driver"]).stdout.strip().rsplit("/", 1)[-1]

    # ---------------------------------------------------------------- PCI
    def pci_functions(self) -> list[PciFunction]:
        """Every PCI function, with names from pci.ids and the bound driver."""
        return parse_lspci(self.run(["lspci", "-D", "-nn", "-k"], check=True).stdout)

    def pci_ids(self) -> list[str]:
        """vendor:device of every PCI function, in bus order."""
        return [f.vendor_device for f in self.pci_functions()]

    def pci(self, vendor_device: str | None = None, name: str | None = None) -> PciFunction | None:
        """The first function with ``vendor:device``, or whose name contains ``name``."""
        return next((f for f in self.pci_functions() if (vendor_device is None or f.vendor_device == vendor_device)
                     and (name is None or name in f.name)), None)

    # ---------------------------------------------------------------- block
    def block_devices(self) -> list[str]:
        return self.run(["ls", "/sys/block"], check=True).stdout.split()

    def block(self, name: str) -> BlockDevice:
        """The disk called ``name`` (an emulated disk, which shows no serial in sysfs)."""
        if name not in self.block_devices():
            raise AssertionError(f"guest {self.name}: no block device {name}; it has: {self.block_devices()}")
        return BlockDevice(self, name)

    def serials(self) -> dict[str, str]:
        """Block device name -> serial, for every disk that has one."""
        out = self.run("for d in /sys/block/*; do [ -e $d/serial ] && echo ${d##*/} $(cat $d/serial); done; true",
                       check=True).stdout
        return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 2}

    def find_block_device(self, serial: str) -> BlockDevice | None:
        name = next((n for n, s in self.serials().items() if s == serial), None)
        return BlockDevice(self, name) if name else None

    def block_device(self, serial: str) -> BlockDevice:
        """The disk with ``serial`` (names depend on the guest's boot disk, serials do not)."""
        device = self.find_block_device(serial)
        if device is None:
            raise AssertionError(f"guest {self.name}: no block device with serial {serial!r}; it has: "
                                 f"{self.block_devices()}")
        return device

    # ---------------------------------------------------------------- network
    def macs(self) -> dict[str, str]:
        """Interface name -> MAC."""
        out = self.run("for n in /sys/class/net/*; do echo ${n##*/} $(cat $n/address); done", check=True).stdout
        return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 2}

    def find_nic(self, mac: str) -> GuestNic | None:
        name = next((n for n, m in self.macs().items() if m == mac.lower()), None)
        return GuestNic(self, name) if name else None

    def nic(self, mac: str) -> GuestNic:
        nic = self.find_nic(mac)
        if nic is None:
            raise AssertionError(f"guest {self.name}: no interface with MAC {mac}; it has: {self.macs()}")
        return nic

    def listening(self, port: int) -> bool:
        """Whether something in the guest listens on TCP ``port`` (the kernel's own tables: the
        guest has no ss, whose libraries were a tenth of its initramfs)."""
        text = self.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout  # tcp6 is absent without IPv6
        return port in listening_ports(text)

    def transfer(self, nbytes: int = MIB) -> dict:
        """Send ``nbytes`` of random data into the guest and get as much back, over its SSH (its
        first NIC); the checksums on both sides and the bytes moved, for the caller to compare."""
        payload = os.urandom(nbytes)
        sent = self.run("base64 -d | sha256sum", input=base64.b64encode(payload).decode(), timeout=60)
        out = "/tmp/kvmcheck.out"
        back = self.run(f"head -c {nbytes} /dev/urandom > {out} && sha256sum {out} && base64 {out} && rm {out}",
                        timeout=60, check=True)
        first, _, encoded = back.stdout.partition("\n")
        returned = base64.b64decode(encoded)
        return {"sent_sha256": hashlib.sha256(payload).hexdigest(), "guest_received_sha256": first_checksum(sent.stdout),
                "guest_sent_sha256": first_checksum(first), "received_sha256": hashlib.sha256(returned).hexdigest(),
                "received_bytes": len(returned)}

    # ---------------------------------------------------------------- files and processes
    def sha256(self, path: str) -> str:
        return first_checksum(self.run(["sha256sum", path], check=True).stdout)

    def size(self, path: str) -> int:
        """Bytes in ``path``, -1 if it is missing."""
        result = self.run(["stat", "-c", "%s", path])
        return int(result.stdout) if result.ok else -1

    def start(self, command: str) -> int:
        """Start a shell ``command`` in the background (its output discarded); returns its pid."""
        return int(self.run(f"({command}) >/dev/null 2>&1 </dev/null & echo $!", check=True).stdout)

    def running(self, pid: int) -> bool:
        return self.run(["kill", "-0", str(pid)]).ok

    def stop(self, pid: int) -> bool:
        """SIGTERM ``pid``; False if it was not running."""
        return self.run(["kill", str(pid)]).ok

    # ---------------------------------------------------------------- kernel
    def clocksource(self) -> tuple[str, list[str]]:
        """(current clocksource, the available ones)."""
        base = "/sys/devices/system/clocksource/clocksource0"
        out = self.run(["cat", f"{base}/current_clocksource", f"{base}/available_clocksource"], check=True).stdout
        current, _, available = out.partition("\n")
        return current.strip(), available.split()

    def wall_clock(self) -> float:
        """The guest's wall clock (seconds since the epoch, to the microsecond or better).
        busybox's date has no %N; its adjtimex shows the time to the microsecond."""
        out = self.run('d=$(date +%s.%N); case $d in *N) adjtimex;; *) echo "$d";; esac', check=True).stdout
        return parse_wall_clock(out)

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in KiB."""
        return parse_meminfo(self.read("/proc/meminfo"))

    def dmesg(self, pattern: str | None = None) -> list[str]:
        """The kernel log's lines (those matching the regular expression ``pattern``)."""
        lines = self.run("dmesg", check=True).stdout.splitlines()
        return [line for line in lines if pattern is None or re.search(pattern, line)]

    def cpu_flags(self) -> list[str]:
        """The first CPU's flags in /proc/cpuinfo."""
        m = re.search(r"^flags\s*:(.*)$", self.read("/proc/cpuinfo"), re.M)
        return m.group(1).split() if m else []

    def modules(self) -> set[str]:
        """The kernel modules loaded now."""
        return {line.split()[0] for line in self.read("/proc/modules").splitlines() if line.strip()}

    def cpus(self, which: str = "online") -> set[int]:
        """The CPUs the kernel lists as ``online``, ``present`` or ``possible``."""
        return parse_cpu_list(self.read(f"/sys/devices/system/cpu/{which}"))

    def online_cpu(self, cpu: int) -> None:
        self.run(f"echo 1 > /sys/devices/system/cpu/cpu{cpu}/online", check=True)

    def hold_memory(self, mib: int, data: bool = False) -> "HeldMemory":
        """Take ``mib`` MiB of the guest's RAM (a tmpfs of its own, filled), until released.

        A tmpfs, not /tmp: a disk-image guest's /tmp is on its disk, and a file there is page
        cache the guest can drop, not memory in use. ``data``: filled with bytes that are not
        zero (a migration sends such pages in full; zero pages cost it next to nothing)."""
        where = "/run/kvmcheck-held"
        # One cat of the same random MiB, named mib times: a cat per MiB cost a nested guest
        # 11.6 s for 768 MiB (a process each), one cat 5.7 s.
        fill = (f"cd {where} && head -c 1048576 /dev/urandom > one && cat {' '.join(['one'] * mib)} > fill && rm one"
                if data else f"dd if=/dev/zero of={where}/fill bs=1M count={mib} 2>/dev/null")
        self.run(f"mkdir -p {where} && mount -t tmpfs -o size={mib + 16}m kvmcheck-held {where} && {fill}",
                 check=True, timeout=120)
        return HeldMemory(self, where)

    def memory_blocks(self) -> dict[str, str]:
        """Memory block -> state (online, offline)."""
        out = self.run("for b in /sys/devices/system/memory/memory*; do echo ${b##*/} $(cat $b/state); done",
                       check=True).stdout
        return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 2}

    def online_memory(self, blocks: Iterable[str]) -> None:
        for block in blocks:
            self.run(f"echo online > /sys/devices/system/memory/{shlex.quote(block)}/state", check=True)

    def drivers_bound(self, bus: str, driver: str) -> list[str]:
        """Devices on ``bus`` (virtio, pci) bound to ``driver``."""
        result = self.run(["ls", f"/sys/bus/{bus}/drivers/{driver}"])
        return [d for d in result.stdout.split() if d not in ("bind", "unbind", "uevent", "new_id", "remove_id",
                                                                "module")] if result.ok else []
