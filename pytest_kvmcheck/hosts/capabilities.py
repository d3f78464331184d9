"""Capability probing and requirement matching.

Hosts advertise capabilities (probed once per run, shared with xdist workers as JSON);
tests declare needs with ``@pytest.mark.kvm_requires(...)``; :func:`unmet` matches them and
explains every miss, naming the host and the capability, so a skip always says why.

Need names (see :data:`NEEDS`): ``kvm``, ``vhost-net``, ``tap``, ``bridge``, ``iommu``, ``assignable``,
``sriov``, ``pci-unlisted``, ``ksm``, ``nested``, ``root``, ``allow_host_changes``, ``seccomp``, ``multifd``,
``postcopy``, ``power-cycle``, ``local-disk``, ``other-qemu``,
``disk-image-guest``, ``tiny-guest``, ``libvirt``, ``tls``, ``device:NAME``, ``object:TYPE``, ``machine:NAME``, ``memory:MIB``, ``qemu>=X.Y``;
and of a host pair, ``shared-storage`` (see :func:`pair_has`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from dataclasses import asdict, dataclass, field, replace

from ..errors import HostError, KvmCheckError, QemuNotFound, QMPCommandError
from .footprint import kill_vm_dir
from .spec import HostSpec
from .transport import Host
from ..qemu.noguest import START_TIMEOUT_S, NoGuestQemu, try_options
from ..qemu.spec import qemu_argv
from .tools import sriov_pfs
from ..waiting import poll

KVM_PROBE_TIMEOUT = 10.0
OPTIONAL_MIGRATION = ("multifd", "postcopy-ram")  # what a migration mode needs on both QEMUs
NEED_OF = {"multifd": "multifd", "postcopy-ram": "postcopy"}


@dataclass
class Capabilities:
    """What one host offers. ``reasons`` explains each capability it lacks."""

    host: str
    qemu_version: tuple[int, int, int] = (0, 0, 0)
    qemu_version_text: str = ""
    qemu_binary: str = ""  # the QEMU the run uses there: the spec's qemu=, or the one found
    qemu_img_binary: str = ""
    machines: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)  # -object types QEMU can create (tls-creds-x509, ...)
    accels: list[str] = field(default_factory=list)
    kvm_usable: bool = False
    accel: str = "tcg"  # what this run uses on the host
    vhost_net: bool = False
    tap: bool = False
    iommu_groups: int = 0
    sriov_pfs: list[str] = field(default_factory=list)
    busy_pfs: list[str] = field(default_factory=list)  # PFs with VFs enabled (in use by someone)
    pci_devices: list[str] = field(default_factory=list)
    assignable: list[str] = field(default_factory=list)  # from the host spec: devices tests may take
    ksm: bool = False
    nested: str = ""  # the kvm_amd/kvm_intel 'nested' parameter, "" if absent
    mem_available_mib: int = 0
    memory_budget_mib: int | None = None  # from the host spec: at most this much for the tests' guests
    kernel: str = ""
    boot_id: str = ""
    cpu_flags: list[str] = field(default_factory=list)  # the host CPU's, from /proc/cpuinfo
    bridge_cidr: str = ""  # the address/prefix of the host's bridge= (guests' bridged NICs join it)
    power_cycle: bool = False  # its spec says how to power-cycle it (power_cycle=)
    local_dir: str = ""  # its spec's local_dir=, once found on a disk of the host's own
    other_qemu: str = ""  # its spec's other_qemu=, once found executable there
    root: bool = False  # commands run as root there
    host_changes: bool = False  # its spec allows tests to change host-wide state (allow_host_changes)
    seccomp: bool = False  # QEMU takes -sandbox on
    tls: bool = False  # QEMU makes TLS credentials (built with GnuTLS)
    migration: list[str] = field(default_factory=list)  # optional migration capabilities QEMU enables there
    guest: str = "tiny"  # what this run boots there: "tiny" or "disk-image"
    fingerprint: dict = field(default_factory=dict)  # what identifies the host's build: see fingerprint()
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Capabilities":
        d = dict(d)
        d["qemu_version"] = tuple(d.get("qemu_version", (0, 0, 0)))
        return cls(**d)

    def has(self, need: str) -> tuple[bool, str]:
        """Whether the host meets ``need``, and if not, why (a phrase naming the capability)."""
        if need in _CHECKS:
            ok, why = _CHECKS[need](self)
            return ok, self.reasons.get(need, why)
        kind, _, arg = need.partition(":")
        if kind == "device":
            return arg in self.devices, f"QEMU {self.qemu_version_text} has no device {arg!r}"
        if kind == "object":
            return arg in self.objects, f"QEMU {self.qemu_version_text} cannot create -object {arg!r}"
        if kind == "machine":
            return arg in self.machines, f"QEMU {self.qemu_version_text} has no machine type {arg!r}"
        if kind == "memory":
            if self.memory_budget_mib is not None and int(arg) > self.memory_budget_mib:
                return False, f"needs {arg} MiB, more than its memory_budget_mib={self.memory_budget_mib}"
            return self.mem_available_mib >= int(arg), f"needs {arg} MiB free, has {self.mem_available_mib} MiB"
        if need.startswith("qemu>="):
            want = tuple(int(x) for x in need[6:].split("."))
            return self.qemu_version[:len(want)] >= want, f"QEMU {self.qemu_version_text} is older than {need[6:]}"
        raise ValueError(f"unknown capability {need!r} in kvm_requires (known: {', '.join(NEEDS)}, device:NAME, object:TYPE, "
                         "machine:NAME, memory:MIB, qemu>=X.Y; see pytest_kvmcheck.hosts.capabilities)")

    def plain_assignable(self) -> list[str]:
        """Devices listed as assignable that are not SR-IOV PFs (the SR-IOV suite's)."""
        return [d for d in self.assignable if d not in self.sriov_pfs]

    def idle_assignable_pfs(self) -> list[str]:
        """SR-IOV PFs listed as assignable with no VFs enabled."""
        return [d for d in self.sriov_pfs if d in self.assignable and d not in self.busy_pfs]

    def summary(self) -> str:
        kvm = "kvm" if self.accel == "kvm" else f"tcg ({self.reasons.get('kvm', 'by choice')})"
        binary = self.fingerprint.get("qemu_path") or self.qemu_binary
        return (f"QEMU {self.qemu_version_text} ({binary}), accel {kvm}, vhost-net {'yes' if self.vhost_net else 'no'}, "
                f"IOMMU groups {self.iommu_groups}, SR-IOV PFs {len(self.sriov_pfs)}, "
                f"KSM {'yes' if self.ksm else 'no'}, nested {self.nested or '-'}, "
                f"{self.mem_available_mib} MiB free, kernel {self.kernel}")


def _assignable(c: Capabilities) -> tuple[bool, str]:
    if not c.assignable:
        return False, "no assignable PCI device configured (assignable= in the host spec)"
    return bool(c.plain_assignable()), "every assignable device is an SR-IOV PF (the SR-IOV suite's)"


def _sriov(c: Capabilities) -> tuple[bool, str]:
    if not c.sriov_pfs:
        return False, "no SR-IOV physical function (no sriov_totalvfs > 0)"
    if not [d for d in c.sriov_pfs if d in c.assignable]:
        return False, f"no SR-IOV PF is listed as assignable (PFs: {', '.join(c.sriov_pfs)})"
    return bool(c.idle_assignable_pfs()), f"every assignable SR-IOV PF has VFs in use: {', '.join(c.busy_pfs)}"


# need -> (capabilities -> (met, why not)); a probe's own reason, in Capabilities.reasons, wins.
_CHECKS = {
    "kvm": lambda c: (c.accel == "kvm", "this run uses TCG on it"),
    "vhost-net": lambda c: (c.vhost_net, "/dev/vhost-net is missing"),
    "tap": lambda c: (c.tap, "cannot create tap devices"),
    "bridge": lambda c: (bool(c.bridge_cidr), "no bridge= given for the host"),
    "power-cycle": lambda c: (c.power_cycle, "no power_cycle= command given for the host (every VM there dies with it)"),
    "local-disk": lambda c: (bool(c.local_dir), "no local_dir= given for the host (a directory on its own disk)"),
    "other-qemu": lambda c: (bool(c.other_qemu), "no other_qemu= given for the host (a second QEMU build, "
                                                 "another release, for version skew)"),
    "assignable": _assignable,
    "iommu": lambda c: (c.iommu_groups > 0, "no IOMMU groups (/sys/kernel/iommu_groups is empty)"),
    "sriov": _sriov,
    "pci-unlisted": lambda c: (bool(set(c.pci_devices) - set(c.assignable)),
                               "every PCI device is listed as assignable"),
    "ksm": lambda c: (c.ksm, "no /sys/kernel/mm/ksm"),
    "nested": lambda c: (c.nested in ("1", "Y", "y"), f"nested virtualization is off (nested={c.nested or 'absent'})"),
    "allow_host_changes": lambda c: (c.host_changes, "the test changes host-wide state (KSM, sriov_numvfs, "
                                     "driver bindings), which this host's spec does not allow: allow_host_changes=1 "
                                     "allows it (off by default for SSH hosts)"),
    "root": lambda c: (c.root, "commands run there as another user; QEMU must start as root to drop privileges"),
    "seccomp": lambda c: (c.seccomp, f"QEMU {c.qemu_version_text} was built without -sandbox"),
    "tls": lambda c: (c.tls, f"QEMU {c.qemu_version_text} cannot make TLS credentials (built without GnuTLS)"),
    "multifd": lambda c: ("multifd" in c.migration, "QEMU there refused the multifd capability"),
    "postcopy": lambda c: ("postcopy-ram" in c.migration, "QEMU there refused the postcopy-ram capability"),
    "disk-image-guest": lambda c: (c.guest == "disk-image", "the tiny guest has no system disk (--kvm-guest=IMAGE)"),
    "tiny-guest": lambda c: (c.guest == "tiny", "the check needs kvmcheck's tiny guest (its own probes, such as "
                             "kvmcheck-io; a root in RAM that the guest cannot page out)"),
    "libvirt": lambda c: (False, "sVirt/AppArmor labels are applied by libvirt, and kvmcheck starts QEMU directly"),
}
NEEDS = tuple(_CHECKS)
PAIR_NEEDS = ("shared-storage",)


def unmet_needs(caps: Capabilities, needs: list[str]) -> list[tuple[str, str]]:
    """(need, why) for each need the host does not meet: empty when all are met."""
    return [(need, why) for need in needs for ok, why in [caps.has(need)] if not ok]


def unmet(caps: Capabilities, needs: list[str]) -> list[str]:
    """Reasons for each unmet need, each naming the host: empty when all are met."""
    return [f"host {caps.host}: needs {need}: {why}" for need, why in unmet_needs(caps, needs)]


def check_need_names(needs: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError if a need is not one kvm_requires knows."""
    probe = Capabilities(host="-")
    for need in needs:
        if need not in PAIR_NEEDS:
            probe.has(need)  # raises for an unknown name



# --------------------------------------------------------------------------- probing

def parse_qemu_version(text: str) -> tuple[int, int, int]:
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise HostError(f"cannot read a QEMU version from {text.strip()[:200]!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def parse_device_help(text: str) -> list[str]:
    return re.findall(r'^name "([^"]+)"', text, re.M)


def parse_object_help(text: str) -> list[str]:
    """``-object help``: the types after its heading line, one per line."""
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]


def parse_machine_help(text: str) -> list[str]:
    names = []
    for line in text.splitlines()[1:]:
        if line.strip():
            names.append(line.split()[0])
    return names


def parse_accel_help(text: str) -> list[str]:
    lines = text.splitlines()
    return [line.strip() for line in lines[1:] if line.strip()]


# Where distributions put QEMU, in the order a host's is looked for when its spec names none:
# Debian and Ubuntu (and upstream builds) on PATH; RHEL, CentOS Stream and Fedora in libexec.
QEMU_CANDIDATES = ("qemu-system-x86_64", "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm")
QEMU_IMG_CANDIDATES = ("qemu-img", "/usr/bin/qemu-img", "/usr/local/bin/qemu-img")
INSTALL_QEMU = ("Debian/Ubuntu: apt-get install qemu-system-x86 qemu-utils; "
                "RHEL/CentOS Stream/Fedora: dnf install qemu-kvm qemu-img")


def find_binaries(host: Host) -> HostSpec:
    """The host's spec with its QEMU and qemu-img named: as given (qemu=, qemu_img=), else the
    first of the candidates the host has. Raises :class:`QemuNotFound` with what to install."""
    found = {}
    for key, given, candidates, what in (("qemu", host.spec.qemu, QEMU_CANDIDATES, "QEMU"),
                                         ("qemu_img", host.spec.qemu_img, QEMU_IMG_CANDIDATES, "qemu-img")):
        if given:
            found[key] = given
            continue
        found[key] = first_present(host, candidates)
        if not found[key]:
            raise QemuNotFound(f"host {host.name}: no {what} found (looked for {', '.join(candidates)}). Install it "
                               f"({INSTALL_QEMU}) or set {key}= for the host")
    return replace(host.spec, **found)


def first_present(host: Host, candidates: tuple[str, ...]) -> str:
    """The first of ``candidates`` (a name on the host's PATH, or a path) that is an executable there, or ""."""
    # A path must be an executable file (sh's command -v takes any file); a name, on PATH.
    result = host.run(["sh", "-c", 'for c in "$@"; do case $c in */*) [ -f "$c" ] && [ -x "$c" ] && echo "$c" && exit 0;; '
                       '*) command -v "$c" >/dev/null && echo "$c" && exit 0;; esac; done; exit 1', "sh", *candidates],
                      timeout=15)
    return result.stdout.strip().splitlines()[0] if result.ok and result.stdout.strip() else ""


def _probe_qemu(host: Host, caps: Capabilities) -> None:
    qemu = host.spec.qemu
    result = host.run([qemu, "-version"], timeout=START_TIMEOUT_S)
    if result.exit_status == 127 or (not result.ok and "No such file" in result.stderr):
        raise QemuNotFound(f"host {host.name}: QEMU binary {qemu!r} not found. Install QEMU "
                           f"({INSTALL_QEMU}) or set qemu= for the host")
    result.check(f"{qemu} -version on {host.name}")
    caps.qemu_version = parse_qemu_version(result.stdout)
    caps.qemu_version_text = ".".join(map(str, caps.qemu_version))
    caps.devices = parse_device_help(host.run([qemu, "-device", "help"], timeout=START_TIMEOUT_S).stdout)
    caps.objects = parse_object_help(host.run([qemu, "-object", "help"], timeout=START_TIMEOUT_S).stdout)
    caps.machines = parse_machine_help(host.run([qemu, "-machine", "help"], timeout=START_TIMEOUT_S).stdout)
    caps.accels = parse_accel_help(host.run([qemu, "-accel", "help"], timeout=START_TIMEOUT_S).stdout)
    img = host.run([host.spec.qemu_img, "--version"], timeout=START_TIMEOUT_S)
    if not img.ok:
        raise QemuNotFound(f"host {host.name}: {host.spec.qemu_img!r} not found. Install it "
                           f"({INSTALL_QEMU}) or set qemu_img= for the host")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    block = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines()) if _}


def _package_version(host: Host, path: str) -> str:
    """The version of the package that owns ``path`` (Debian's dpkg, or rpm), "" if neither knows it."""
    owner = host.run(["dpkg-query", "-S", path], timeout=15)
    if owner.ok:
        package = owner.stdout.split(":", 1)[0].strip()
        version = host.run(["dpkg-query", "-W", "-f", "${Version}", package], timeout=15)
        return f"{package} {version.stdout.strip()}" if version.ok else package
    rpm = host.run(["rpm", "-qf", path], timeout=15)
    return rpm.stdout.strip() if rpm.ok else ""


def fingerprint(host: Host, caps: Capabilities) -> dict[str, str]:
    """What a release engineer compares between runs: CPU, microcode, kernel, QEMU (version,
    package, binary path and sha256, machine types), firmware, accelerator."""
    cpu = parse_cpuinfo(host.read_text("/proc/cpuinfo", default=""))
    qemu = host.run(["sh", "-c", 'command -v "$1"', "sh", host.spec.qemu], timeout=15).stdout.strip() or host.spec.qemu
    qemu = host.run(["readlink", "-f", qemu], timeout=15).stdout.strip() or qemu
    digest = host.run(["sha256sum", qemu], timeout=60)
    firmware = {name: _package_version(host, path) for name, path in
                (("seabios", "/usr/share/seabios/bios-256k.bin"), ("ovmf", "/usr/share/OVMF/OVMF_CODE.fd"))}
    return {
        "cpu_vendor": cpu.get("vendor_id", ""), "cpu_model": cpu.get("model name", ""),
        "cpu_family_model_stepping": "/".join(cpu.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "microcode": cpu.get("microcode", ""),
        "cpu_flags_sha256": hashlib.sha256(" ".join(caps.cpu_flags).encode()).hexdigest()[:16],
        "kernel": caps.kernel, "qemu_version": caps.qemu_version_text, "qemu_path": qemu,
        "qemu_sha256": digest.stdout.split()[0] if digest.ok and digest.stdout else "",
        "qemu_package": _package_version(host, qemu),
        "qemu_img_path": host.run(["sh", "-c", 'command -v "$1"', "sh", host.spec.qemu_img],
                                  timeout=15).stdout.strip() or host.spec.qemu_img,
        "machine_types_sha256": hashlib.sha256(" ".join(sorted(caps.machines)).encode()).hexdigest()[:16],
        "seabios": firmware["seabios"], "ovmf": firmware["ovmf"], "accel": caps.accel,
    }


def _probe_kernel(host: Host, caps: Capabilities) -> None:
    caps.kernel = host.run(["uname", "-r"], timeout=10).stdout.strip()
    m = re.search(r"^flags\s*:(.*)$", host.read_text("/proc/cpuinfo", default=""), re.M)
    caps.cpu_flags = sorted(set(m.group(1).split())) if m else []
    caps.boot_id = host.read_text("/proc/sys/kernel/random/boot_id", default="").strip()
    meminfo = host.read_text("/proc/meminfo", default="")
    m = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    caps.mem_available_mib = int(m.group(1)) // 1024 if m else 0
    caps.vhost_net = host.exists("/dev/vhost-net")
    if not caps.vhost_net:
        caps.reasons["vhost-net"] = "/dev/vhost-net is missing (vhost_net module not loaded or not available)"
    is_root = caps.root = host.run(["id", "-u"], timeout=10).stdout.strip() == "0" or sudo_works(host)
    caps.tap = host.exists("/dev/net/tun") and is_root
    if not caps.tap:
        caps.reasons["tap"] = "/dev/net/tun is missing" if is_root else "tap devices need root (CAP_NET_ADMIN)"
    _probe_bridge(host, caps)
    _probe_local_dir(host, caps)
    caps.power_cycle = bool(host.spec.power_cycle)
    _probe_other_qemu(host, caps)
    caps.iommu_groups = len(host.listdir("/sys/kernel/iommu_groups"))
    caps.pci_devices = sorted(host.listdir("/sys/bus/pci/devices"))
    pfs = sriov_pfs(host)
    caps.sriov_pfs = sorted(pfs)
    caps.busy_pfs = sorted(bdf for bdf, vfs in pfs.items() if vfs)
    caps.ksm = host.exists("/sys/kernel/mm/ksm/run")
    for module in ("kvm_amd", "kvm_intel"):
        value = host.read_text(f"/sys/module/{module}/parameters/nested", default="").strip()
        if value:
            caps.nested = value
            break


def sudo_works(host: Host) -> bool:
    """With sudo=1, whether sudo runs commands as root without asking; one clear error if not."""
    if not host.spec.sudo:
        return False
    result = host.run(["id", "-u"], timeout=15, root=True)
    if result.stdout.strip() != "0":
        said = (result.stderr or result.stdout).strip().splitlines()
        raise HostError(f"host {host.name}: sudo=1, but 'sudo -n id -u' failed ({said[-1] if said else 'exit ' + str(result.exit_status)}): "
                        "let this user run commands as root without a password (a NOPASSWD rule in sudoers), "
                        "or connect as root")
    return True


def _probe_bridge(host: Host, caps: Capabilities) -> None:
    """A bridge= the guests can join: it exists, has an IPv4 address, and taps can be made."""
    bridge = host.spec.bridge
    if not bridge:
        caps.reasons["bridge"] = "no bridge= given for the host (a Linux bridge on the guests' test network)"
    elif not host.exists(f"/sys/class/net/{bridge}/bridge"):
        caps.reasons["bridge"] = f"bridge={bridge}, but the host has no bridge of that name"
    elif not caps.tap:
        caps.reasons["bridge"] = f"bridge={bridge}, but {caps.reasons.get('tap', 'no tap devices')}"
    else:
        caps.bridge_cidr = host.ip.ipv4_cidr(bridge)
        if not caps.bridge_cidr:
            caps.reasons["bridge"] = f"bridge {bridge} has no IPv4 address"


VOLATILE_FILESYSTEMS = ("tmpfs", "ramfs", "nfs", "nfs4", "fuseblk", "9p", "overlayfs")


def _probe_other_qemu(host: Host, caps: Capabilities) -> None:
    """other_qemu=: a second QEMU the host offers; it must at least say its version."""
    path = host.spec.other_qemu
    if not path:
        return
    answer = host.run([path, "--version"], timeout=START_TIMEOUT_S)
    if answer.ok and "QEMU emulator version" in answer.stdout:
        caps.other_qemu = path
    else:
        said = (answer.stderr.strip() or answer.stdout.strip())[-200:]
        caps.reasons["other-qemu"] = f"other_qemu={path} does not run there (exit {answer.exit_status}: {said})"


def _probe_local_dir(host: Host, caps: Capabilities) -> None:
    """local_dir=: a directory on a disk of the host's own, which a power loss leaves in place."""
    path = host.spec.local_dir
    if not path:
        return
    result = host.run(["stat", "-f", "-c", "%T", path], timeout=15)
    kind = result.stdout.strip()
    if not result.ok:
        caps.reasons["local-disk"] = f"local_dir={path}, but the host has no such directory"
    elif kind in VOLATILE_FILESYSTEMS:
        caps.reasons["local-disk"] = f"local_dir={path} is on {kind}, not a disk of the host's own"
    else:
        caps.local_dir = path


def _probe_qemu_features(host: Host, caps: Capabilities, workdir: str) -> None:
    """What QEMU enables there without a guest: ``-sandbox on``, the optional migration capabilities."""
    caps.seccomp = try_options(host, ["-sandbox", "on"]).ok
    tls = try_options(host, ["-object", "tls-creds-anon,id=kvmcheck-tls,endpoint=client"])
    caps.tls = tls.ok
    if not tls.ok:
        said = tls.stderr.strip().splitlines()
        caps.reasons["tls"] = (f"QEMU {caps.qemu_version_text} cannot make TLS credentials: "
                               f"{said[-1] if said else f'exit {tls.exit_status}'}")
    # As a destination does (-incoming): only then does QEMU check the host for postcopy-ram (userfaultfd).
    try:
        with NoGuestQemu(host, workdir, ("-incoming", "defer")) as monitor:
            for capability in OPTIONAL_MIGRATION:
                try:
                    monitor.cmd("migrate-set-capabilities", capabilities=[{"capability": capability, "state": True}])
                    caps.migration.append(capability)
                    # Each alone: QEMU 10.0 refuses postcopy-ram beside multifd, not postcopy-ram.
                    monitor.cmd("migrate-set-capabilities", capabilities=[{"capability": capability, "state": False}])
                except QMPCommandError as exc:
                    caps.reasons[NEED_OF[capability]] = \
                        f"QEMU {caps.qemu_version_text} refused the {capability} capability: {exc.desc}"
    except KvmCheckError as exc:  # the host stays usable; only what needs these capabilities skips
        for capability in OPTIONAL_MIGRATION:
            caps.reasons[NEED_OF[capability]] = f"QEMU without a guest, waiting for a migration, did not start: {exc}"


def probe_kvm(host: Host, caps: Capabilities, kernel: str, workdir: str) -> tuple[bool, str]:
    """Is KVM usable? Only a guest that reaches its kernel under -accel kvm says so.

    /dev/kvm can exist while guests hang before their first instruction (as on this
    project's CI machines), so the device node alone proves nothing.
    """
    if "kvm" not in caps.accels:
        return False, f"QEMU {caps.qemu_version_text} was built without KVM"
    if not host.exists("/dev/kvm"):
        return False, "/dev/kvm is missing (no hardware virtualization, or kvm module not loaded)"
    host.makedirs(workdir)
    console, pidfile = posixpath.join(workdir, "console.log"), posixpath.join(workdir, "qemu.pid")
    # Not quiet: the kernel's first console line ("Linux version") is the proof.
    argv = qemu_argv(host.spec.qemu, name="kvmcheck-kvm-probe", machine="pc", accel="kvm", cpu="host", memory="256",
                     smp="", console_log=console, qmp=f"unix:{posixpath.join(workdir, 'qmp.sock')},server=on,wait=off",
                     pidfile=pidfile) + ["-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
    started = time.monotonic()
    # A slow host (boot_timeout= in its spec: nested, emulated) gets a deadline in proportion.
    deadline = max(KVM_PROBE_TIMEOUT, (host.spec.boot_timeout or 0) / 5)
    try:
        result = host.run(argv, timeout=30, root=True)
        if not result.ok:
            return False, f"QEMU refused -accel kvm: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'exit ' + str(result.exit_status)}"
        seen = poll(lambda: "Linux version" in host.read_text(console, default=""), deadline, 0.1)
        if seen:
            return True, f"a guest reached its kernel under KVM in {time.monotonic() - started:.1f} s"
        pid = host.read_root_text(pidfile, default="").strip()
        if pid.isdigit() and not host.pid_alive(int(pid)):
            return False, "QEMU died under -accel kvm before the guest kernel started"
        return False, (f"/dev/kvm exists but a guest under -accel kvm printed nothing within "
                       f"{deadline:.0f} s (it hangs before reaching guest code)")
    finally:
        kill_vm_dir(host, workdir, grace=1.0)
        host.remove_tree(workdir)


def probe(host: Host, requested_accel: str, kernel: str, workdir: str, cache: dict | None = None) -> Capabilities:
    """Probe one host. ``cache`` (a dict persisted by the caller) keeps the slow KVM
    verdict per host boot and QEMU version, so it is paid once per host boot."""
    caps = Capabilities(host=host.name, assignable=list(host.spec.assignable),
                        memory_budget_mib=host.spec.memory_budget_mib, host_changes=host.spec.host_changes_allowed)
    host.spec = find_binaries(host)  # from here on, every command names the binaries found
    caps.qemu_binary, caps.qemu_img_binary = host.spec.qemu, host.spec.qemu_img
    _probe_qemu(host, caps)
    _probe_kernel(host, caps)
    key = hashlib.sha256(f"features3|{host.spec.url}|{caps.boot_id}|{caps.qemu_version_text}|{host.spec.qemu}"
                         .encode()).hexdigest()[:16]
    if cache is not None and key in cache:
        caps.seccomp, caps.tls, caps.migration, reasons = cache[key]
        caps.reasons.update(reasons)
    else:
        _probe_qemu_features(host, caps, workdir)
        if cache is not None:
            cache[key] = [caps.seccomp, caps.tls, caps.migration,
                          {k: v for k, v in caps.reasons.items() if k in ("multifd", "postcopy", "auto-converge", "tls")}]
    accel = host.spec.accel or requested_accel
    if accel == "tcg":
        caps.kvm_usable, why = False, "not probed: TCG requested"
    else:
        key = hashlib.sha256(f"{host.spec.url}|{caps.boot_id}|{caps.qemu_version_text}|{host.spec.qemu}".encode()).hexdigest()[:16]
        if cache is not None and key in cache:
            caps.kvm_usable, why = cache[key]
        else:
            caps.kvm_usable, why = probe_kvm(host, caps, kernel, workdir)
            if cache is not None:
                cache[key] = [caps.kvm_usable, why]
    if accel == "kvm" and not caps.kvm_usable:
        raise HostError(f"host {host.name}: --kvm-accel=kvm, but KVM is not usable there: {why}. "
                        f"Use --kvm-accel=auto to fall back to TCG")
    caps.accel = "kvm" if caps.kvm_usable else "tcg"
    if not caps.kvm_usable:
        caps.reasons["kvm"] = f"KVM not usable: {why}"
    else:
        caps.reasons["kvm-probe"] = why
    caps.fingerprint = fingerprint(host, caps)
    return caps


def load_probe_cache(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
