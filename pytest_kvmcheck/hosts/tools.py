"""What suites ask of a host, in their words: its qemu-img, its network links, a QEMU process.

``host.qemu_img.create(path, 32)``, ``host.ip.add_address("tap0", "10.0.0.1/30")``,
``host.process(pid).listeners()``: the argv of each lives here, once, with its tests in
tests/unit/test_tools.py. Every call checks its exit status and names the host on failure.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Protocol, Sequence


class _Host(Protocol):  # what these need of a transport (hosts.transport.Host has it)
    name: str
    spec: object

    def run(self, argv: Sequence[str], timeout: float = ..., input: str | None = ..., root: bool = ...): ...

    def read_text(self, path: str, default: str | None = ...) -> str: ...

    def read_root_text(self, path: str, default: str | None = ...) -> str: ...

    def listdir(self, path: str) -> list[str]: ...


class QemuImg:
    """The host's qemu-img (its ``qemu_img=`` option): the image steps of the handbook."""

    def __init__(self, host: _Host):
        self.host = host

    def _run(self, *args: str, timeout: float = 120.0, check: bool = True):
        result = self.host.run([self.host.spec.qemu_img, *args], timeout=timeout)
        return result.check(f"qemu-img {args[0]} on {self.host.name}") if check else result

    def create(self, path: str, size_mib: int | None = None, fmt: str = "qcow2", backing: str | None = None,
               backing_fmt: str = "qcow2", options: str = "") -> str:
        """A new image at ``path`` (over ``backing`` if given: an overlay); returns ``path``."""
        args = ["create", "-q", "-f", fmt]
        if backing:
            args += ["-b", backing, "-F", backing_fmt]
        if options:
            args += ["-o", options]
        args.append(path)
        if size_mib is not None:
            args.append(f"{size_mib}M")
        self._run(*args, timeout=30)
        return path

    def resize(self, path: str, size_mib: int, fmt: str = "raw") -> None:
        self._run("resize", "-q", "-f", fmt, path, f"{size_mib}M", timeout=30)

    def convert(self, source: str, target: str, fmt: str = "qcow2", source_fmt: str | None = None,
                options: str = "") -> str:
        """``qemu-img convert``: ``source`` rewritten as a ``fmt`` image at ``target``; returns ``target``."""
        args = ["convert", "-q", *(["-f", source_fmt] if source_fmt else []), "-O", fmt,
                *(["-o", options] if options else []), source, target]
        self._run(*args)
        return target

    def compare(self, first: str, second: str, first_fmt: str | None = None, second_fmt: str | None = None):
        """``qemu-img compare``: the result (exit 0 identical, 1 different, 2+ error), unchecked."""
        args = ["compare", *(["-f", first_fmt] if first_fmt else []), *(["-F", second_fmt] if second_fmt else []),
                first, second]
        return self._run(*args, check=False)

    def info(self, path: str) -> dict:
        """``qemu-img info --output=json`` (``-U``: the image may be in use by a running QEMU)."""
        return json.loads(self._run("info", "-U", "--output=json", path, timeout=30).stdout)

    def map(self, path: str) -> list[dict]:
        """``qemu-img map --output=json``: the image's extents (``depth`` 0 is the top layer)."""
        return json.loads(self._run("map", "-U", "--output=json", path, timeout=30).stdout)

    def allocated_bytes(self, path: str) -> int:
        """Bytes of data the top layer itself holds (not its backing image)."""
        return sum(e["length"] for e in self.map(path) if e["depth"] == 0 and e["data"])


class Ip:
    """``ip`` on the host: addresses and links of the run's own taps and bridges."""

    def __init__(self, host: _Host):
        self.host = host

    def _run(self, *args: str) -> None:
        self.host.run(["ip", *args], timeout=10, root=True).check(f"ip {' '.join(args)} on {self.host.name}")

    def add_address(self, device: str, cidr: str) -> None:
        self._run("addr", "add", cidr, "dev", device)

    def link_up(self, device: str, master: str | None = None) -> None:
        """Set ``device`` up (into the bridge ``master`` first, if given)."""
        self._run("link", "set", device, *(["master", master] if master else []), "up")

    def ipv4_cidr(self, device: str) -> str:
        """The first IPv4 address/prefix of ``device``, "" if it has none."""
        # As root too: a user's PATH may lack /usr/sbin, where ip lives.
        out = self.host.run(["ip", "-4", "-o", "addr", "show", "dev", device], timeout=10, root=True).stdout
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out)
        return m.group(1) if m else ""


def parse_ss(text: str, pid: int, kind: str) -> list[str]:
    """The local addresses (TCP) or paths (unix) in ``ss -lnpH`` output that belong to ``pid``."""
    column = 3 if kind == "tcp" else 4
    return [line.split()[column] for line in text.splitlines()
            if f"pid={pid}," in line and len(line.split()) > column]


def parse_status(text: str) -> dict[str, str]:
    """/proc/PID/status as a dict of stripped values."""
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines()) if value}


@dataclass(frozen=True)
class Mapping:
    """One mapping of /proc/PID/smaps: its size and resident KiB, and its VmFlags."""

    size_kib: int
    rss_kib: int
    flags: tuple[str, ...]


def parse_smaps(smaps: str) -> list[Mapping]:
    """/proc/PID/smaps text as its mappings (each ends with its VmFlags line)."""
    out, size, rss = [], 0, 0
    for line in smaps.splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("VmFlags:"):
            out.append(Mapping(size, rss, tuple(line[8:].split())))
    return out


def mergeable_kib(smaps: str) -> int:
    """KiB of mappings marked MADV_MERGEABLE ('mg' in VmFlags)."""
    return sum(m.size_kib for m in parse_smaps(smaps) if "mg" in m.flags)


def hugetlb_kib(smaps: str) -> int:
    """KiB of mappings backed by huge pages ('ht' in VmFlags: hugetlbfs or a hugetlb memfd)."""
    return sum(m.size_kib for m in parse_smaps(smaps) if "ht" in m.flags)


def rss_outside_kib(smaps: str, guest_ram_kib: int) -> int:
    """KiB resident outside any mapping of exactly ``guest_ram_kib`` (the guest's RAM): what
    QEMU itself holds, whatever the guest touched."""
    return sum(m.rss_kib for m in parse_smaps(smaps) if m.size_kib != guest_ram_kib)


@dataclass(frozen=True)
class Footprint:
    """What a QEMU process holds: open file descriptors, threads, and memory outside guest RAM."""

    fds: int
    threads: int
    rss_mib: float

    def grown(self, since: "Footprint") -> dict[str, float]:
        return {"fds": self.fds - since.fds, "threads": self.threads - since.threads,
                "rss_mib": round(self.rss_mib - since.rss_mib, 1)}


def cpu_ticks(stats: str) -> int:
    """utime + stime summed over /proc/PID/stat lines (fields 14 and 15, counted after the
    command name, which may hold spaces and parentheses)."""
    total = 0
    for line in stats.splitlines():
        if ")" in line:
            fields = line.rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total


class QemuProcess:
    """A QEMU process on its host, as the host's kernel shows it (not as its argv claims)."""

    def __init__(self, host: _Host, pid: int):
        self.host, self.pid = host, int(pid)

    def status(self) -> dict[str, str]:
        return parse_status(self.host.read_text(f"/proc/{self.pid}/status"))

    def seccomp_mode(self) -> int:
        """0 none, 1 strict, 2 filter."""
        return int(self.status()["Seccomp"])

    def ids(self) -> tuple[list[int], list[int], list[int]]:
        """(uids, gids, supplementary groups): real, effective, saved, filesystem."""
        status = self.status()
        return ([int(x) for x in status["Uid"].split()], [int(x) for x in status["Gid"].split()],
                [int(x) for x in status.get("Groups", "").split()])

    def listeners(self, kind: str = "tcp") -> list[str]:
        """Addresses (``tcp``) or socket paths (``unix``) the process listens on, from ``ss``."""
        flags = {"tcp": "-ltnpH", "unix": "-lxpH"}[kind]
        # -p names the owning process only to root.
        out = self.host.run(["ss", flags], timeout=10, root=True).check(f"ss on {self.host.name}").stdout
        return parse_ss(out, self.pid, kind)

    def fds(self) -> int:
        """How many file descriptors it has open."""
        out = self.host.run(["ls", f"/proc/{self.pid}/fd"], timeout=10, root=True)
        return len(out.check(f"ls /proc/{self.pid}/fd on {self.host.name}").stdout.split())

    def footprint(self, guest_ram_mib: int) -> Footprint:
        """Its open fds, threads and RSS outside the guest's RAM (``guest_ram_mib``), now."""
        return Footprint(self.fds(), int(self.status()["Threads"]),
                         rss_outside_kib(self.file("smaps"), guest_ram_mib * 1024) / 1024)

    def mergeable_kib(self) -> int:
        """KiB of its memory that KSM may merge."""
        return mergeable_kib(self.file("smaps"))

    def hugetlb_kib(self) -> int:
        """KiB of its memory in huge pages (guest RAM from a hugetlb backend)."""
        return hugetlb_kib(self.file("smaps"))

    def backend_cpu_seconds(self) -> float:
        """CPU time QEMU has used outside its vCPU threads (user and system: its main loop and
        I/O threads, where its own device backends run) plus its vhost workers', which before
        Linux 6.4 are kernel threads of their own (``vhost-PID``) and after it QEMU's. The vCPU
        threads (``CPU n/KVM``: QEMU runs with debug-threads=on) run the guest's own code, the
        same whichever backend moves its packets: counted, they drowned the backends' difference
        (the lab's vhost-net against QEMU's backend: 0.85x with them, 0.56-0.60x without)."""
        # The shell's own read, not a cat per thread: on a nested host a process costs 20-30 ms,
        # and a cat per thread made each reading half a second (six of them per NIC compared).
        out = self.host.run(["sh", "-c", f"getconf CLK_TCK; for t in /proc/{self.pid}/task/*; do "
                                         'read -r c < $t/comm && case "$c" in "CPU "*) ;; *) read -r s < $t/stat '
                                         '&& printf "%s\\n" "$s" ;; esac; done; for p in /proc/[0-9]*; do '
                                         f'read -r c < $p/comm 2>/dev/null && [ "$c" = vhost-{self.pid} ] && '
                                         'read -r s < $p/stat && printf "%s\\n" "$s"; done; true'],
                            timeout=10).check("CPU time").stdout
        ticks_per_second, _, stats = out.partition("\n")
        return cpu_ticks(stats) / int(ticks_per_second)

    def has_task(self, name: str) -> bool:
        """Whether a task called ``name`` runs (a kernel worker such as ``vhost-PID``, or a thread)."""
        return self.host.run(["pgrep", "-x", name], timeout=10).ok

    def file(self, path: str) -> str:
        """A file of the process's /proc directory (as root: QEMU's smaps, fds and maps are root's)."""
        return self.host.read_root_text(posixpath.join(f"/proc/{self.pid}", path))


@dataclass(frozen=True)
class PathAccess:
    """Who may reach one path: its permission bits, owner, group and file type (``stat``)."""

    path: str
    mode: int
    owner: str
    group: str
    kind: str


def parse_stat(text: str) -> list[PathAccess]:
    """Lines of ``stat -c '%a %U %G %F|%n'``."""
    out = []
    for line in text.splitlines():
        head, _, path = line.partition("|")
        mode, owner, group, kind = head.split(" ", 3)
        out.append(PathAccess(path, int(mode, 8), owner, group, kind))
    return out


def path_access(host: _Host, path: str) -> list[PathAccess]:
    """``path`` and every directory above it, innermost first, as root sees them."""
    chain = [path]
    while chain[-1] not in ("/", ""):
        chain.append(posixpath.dirname(chain[-1]))
    out = host.run(["stat", "-c", "%a %U %G %F|%n", *chain], timeout=10, root=True)
    return parse_stat(out.check(f"stat on {host.name}").stdout)


def open_to_others(chain: list[PathAccess]) -> str:
    """Why users other than a socket's owner and group can connect to it ("" if they cannot):
    connecting to a unix socket takes write permission on it and search permission on every
    directory above it."""
    sock, *directories = chain
    if not sock.mode & 0o002:
        return ""
    closed = [d for d in directories if not d.mode & 0o001]
    if closed:
        return ""
    return (f"the socket is mode {sock.mode:o} ({sock.owner}:{sock.group}) and every directory above it "
            f"lets others through ({', '.join(f'{d.path} {d.mode:o}' for d in directories)})")


def sriov_pfs(host: _Host) -> dict[str, int]:
    """The host's SR-IOV physical functions (PCI address -> VFs now enabled)."""
    out = {}
    for bdf in host.listdir("/sys/bus/pci/devices"):
        total = host.read_text(f"/sys/bus/pci/devices/{bdf}/sriov_totalvfs", default="0").strip()
        if total.isdigit() and int(total) > 0:
            enabled = host.read_text(f"/sys/bus/pci/devices/{bdf}/sriov_numvfs", default="0").strip()
            out[bdf] = int(enabled) if enabled.isdigit() else 0
    return out
