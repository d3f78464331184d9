"""VM specs and their rendering to a QEMU argv: the one place a command line is made.

A :class:`VMSpec` is declarative and host-independent; :func:`render_argv` turns it into
an argv for one host's QEMU. Migration needs the destination's command line to match
the source's device for device, which is why both are always rendered from one spec.

The handbook's 2016 command lines map to today's QEMU through :data:`LEGACY_FORMS`.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Literal

NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
DISK_INTERFACES = ("virtio-blk-pci", "ide-hd", "scsi-hd")


@dataclass(frozen=True)
class Nic:
    """A NIC on a user-mode network. The first NIC of a spec carries the guest's SSH."""

    model: str = "virtio-net-pci"
    vhost: bool = False
    mac: str | None = None
    bridged: bool = False  # a tap joined to the host's bridge=, instead of user-mode networking

    def __post_init__(self):
        if self.model not in NIC_MODELS:
            raise ValueError(f"NIC model {self.model!r} is not one of {', '.join(NIC_MODELS)}")
        if self.vhost and self.model != "virtio-net-pci":
            raise ValueError("vhost=on needs a virtio-net NIC")


@dataclass(frozen=True)
class Disk:
    """A data disk; created on the host as a qcow2 (or raw) image of ``size_mib``."""

    size_mib: int = 64
    interface: str = "virtio-blk-pci"
    format: Literal["qcow2", "raw"] = "qcow2"
    serial: str | None = None
    path: str | None = None  # an existing image on the host; else one is created

    def __post_init__(self):
        if self.interface not in DISK_INTERFACES:
            raise ValueError(f"disk interface {self.interface!r} is not one of {', '.join(DISK_INTERFACES)}")


@dataclass(frozen=True)
class VMSpec:
    """What a guest looks like. Host-independent; rendered per host by :func:`render_argv`."""

    memory_mib: int = 512
    smp: int = 1
    max_cpus: int | None = None  # > smp: room for vCPU hot-plug
    max_memory_mib: int | None = None  # > memory_mib: room for DIMM hot-plug ...
    memory_slots: int = 0  # ... in this many slots
    machine: str = "pc"
    cpu: str | None = None  # None: the accelerator's sensible default (host for kvm, max for tcg)
    nics: tuple[Nic, ...] = (Nic(),)
    disks: tuple[Disk, ...] = ()
    balloon: bool = False
    host_devices: tuple[str, ...] = ()  # PCI addresses on the host, assigned with vfio-pci (bind them first)
    extra_args: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()

    def with_(self, **changes) -> "VMSpec":
        from dataclasses import replace
        return replace(self, **changes)


@dataclass(frozen=True)
class RenderContext:
    """The host- and run-specific facts rendering needs."""

    accel: str  # "kvm" or "tcg"
    kernel: str  # direct kernel boot (the tiny guest); unused when boot_disk is set
    initrd: str
    workdir: str
    qmp_socket: str
    console_log: str
    pidfile: str
    ssh_public_key: str
    disk_paths: tuple[str, ...] = ()
    qemu_version: tuple[int, int, int] = (7, 2, 0)
    mac_seed: int = 0
    boot_disk: str = ""  # a disk-image guest boots from this (an overlay of the image) ...
    seed_iso: str = ""  # ... with its cloud-init NoCloud seed as a CD-ROM
    qemu_log: str = ""  # -D: once daemonized, QEMU's stderr (error_report) goes here, not to /dev/null


MANAGEMENT_MAC_PREFIX = "52:54:00:6b:"


def management_mac(spec: VMSpec, seed: int) -> str:
    if spec.nics and spec.nics[0].mac:
        return spec.nics[0].mac
    return f"{MANAGEMENT_MAC_PREFIX}{(seed >> 8) & 0xff:02x}:{seed & 0xff:02x}"


def nic_mac(spec: VMSpec, index: int, seed: int) -> str:
    nic = spec.nics[index]
    if nic.mac:
        return nic.mac
    if index == 0:
        return management_mac(spec, seed)
    return f"52:54:00:{index:02x}:{(seed >> 8) & 0xff:02x}:{seed & 0xff:02x}"


def tap_name(seed: int, index: int) -> str:
    """A tap interface name unique per VM (seed) and NIC, within the 15-character limit."""
    return f"kc{seed & 0xffffff:06x}n{index}"


def kernel_cmdline(spec: VMSpec, ctx: RenderContext) -> str:
    key = base64.b64encode(ctx.ssh_public_key.strip().encode()).decode()
    # quiet: each console byte is a VM exit (dear under nested KVM); dmesg still has everything.
    # pci=noearly: no early PCI scan, which on AMD CPUs walks all 65536 functions twice looking
    # for an AGP aperture (about 8 s of port I/O exits per boot under nested KVM).
    args = ["console=ttyS0", "quiet", "pci=noearly", "panic=-1", f"kvmcheck.key={key}",
            f"kvmcheck.mac={management_mac(spec, ctx.mac_seed)}", *spec.kernel_args]
    return " ".join(args)


def render_argv(qemu: str, spec: VMSpec, ctx: RenderContext) -> list[str]:
    """The full argv for ``spec`` on one host. Device order is fixed by the spec."""
    cpu = spec.cpu or ("host" if ctx.accel == "kvm" else "max")
    argv = [
        qemu, "-name", "kvmcheck,debug-threads=on",
        "-machine", f"{spec.machine},accel={ctx.accel}",
        "-cpu", cpu,
        "-m", str(spec.memory_mib) + (f",slots={spec.memory_slots},maxmem={spec.max_memory_mib}M"
                                      if spec.max_memory_mib else ""),
        "-smp", str(spec.smp) + (f",maxcpus={spec.max_cpus}" if spec.max_cpus else ""),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{ctx.console_log}",
        "-qmp", f"unix:{ctx.qmp_socket},server=on,wait=off",
        "-pidfile", ctx.pidfile, "-daemonize",
    ]
    if ctx.qemu_log:
        argv += ["-D", ctx.qemu_log]
    if ctx.boot_disk:
        argv += ["-blockdev", f"driver=file,filename={ctx.boot_disk},node-name=bootfile",
                 "-blockdev", "driver=qcow2,file=bootfile,node-name=boot",
                 "-device", "virtio-blk-pci,drive=boot,id=bootdisk,bootindex=0"]
        if ctx.seed_iso:
            argv += ["-blockdev", f"driver=file,filename={ctx.seed_iso},node-name=seedfile,read-only=on",
                     "-blockdev", "driver=raw,file=seedfile,node-name=seed,read-only=on",
                     "-device", "ide-cd,drive=seed,id=seed"]
    else:
        argv += ["-kernel", ctx.kernel, "-initrd", ctx.initrd, "-append", kernel_cmdline(spec, ctx)]
    for i, nic in enumerate(spec.nics):
        # restrict=on: the guest reaches nothing outside; host forwards (its SSH) still work.
        netdev = f"user,id=net{i},restrict=on"
        if nic.vhost or nic.bridged:
            if i == 0:
                raise ValueError("the first NIC carries the guest's SSH (user-mode); put taps on a second NIC")
            # A non-persistent tap: it disappears with the QEMU process, nothing to leak.
            netdev = f"tap,id=net{i},ifname={tap_name(ctx.mac_seed, i)},script=no,downscript=no"
            netdev += ",vhost=on" if nic.vhost else ""
        elif i == 0:
            # Guest SSH: port 0 lets the host pick a free port (read back via 'info usernet'),
            # so parallel workers never collide; loopback only.
            netdev += ",hostfwd=tcp:127.0.0.1:0-:22"
        else:
            netdev += f",net=10.0.{i + 2}.0/24"
        argv += ["-netdev", netdev]
        device = f"{nic.model},netdev=net{i},mac={nic_mac(spec, i, ctx.mac_seed)},id=nic{i}"
        argv += ["-device", device]
    if any(d.interface == "scsi-hd" for d in spec.disks):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i, disk in enumerate(spec.disks):
        path = ctx.disk_paths[i]
        argv += ["-blockdev", f"driver=file,filename={path},node-name=file{i}",
                 "-blockdev", f"driver={disk.format},file=file{i},node-name=disk{i}"]
        serial = f",serial={disk.serial}" if disk.serial else ""
        argv += ["-device", f"{disk.interface},drive=disk{i},id=disk{i}{serial}"]
    if spec.balloon:
        argv += ["-device", "virtio-balloon-pci,id=balloon0"]
    for i, bdf in enumerate(spec.host_devices):
        argv += ["-device", f"vfio-pci,host={bdf},id=hostdev{i}"]
    argv += list(spec.extra_args)
    return argv


# --------------------------------------------------------------------------- legacy forms

@dataclass(frozen=True)
class LegacyForm:
    """One command of the 2016 handbook and what it means on today's QEMU and kernels."""

    legacy: str
    modern: str
    status: str  # "removed", "deprecated", "accepted"
    since: str  # the QEMU (or kernel) version where the status began
    note: str
    pattern: re.Pattern | None = None

    def removed_in(self, qemu_version: tuple[int, int, int]) -> bool:
        if self.status != "removed" or not self.since.startswith("QEMU "):
            return False
        major, minor = (int(x) for x in self.since.split()[1].split(".")[:2])
        return qemu_version[:2] >= (major, minor)


LEGACY_FORMS: tuple[LegacyForm, ...] = (
    LegacyForm("-balloon virtio", "-device virtio-balloon-pci", "removed", "QEMU 3.1",
               "the balloon is an ordinary PCI device now", re.compile(r"^-balloon$")),
    LegacyForm("-net nic,model=virtio", "-netdev user,id=n0 -device virtio-net-pci,netdev=n0",
               "accepted", "QEMU 2.12",
               "-net still works (hub-based), -netdev/-device is the supported form; 'vlan=' was removed in 3.0",
               re.compile(r"^-net$")),
    LegacyForm("-net tap,vhost=on", "-netdev tap,id=n0,vhost=on -device virtio-net-pci,netdev=n0",
               "accepted", "QEMU 2.12", "vhost needs /dev/vhost-net on the host", None),
    LegacyForm("-drive file=IMG,if=virtio",
               "-blockdev driver=file,filename=IMG,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 "
               "-device virtio-blk-pci,drive=d0",
               "accepted", "QEMU 2.9", "-drive still works; -blockdev is the modern, explicit form", None),
    LegacyForm("-device pci-assign,host=BDF", "-device vfio-pci,host=BDF", "removed", "QEMU 2.12",
               "legacy KVM device assignment is gone from QEMU and Linux (KVM_ASSIGN_PCI_DEVICE removed in 4.12); "
               "VFIO replaces it", re.compile(r"pci-assign")),
    LegacyForm("echo VENDOR DEVICE > /sys/bus/pci/drivers/pci-stub/new_id",
               "echo vfio-pci > /sys/bus/pci/devices/BDF/driver_override; echo BDF > /sys/bus/pci/drivers_probe",
               "accepted", "Linux 3.16", "pci-stub still exists but cannot hand a device to QEMU; vfio-pci binds "
               "per device with driver_override", None),
    LegacyForm("migrate -b tcp:HOST:PORT", "blockdev-mirror to an NBD export on the destination, then migrate",
               "removed", "QEMU 9.1", "block migration (-b/-i) was deprecated in 8.2", None),
    LegacyForm("-incoming tcp:0:6666", "-incoming tcp:ADDRESS:6666", "accepted", "QEMU 0.12",
               "tcp:0 listens on every address; bind the migration listener to one address", None),
    LegacyForm("qemu-kvm ... (or -enable-kvm)", "qemu-system-x86_64 -accel kvm", "accepted", "QEMU 1.3",
               "qemu-kvm was merged into QEMU; -enable-kvm is an alias of -accel kvm", None),
)


def translate_legacy(argv: list[str]) -> tuple[list[str], list[LegacyForm]]:
    """Rewrite the handbook's legacy options in ``argv`` to modern ones.

    Returns the new argv and the table rows that applied. Options that are still
    accepted verbatim are rewritten too, so the suites always exercise the modern form.
    """
    out: list[str] = []
    used: list[LegacyForm] = []
    counter = 0
    i = 0
    while i < len(argv):
        opt = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else ""
        if opt == "-balloon" and val.startswith("virtio"):
            out += ["-device", "virtio-balloon-pci"]
            used.append(LEGACY_FORMS[0])
            i += 2
            continue
        if opt == "-balloon" and val == "none":
            used.append(LEGACY_FORMS[0])
            i += 2
            continue
        if opt == "-net" and val.startswith("nic"):
            params = dict(p.split("=", 1) for p in val.split(",")[1:] if "=" in p)
            model = {"virtio": "virtio-net-pci"}.get(params.get("model", "e1000"), params.get("model", "e1000"))
            netdev = f"legacynet{counter}"
            counter += 1
            out += ["-netdev", f"user,id={netdev}", "-device", f"{model},netdev={netdev}"]
            used.append(LEGACY_FORMS[1])
            i += 2
            continue
        if opt == "-net" and val.startswith("tap"):
            params = val.split(",", 1)[1] if "," in val else ""
            netdev = f"legacynet{counter}"
            counter += 1
            out += ["-netdev", f"tap,id={netdev}" + (f",{params}" if params else ""),
                    "-device", f"virtio-net-pci,netdev={netdev}"]
            used.append(LEGACY_FORMS[2])
            i += 2
            continue
        if opt == "-drive" and "if=virtio" in val:
            params = dict(p.split("=", 1) for p in val.split(",") if "=" in p)
            node = f"legacydisk{counter}"
            counter += 1
            fmt = params.get("format", "qcow2")
            out += ["-blockdev", f"driver=file,filename={params['file']},node-name={node}f",
                    "-blockdev", f"driver={fmt},file={node}f,node-name={node}",
                    "-device", f"virtio-blk-pci,drive={node}"]
            used.append(LEGACY_FORMS[3])
            i += 2
            continue
        if opt == "-device" and val.startswith("pci-assign"):
            out += ["-device", "vfio-pci" + val[len("pci-assign"):]]
            used.append(LEGACY_FORMS[4])
            i += 2
            continue
        if opt == "-enable-kvm":
            out += ["-accel", "kvm"]
            used.append(LEGACY_FORMS[8])
            i += 1
            continue
        if opt == "-incoming" and val.startswith("tcp:0:"):
            out += ["-incoming", "tcp:127.0.0.1:" + val.split(":", 2)[2]]
            used.append(LEGACY_FORMS[7])
            i += 2
            continue
        out.append(opt)
        i += 1
    return out, used
