"""VM specs and their rendering to a QEMU argv: the one place a command line is made.

A :class:`VMSpec` is declarative and host-independent; :func:`render_argv` turns it into
an argv for one host's QEMU. Migration needs the destination's command line to match
the source's device for device, which is why both are always rendered from one spec.

The handbook's 2016 command lines map to today's QEMU in :mod:`.legacy`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from typing import Literal

NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
DISK_INTERFACES = ("virtio-blk-pci", "ide-hd", "scsi-hd")
# -drive cache= modes, as -blockdev and -device spell them: (the nodes' cache options, the
# device's write-cache). writeback is QEMU's default with -blockdev: nothing to add.
CACHE_MODES = {
    "writeback": ("", ""),
    "none": (",cache.direct=on", ""),
    "writethrough": ("", ",write-cache=off"),
    "directsync": (",cache.direct=on", ",write-cache=off"),
    "unsafe": (",cache.no-flush=on", ""),
}
# A disk's default, "auto": writeback, except where the VM's files are on a network filesystem
# that another host opens too (shared storage for migration). There the destination's page cache
# may hold what it read of an image before the source's last writes (the lab's NFS: a migrated
# guest read its hot-plugged disk as zeros), so it is "none", as libvirt demands for a safe move.
AUTO_CACHE = "auto"
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb2", "ceph", "fuseblk", "fuse.glusterfs", "v9fs")


def disk_cache_on(filesystem: str) -> str:
    """What "auto" is on a host whose run files are on ``filesystem`` (``stat -f -c %T``)."""
    return "none" if filesystem in NETWORK_FILESYSTEMS else "writeback"


@dataclass(frozen=True)
class Nic:
    """A NIC on a user-mode network. The first NIC of a spec carries the guest's SSH."""

    model: str = "virtio-net-pci"
    vhost: bool = False
    mac: str | None = None
    bridged: bool = False  # a tap joined to the host's bridge=, instead of user-mode networking
    tap: bool = False  # a tap of its own: a link to the host alone (implied by vhost and bridged)

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
    cache: str = AUTO_CACHE  # a -drive cache= mode (CACHE_MODES), or "auto" (AUTO_CACHE)

    def __post_init__(self):
        if self.interface not in DISK_INTERFACES:
            raise ValueError(f"disk interface {self.interface!r} is not one of {', '.join(DISK_INTERFACES)}")
        if self.cache not in CACHE_MODES and self.cache != AUTO_CACHE:
            raise ValueError(f"disk cache mode {self.cache!r} is not one of {', '.join(CACHE_MODES)}")


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
    balloon_options: tuple[str, ...] = ()  # virtio-balloon properties: "deflate-on-oom=on", ...
    host_devices: tuple[str, ...] = ()  # PCI addresses on the host, assigned with vfio-pci (bind them first)
    extra_args: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    guest_kvm: bool = False  # the guest is a KVM host itself: its init loads kvm_amd/kvm_intel

    def __post_init__(self):
        if self.balloon_options and not self.balloon:
            raise ValueError("balloon_options without balloon=True")

    def with_(self, **changes) -> "VMSpec":
        """A new spec with ``changes`` (specs are frozen: a VM's spec never changes after creation)."""
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
    auto_cache: str = "writeback"  # what a disk's "auto" cache is on this host (disk_cache_on)


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
    # no_timer_check: on a busy host a vCPU can miss the kernel's IO-APIC timer check, and the
    # guest panics ("IO-APIC + timer doesn't work"); a virtual machine's timer is known good.
    # cryptomgr.notests: no self-tests of the kernel's crypto algorithms at boot (0.2 s under
    # TCG, 0.4 s nested); the guest's own crypto is not what this suite checks.
    args = ["console=ttyS0", "quiet", "pci=noearly", "no_timer_check", "panic=-1", "cryptomgr.notests",
            f"kvmcheck.key={key}", f"kvmcheck.mac={management_mac(spec, ctx.mac_seed)}",
            *(["kvmcheck.kvm=1"] if spec.guest_kvm else []), *spec.kernel_args]
    return " ".join(args)


def qemu_argv(qemu: str, *, name: str, machine: str, accel: str | None, cpu: str | None, memory: str, smp: str,
              console_log: str, qmp: str, pidfile: str | None = None, log: str = "",
              no_reboot: bool = True) -> list[str]:
    """The part of every command line this project starts: a headless QEMU with no default
    devices, its serial console in a file, QMP where ``qmp`` says, daemonized with a pidfile.

    Guests (:func:`render_argv`), the KVM probe, the lab's hosts and a QEMU without a guest
    (:func:`noguest_argv`) all begin here; each then adds its own devices.
    """
    argv = [qemu, "-name", name, "-machine", machine + (f",accel={accel}" if accel else "")]
    if cpu:
        argv += ["-cpu", cpu]
    if memory:
        argv += ["-m", memory]
    if smp:
        argv += ["-smp", smp]
    argv += ["-nodefaults", "-no-user-config", "-display", "none"]
    if no_reboot:
        argv.append("-no-reboot")
    if console_log:
        argv += ["-serial", f"file:{console_log}"]
    argv += ["-qmp", qmp]
    if pidfile:
        argv += ["-pidfile", pidfile, "-daemonize"]
    if log:
        argv += ["-D", log]
    return argv


def noguest_argv(qemu: str, qmp: str, pidfile: str | None = None) -> list[str]:
    """QEMU with no machine and no guest, stopped (``-S``): asked about options or over QMP, then told to quit."""
    return qemu_argv(qemu, name="kvmcheck-noguest", machine="none", accel=None, cpu=None, memory="", smp="",
                     console_log="", qmp=qmp, pidfile=pidfile, no_reboot=False) + ["-S"]


def render_argv(qemu: str, spec: VMSpec, ctx: RenderContext) -> list[str]:
    """The full argv for ``spec`` on one host. Device order is fixed by the spec."""
    argv = qemu_argv(
        qemu, name="kvmcheck,debug-threads=on", machine=spec.machine, accel=ctx.accel,
        cpu=spec.cpu or ("host" if ctx.accel == "kvm" else "max"),
        memory=str(spec.memory_mib) + (f",slots={spec.memory_slots},maxmem={spec.max_memory_mib}M"
                                       if spec.max_memory_mib else ""),
        smp=str(spec.smp) + (f",maxcpus={spec.max_cpus}" if spec.max_cpus else ""),
        console_log=ctx.console_log, qmp=f"unix:{ctx.qmp_socket},server=on,wait=off", pidfile=ctx.pidfile,
        log=ctx.qemu_log)
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
        if nic.vhost or nic.bridged or nic.tap:
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
        nodes, device = CACHE_MODES[ctx.auto_cache if disk.cache == AUTO_CACHE else disk.cache]
        # On both nodes, as -drive cache= sets them: a flush the format node skipped would
        # still reach the file's.
        argv += ["-blockdev", f"driver=file,filename={path},node-name=file{i}{nodes}",
                 "-blockdev", f"driver={disk.format},file=file{i},node-name=disk{i}{nodes}"]
        serial = f",serial={disk.serial}" if disk.serial else ""
        argv += ["-device", f"{disk.interface},drive=disk{i},id=disk{i}{serial}{device}"]
    if spec.balloon:
        argv += ["-device", ",".join(("virtio-balloon-pci", "id=balloon0", *spec.balloon_options))]
    for i, bdf in enumerate(spec.host_devices):
        argv += ["-device", f"vfio-pci,host={bdf},id=hostdev{i}"]
    argv += list(spec.extra_args)
    return argv
