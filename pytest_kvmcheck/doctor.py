"""``kvmcheck doctor``: what each host has of what the suites need, before a run finds out test by test.

One row per prerequisite and host: ``ok``; ``warn`` (the tests that need it will skip, and
the row says what to do); ``FAIL`` (the host cannot run the suites at all: unreachable, no
QEMU, no room). The checks are the run's own: the same connection, the same binary
discovery, the same preparation and capability probe a pytest run does, and nothing of the
doctor's visit is left on the hosts.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from .errors import KvmCheckError
from .hosts.capabilities import Capabilities, find_binaries, first_present, sudo_works, unmet_needs
from .hosts.connect import connect
from .hosts.spec import HostSpec
from .hosts.transport import Host
from .run import KvmRun

MIN_FREE_MIB, LOW_FREE_MIB = 512, 2048  # below: the suites cannot run; below: the larger guests may not fit

# What to do about a capability the host lacks (the tests that need it skip until then).
ADVICE = {
    "kvm": "a host with VT-x/AMD-V enabled and the kvm module loaded; until then guests run under TCG",
    "vhost-net": "modprobe vhost_net",
    "tap": "run as root (or a user with CAP_NET_ADMIN) where /dev/net/tun exists",
    "bridge": "set bridge=BR: a Linux bridge with an IPv4 address, on the same segment on every host",
    "iommu": "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on)",
    "assignable": "list the PCI devices tests may take in assignable=",
    "sriov": "list an SR-IOV physical function with no VFs in use in assignable=",
    "ksm": "a kernel built with CONFIG_KSM",
    "nested": "load kvm_intel or kvm_amd with nested=1",
    "root": "connect as root, or as a user with a NOPASSWD sudo rule and sudo=1",
    "seccomp": "a QEMU built with seccomp support",
    "tls": "a QEMU built with GnuTLS (TLS migration, VNC over TLS)",
    "multifd": "a QEMU with multifd migration (4.0 or later)",
    "postcopy": "a kernel with userfaultfd, and a QEMU allowed to use it",
    "power-cycle": "set power_cycle= to a command that cuts the host's power and turns it back on (a BMC's)",
    "local-disk": "set local_dir= to a directory on the host's own disk",
    "other-qemu": "set other_qemu= to a second QEMU build on the host, another release (version skew)",
}
CAPABILITIES = ("kvm", "vhost-net", "tap", "iommu", "sriov", "ksm", "nested", "seccomp", "tls", "multifd",
                "postcopy", "bridge")


@dataclass(frozen=True)
class Row:
    host: str
    check: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str


class Doctor:
    """Examine hosts as a run would, collecting :class:`Row` s."""

    def __init__(self, specs: list[HostSpec], accel: str = "auto", progress=None):
        self.specs, self.accel, self.progress = specs, accel, progress
        self.rows: list[Row] = []

    def add(self, host: str, check: str, status: str, detail: str) -> None:
        self.rows.append(Row(host, check, status, detail))

    def examine(self) -> list[Row]:
        usable: list[str] = []
        run = KvmRun.create(self.specs, accel=self.accel, progress=self.progress)
        try:
            basics = {spec.name: self._basics(spec) for spec in self.specs}
            run.prepare_all(name for name, ok in basics.items() if ok)  # in parallel: a fleet in the time of one host
            for spec in self.specs:
                if basics[spec.name] and self._prepared(run, spec.name):
                    usable.append(spec.name)
            names = [spec.name for spec in self.specs]
            for name in usable if len(names) > 1 else ():
                peer = names[(names.index(name) + 1) % len(names)]  # where its guests migrate to, as in a run
                if peer in usable:
                    self._shared_storage(run, name)
                else:
                    self.add(name, f"shared storage with {peer}", "warn", f"not checked: {peer} cannot be used")
        finally:
            run.finish()
        order = {spec.name: i for i, spec in enumerate(self.specs)}
        self.rows.sort(key=lambda row: order.get(row.host, len(order)))  # stable: each host's rows in check order
        return self.rows

    def _basics(self, spec: HostSpec) -> bool:
        """Connection, privileges, binaries, relay, room: False if the host cannot run the suites."""
        name = spec.name
        host = connect(spec)  # it connects on its first command
        try:
            uid = host.run(["id", "-u"], timeout=15).stdout.strip()
        except KvmCheckError as exc:
            self.add(name, "connection", "FAIL", str(exc))
            host.close()
            return False
        try:
            self.add(name, "connection", "ok", "this machine" if spec.transport == "local"
                     else f"{spec.url}, host key known")
            if uid == "0":
                self.add(name, "privileges", "ok", "root")
            elif spec.sudo:
                try:
                    sudo_works(host)  # the probe's own check: it raises naming the fix
                except KvmCheckError as exc:
                    self.add(name, "privileges", "FAIL", f"uid {uid}: {exc}")
                    return False
                self.add(name, "privileges", "ok", f"uid {uid}, root through sudo -n")
            else:
                self.add(name, "privileges", "warn", f"uid {uid}, not root: tests that need root skip; "
                         f"{ADVICE['root']}")
            try:
                host.spec = find_binaries(host)
            except KvmCheckError as exc:
                self.add(name, "QEMU", "FAIL", str(exc))
                return False
            for check, binary in (("QEMU", host.spec.qemu), ("qemu-img", host.spec.qemu_img)):
                version = host.run([binary, "--version"], timeout=30)
                if not version.ok:
                    self.add(name, check, "FAIL", f"{binary} --version failed: {version.stderr.strip()[-300:]}")
                    return False
                path = host.run(["sh", "-c", 'command -v "$1"', "sh", binary], timeout=15).stdout.strip() or binary
                self.add(name, check, "ok", f"{version.stdout.splitlines()[0].strip()} ({path})")
            if spec.transport == "ssh":
                relay = first_present(host, ("socat", "python3"))
                if relay:
                    self.add(name, "QMP relay", "ok", f"{relay} relays QMP's unix sockets over SSH")
                else:
                    self.add(name, "QMP relay", "FAIL", "neither socat nor python3: install socat")
                    return False
            return self._room(host)
        finally:
            host.close()

    def _room(self, host: Host) -> bool:
        workdir = host.spec.workdir or host.default_workdir()
        # The nearest existing directory: the work dir may not exist before the first run.
        probe = host.run(["sh", "-c", 'd=$1; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"',
                          "sh", workdir], timeout=15)
        m = re.search(r"\s(\d+)\s+\d+%\s+\S+\s*$", probe.stdout)
        if not m:
            self.add(host.name, "work dir space", "warn", f"could not read free space for {workdir}: "
                     f"{(probe.stdout + probe.stderr).strip()[-200:]}")
            return True
        free = int(m.group(1)) // 1024
        where = f"{free} MiB free for {workdir}"
        if free < MIN_FREE_MIB:
            self.add(host.name, "work dir space", "FAIL", f"{where}: the suites need at least {MIN_FREE_MIB} MiB "
                     "(set workdir= to a roomier place)")
            return False
        self.add(host.name, "work dir space", "ok" if free >= LOW_FREE_MIB else "warn",
                 where if free >= LOW_FREE_MIB else f"{where}: the migration and v2v guests may not fit")
        return True

    def _prepared(self, run: KvmRun, name: str) -> bool:
        try:
            prepared = run.host(name)
        except KvmCheckError as exc:
            self.add(name, "preparation", "FAIL", str(exc))
            return False
        caps = prepared.caps
        self.add(name, "preparation", "ok", "guest image placed, capabilities probed")
        for need in CAPABILITIES:
            missing = unmet_needs(caps, [need])
            if not missing:
                self.add(name, need, "ok", _have(caps, need))
            else:
                self.add(name, need, "warn", f"{missing[0][1]}; {ADVICE[need]}")
        pages = re.search(r"HugePages_Total:\s+(\d+)", prepared.transport.read_text("/proc/meminfo", default=""))
        count = int(pages.group(1)) if pages else 0
        self.add(name, "hugepages", "ok", f"{count} in the pool (no suite needs them yet)")
        return True

    def _shared_storage(self, run: KvmRun, name: str) -> None:
        peer = run.peer(name)
        missing = [u for u in run.unmet(name, [], ["shared-storage"]) if u.need == "shared-storage"]
        if missing:
            self.add(name, f"shared storage with {peer.name}", "warn",
                     f"{missing[0].why}: migration tests skip; mount the same storage at the same work dir")
        else:
            self.add(name, f"shared storage with {peer.name}", "ok",
                     f"{peer.name} sees this host's run files at {posixpath.dirname(run.host(name).host_run.run_dir)}")


def _have(caps: Capabilities, need: str) -> str:
    return {
        "kvm": "guests run under KVM",
        "iommu": f"{caps.iommu_groups} IOMMU groups",
        "sriov": f"SR-IOV PFs: {', '.join(caps.sriov_pfs)}",
        "nested": f"nested={caps.nested}",
        "bridge": f"bridge {caps.bridge_cidr}",
        "multifd": f"QEMU {caps.qemu_version_text} enables it",
        "postcopy": f"QEMU {caps.qemu_version_text} enables it",
    }.get(need, "yes")


def render(rows: list[Row]) -> str:
    """The table, then one verdict line per host."""
    width = {k: max([len(k)] + [len(getattr(r, k)) for r in rows]) for k in ("host", "check", "status")}
    lines = [f"{'HOST':<{width['host']}}  {'CHECK':<{width['check']}}  {'STATUS':<{width['status']}}  WHAT IT FOUND"]
    lines += [f"{r.host:<{width['host']}}  {r.check:<{width['check']}}  {r.status:<{width['status']}}  {r.detail}"
              for r in rows]
    lines.append("")
    for host in dict.fromkeys(r.host for r in rows):
        mine = [r for r in rows if r.host == host]
        failed = [r.check for r in mine if r.status == "FAIL"]
        warned = [r.check for r in mine if r.status == "warn"]
        if failed:
            lines.append(f"host {host}: cannot run the suites ({', '.join(failed)})")
        else:
            lines.append(f"host {host}: ready" + (f", with warnings: {', '.join(warned)}" if warned else ""))
    return "\n".join(lines)


def unusable(rows: list[Row]) -> list[str]:
    """The hosts that cannot run the suites at all."""
    return list(dict.fromkeys(r.host for r in rows if r.status == "FAIL"))
