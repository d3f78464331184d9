"""The virtual KVM lab: KVM hosts made of TCG guests, for machines without VT-x/AMD-V.

QEMU's TCG emulates AMD SVM: a guest started with ``-accel tcg -cpu max`` loads kvm_amd and
runs its own guests under real KVM. ``kvmcheck lab up`` boots N such hosts from the lab image
(:mod:`.labimage`) and writes an inventory, so ``pytest suites --kvm-hosts=lab`` runs every
suite against real KVM hosts over SSH. Each lab host has:

- q35 with an emulated Intel IOMMU (``intel_iommu=on``), an e1000e kept for passthrough and an
  NVMe controller with SR-IOV virtual functions;
- kvm_amd with nested virtualization, vhost-net and KSM;
- SSH on a loopback port of this machine (user-mode hostfwd, ``restrict=on``: the lab reaches
  nothing outside), verified against the image's host key, with a key the lab generates;
- a port on a private network: a bridge inside a network namespace the lab creates, which
  never leaves this machine. The first host exports shared storage over NFS on it, mounted
  at the same path on every host, and the hosts' work dirs live there; guests that never
  migrate live in the host's own RAM instead (``scratch``: lab-1's NFS server would otherwise
  spend its one vCPU on every other host's disk writes).

Beside them the lab boots ``lab-power``, a host kept for the tests that cut its power
(``only = ["power-cycle"]`` in the inventory: no other test runs there, and it is no one's
migration peer). It has a disk of its own (a raw file on this machine, ext4, mounted at
:data:`LOCAL_DIR`); ``kvmcheck lab power-cycle lab-power`` kills its QEMU (the host's page
cache goes with it, as at a power loss) and boots it again on the same SSH port.

``kvmcheck lab down`` kills the hosts, deletes the namespace (their taps go with QEMU) and
removes the lab's state dir; ``up`` on a running lab changes nothing.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import KvmCheckError, LabError
from ..paths import lab_dir
from ..qemu.spec import qemu_argv
from ..guests.session import RunKey
from ..hosts.connect import connect
from ..hosts.spec import parse_host
from ..hosts.tools import sriov_pfs
from ..images.build import READY_MARKER
from .image import SHARED_MARKER, LabImage, build_lab_image

PRIVATE_NET = ipaddress.ip_interface("10.77.0.10/24")  # host i gets .10+i
SHARED_PATH = "/srv/kvmcheck"
OTHER_QEMU_BINARY = "usr/bin/qemu-system-x86_64"
# What of a QEMU package tree the lab's second QEMU needs: its binary, modules and x86 firmware.
OTHER_QEMU_PARTS = (OTHER_QEMU_BINARY, "usr/lib/x86_64-linux-gnu/qemu", "usr/share/qemu", "usr/share/seabios")
LOCAL_DIR = "/var/lib/kvmcheck-local"  # on the power host's own disk
SCRATCH_DIR = "/var/tmp/kvmcheck"  # in a host's root filesystem (RAM): for guests that never migrate
POWER_HOST = "lab-power"
POWER_HOST_MEMORY_MIB = 2048
PASSTHROUGH_NIC = "8086:10d3"  # the e1000e each lab host keeps for device assignment
BOOT_TIMEOUT = 180.0
GUEST_BOOT_TIMEOUT = 300
# A lab host's vCPUs are emulated, and so is the switchover: full lab runs measured 86-513 ms
# (precopy, postcopy) and 0.9-4.4 s (multifd, whose channels sync at the switchover).
MIGRATION_DOWNTIME_BOUND_MS = 10000


@dataclass
class LabHost:
    """One lab host as started: where its QEMU keeps its files and how to reach it."""

    name: str
    index: int
    directory: str
    ssh_port: int
    private_ip: str
    tap: str
    pid: int = 0
    assignable: tuple[str, ...] = ()
    sriov_pf: str = ""
    ready_s: float = 0.0  # QEMU start to sshd up (the ready marker on the console)
    memory_mib: int = 4096
    cpus: int = 1
    power: bool = False  # kept for power-cycle tests, with a disk of its own

    @property
    def pidfile(self) -> str:
        return f"{self.directory}/qemu.pid"

    @property
    def console(self) -> str:
        return f"{self.directory}/console.log"

    def alive(self) -> bool:
        """Our QEMU (its argv names our pidfile: a recycled pid does not count), until its last
        thread has ended. A killed QEMU's main thread lets go of its argv before the others have
        ended and closed its files: its SSH port and its tap, which a power cycle's new QEMU needs."""
        try:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return self.pidfile in argv if argv else _threads_running(self.pid)


PF_KTHREAD = 0x00200000  # /proc/PID/stat's flags: a kernel thread
KILLED_QEMU_ENDS_S = 60  # a SIGKILLed QEMU frees its guest's RAM and closes its files in this time


def _threads_running(pid: int) -> bool:
    """Whether a process with no argv (one exiting, or a kernel thread) has a thread that has
    not ended; a kernel thread is never a lab host's QEMU."""
    try:
        if int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[6]) & PF_KTHREAD:
            return False
        tasks = os.listdir(f"/proc/{pid}/task")
    except (OSError, ValueError, IndexError):
        return False
    for task in tasks:
        try:
            if Path(f"/proc/{pid}/task/{task}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X"):
                return True
        except (OSError, IndexError):
            continue
    return False


def _sh(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LabError(f"the lab needs {argv[0]!r}: run the README's setup command") from None
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


PORT_HELD_S = 60  # how long a power cycle waits for its SSH port and disks to be free again


def _ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    try:
        low, high = map(int, Path(path).read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def _free_port(ephemeral: range | None = None) -> int:
    """A free port on loopback for a lab host's SSH, below the kernel's ephemeral range: a
    port from that range, free while its QEMU was down for a power cycle, was handed to one of
    the run's own outgoing connections, and the host came back on another port than the
    inventory's (the run waited 600 s for it)."""
    ephemeral = ephemeral or _ephemeral_ports()
    candidates = list(range(max(1024, ephemeral.start - 20000), ephemeral.start))
    for port in secrets.SystemRandom().sample(candidates, min(len(candidates), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mac(kind: int, index: int) -> str:
    return f"52:54:00:6c:{kind:02x}:{index:02x}"


class Lab:
    """The lab whose state lives in ``directory`` (one per machine by default)."""

    def __init__(self, directory: Path | None = None, progress=None):
        self.dir = Path(directory or lab_dir())
        self.say = progress or (lambda msg: None)
        tag = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:6]
        self.netns = f"kvmcheck-lab-{tag}"
        self.tap_prefix = f"kcl{tag}-"

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    def hosts(self) -> list[LabHost]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        return [LabHost(**{**h, "assignable": tuple(h.get("assignable", ()))}) for h in state["hosts"]]

    def _keep(self, image: LabImage) -> LabImage:
        """The lab's own copy of the image it boots (hard links in its dir): a power cycle boots
        the host again from it, whatever the image cache holds by then. A change to the lab's
        recipe dir builds a new image and prunes the old one; a host power-cycled from that
        new image came back with another SSH host key and never answered the run again."""
        kept = self.dir / "image"
        kept.mkdir(parents=True, exist_ok=True)
        for source in image.directory.iterdir():
            if source.is_file() and not (kept / source.name).exists():
                try:
                    os.link(source, kept / source.name)
                except OSError:  # another filesystem
                    shutil.copy2(source, kept / source.name)
        return LabImage.load(kept)

    def _save(self, hosts: list[LabHost], image: LabImage) -> None:
        self.state_file.write_text(json.dumps({"image": image.digest, "netns": self.netns,
                                               "hosts": [asdict(h) for h in hosts]}, indent=2))

    def is_up(self) -> bool:
        hosts = self.hosts()
        return bool(hosts) and all(h.alive() for h in hosts) and (self.dir / "inventory.toml").is_file()

    # ------------------------------------------------------------------ up
    def up(self, count: int = 2, memory_mib: int = 4096, cpus: int = 1, other_qemu: str | None = None) -> list[LabHost]:
        """Boot ``count`` lab hosts and write the inventory; a lab already up is left as it is.

        ``other_qemu``: an unpacked QEMU tree on this machine (scripts/qemu-backports.sh's
        prefix, usr/bin/qemu-system-x86_64 in it) placed on the lab's shared storage and offered
        to every host as its second QEMU (other_qemu=): version skew under KVM."""
        if other_qemu is not None and not (Path(other_qemu) / OTHER_QEMU_BINARY).is_file():
            raise LabError(f"--other-qemu {other_qemu}: no {OTHER_QEMU_BINARY} in it (an unpacked QEMU package tree)")
        if count < 1 or count > 40:
            raise LabError(f"--hosts must be between 1 and 40, got {count}")
        if self.is_up():
            hosts = self.hosts()
            self.say(f"the lab is already up ({len(hosts)} hosts); 'kvmcheck lab down' first to change it")
            return hosts
        if self.hosts() or self.dir.exists():
            self.say("removing what an earlier lab left")
            self.down()
        started = time.monotonic()
        image = build_lab_image(progress=self.say)
        self.say(f"lab image {image.digest} ready after {time.monotonic() - started:.0f} s")
        try:
            return self._boot(self._keep(image), count, memory_mib, cpus, started, other_qemu)
        except BaseException:  # a failure or Ctrl-C part way: nothing of the lab stays
            self.down()
            raise

    def _boot(self, image: LabImage, count: int, memory_mib: int, cpus: int, started: float,
              other_qemu: str | None = None) -> list[LabHost]:
        self.dir.mkdir(parents=True, exist_ok=True)
        key = RunKey.create(self.dir / "id_ed25519")
        _sh(["ip", "netns", "add", self.netns])
        _sh(["ip", "-n", self.netns, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", self.netns, "link", "set", "br0", "up"])
        storage_ip = str(PRIVATE_NET.ip + 1)
        hosts, started_at = [], {}
        for i in range(1, count + 2):
            power = i == count + 1
            name = POWER_HOST if power else f"lab-{i}"
            host = LabHost(name=name, index=i, directory=str(self.dir / name), ssh_port=0,
                           private_ip=f"{PRIVATE_NET.ip + i}/{PRIVATE_NET.network.prefixlen}",
                           tap=f"{self.tap_prefix}{i}", memory_mib=POWER_HOST_MEMORY_MIB if power else memory_mib,
                           cpus=cpus, power=power)
            started_at[host.name] = time.monotonic()
            self._start(host, image, key.public_line, storage_ip)
            hosts.append(host)
            self._save(hosts, image)
            self.say(f"{host.name}: QEMU {host.pid} started, SSH on 127.0.0.1:{host.ssh_port}")
        (self.dir / "known_hosts").write_text(
            "".join(f"[127.0.0.1]:{h.ssh_port} {image.host_public_key}\n" for h in hosts))
        for host in hosts:
            self._wait_ready(host)
            host.ready_s = time.monotonic() - started_at[host.name]
            self.say(f"{host.name}: ready, {host.ready_s:.1f} s after its QEMU started")
        for host in hosts:
            self._describe_devices(host)
            self._wait_shared(host)
        second = self._place_other_qemu(hosts[0], other_qemu) if other_qemu else None
        self._save(hosts, image)
        self._write_inventory(hosts, second)
        self.say(f"the lab is up: {count} hosts and {POWER_HOST} (for power-cycle tests) in "
                 f"{time.monotonic() - started:.0f} s; use --kvm-hosts=lab")
        return hosts

    def _argv(self, host: LabHost, image: LabImage, public_key: str, storage_ip: str) -> list[str]:
        d = host.directory
        args = " ".join([
            image.kernel_args,
            "kvmcheck.key=" + base64.b64encode(public_key.encode()).decode(),
            f"kvmcheck.name={host.name}", f"kvmcheck.mgmt={_mac(0, host.index)}",
            f"kvmcheck.lan={_mac(1, host.index)}", f"kvmcheck.ip={host.private_ip}",
            f"kvmcheck.nfs={storage_ip}", f"kvmcheck.shared={SHARED_PATH}",
            *([f"kvmcheck.local={LOCAL_DIR}"] if host.power else []),
        ])
        return qemu_argv(
            "qemu-system-x86_64", name=f"{host.name},process=kvmcheck-{host.name}", machine="q35,kernel-irqchip=split",
            accel=None, cpu="max", memory=str(host.memory_mib), smp=str(host.cpus), console_log=host.console,
            qmp=f"unix:{d}/qmp.sock,server=on,wait=off", pidfile=host.pidfile, no_reboot=False) + [
            "-accel", "tcg,thread=multi",
            "-device", "intel-iommu,intremap=on",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", args,
            # SSH from this machine only: loopback, and restrict=on keeps the host from reaching out.
            "-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{host.ssh_port}-:22",
            "-device", f"virtio-net-pci,netdev=mgmt,mac={_mac(0, host.index)}",
            "-netdev", f"tap,id=lan,ifname={host.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=lan,mac={_mac(1, host.index)}",
            # Kept for passthrough: an e1000e with no network behind it, and an SR-IOV NVMe.
            "-device", "e1000e,id=passthrough0,mac=" + _mac(2, host.index),
            "-drive", f"file={d}/nvme.img,if=none,id=nvm0,format=raw",
            "-device", "nvme-subsys,id=subsys0",
            "-device", f"nvme,id=sriov0,serial=kvmcheck-{host.name},subsys=subsys0,sriov_max_vfs=2,"
                       "sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=6,msix_qsize=4",
            "-device", "nvme-ns,drive=nvm0,nsid=1",
            "-device", "virtio-rng-pci",
        ] + ([  # its own disk; QEMU's default cache (writeback) honours the host's flushes
            "-drive", f"file={d}/local.img,if=none,id=local0,format=raw",
            "-device", "virtio-blk-pci,drive=local0,serial=kvmcheck-local",
        ] if host.power else [])

    def _start(self, host: LabHost, image: LabImage, public_key: str, storage_ip: str) -> None:
        """Start the host's QEMU; on the SSH port it had, if it had one (a power cycle)."""
        os.makedirs(host.directory, exist_ok=True)
        for disk, size in (("nvme.img", "256M"), *((("local.img", "2G"),) if host.power else ())):
            if not os.path.exists(f"{host.directory}/{disk}"):  # what a power cycle must find again
                _sh(["qemu-img", "create", "-q", "-f", "raw", f"{host.directory}/{disk}", size])
        # A new host takes a free port, another if that one is taken before QEMU binds it. A
        # power cycle keeps the port the inventory names, waiting for it to be free again.
        keep, attempts = host.ssh_port, 0
        deadline = time.monotonic() + PORT_HELD_S
        while True:
            host.ssh_port = keep or _free_port()
            proc = _sh(self._argv(host, image, public_key, storage_ip), timeout=60, check=False)
            if proc.returncode == 0:
                break
            attempts += 1
            taken = "host forwarding rule" in proc.stderr
            # A power cycle's QEMU may find its disks still locked by the killed one's last files.
            locked = keep and 'Failed to get "write" lock' in proc.stderr
            if (taken or locked) and (time.monotonic() < deadline if keep else attempts < 5):
                time.sleep(1 if keep else 0)
                continue
            held = f" (its SSH port {keep}, which the inventory names, stayed taken for {PORT_HELD_S} s)" \
                if keep and taken else f" (its disks stayed locked for {PORT_HELD_S} s)" if locked else ""
            raise LabError(f"{host.name}: QEMU did not start{held}: {proc.stderr.strip()[-500:]}")
        host.pid = int(Path(host.pidfile).read_text().strip())
        # The tap moves into the lab's namespace, onto its bridge: the private network stays there.
        _sh(["ip", "link", "set", host.tap, "netns", self.netns])
        _sh(["ip", "-n", self.netns, "link", "set", host.tap, "master", "br0", "up"])

    def _console(self, host: LabHost) -> str:
        try:
            return Path(host.console).read_text(errors="replace")
        except OSError:
            return ""

    def _wait_for(self, host: LabHost, marker: str, what: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while marker not in self._console(host):
            if not host.alive():
                raise LabError(f"{host.name}: QEMU exited before {what}; console:\n{self._console(host)[-1500:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: not {what} within {BOOT_TIMEOUT:.0f} s; "
                               f"console:\n{self._console(host)[-1500:]}")
            time.sleep(0.2)

    def _wait_ready(self, host: LabHost) -> None:
        self._wait_for(host, READY_MARKER, "ready")

    def _wait_shared(self, host: LabHost) -> None:
        self._wait_for(host, SHARED_MARKER, "mounted the shared storage")

    def _describe_devices(self, host: LabHost) -> None:
        """Find the passthrough NIC and the SR-IOV PF's addresses: the inventory lists them."""
        transport = self.connect(host)
        try:
            out = transport.run(["lspci", "-D", "-n", "-d", PASSTHROUGH_NIC], timeout=30).check().stdout
            host.assignable = tuple(line.split()[0] for line in out.splitlines() if line.strip())
            host.sriov_pf = next(iter(sriov_pfs(transport)), "")
        finally:
            transport.close()

    def spec(self, host: LabHost):
        return parse_host(f"ssh://root@127.0.0.1:{host.ssh_port}?key={self.dir / 'id_ed25519'}"
                          f"&known_hosts={self.dir / 'known_hosts'}&name={host.name}")

    def connect(self, host: LabHost):
        return connect(self.spec(host))

    def power_cycle(self, name: str) -> LabHost:
        """Cut a lab host's power (SIGKILL to its QEMU: its page cache is gone) and boot it again,
        on the same SSH port and with the same disks; return once it is ready again."""
        hosts = self.hosts()
        host = next((h for h in hosts if h.name == name), None)
        if host is None:
            raise LabError(f"no lab host {name!r} (the lab has: {', '.join(h.name for h in hosts) or 'none'})")
        if not host.power:
            raise LabError(f"{name} shares the lab's storage or runs its tests; only {POWER_HOST} is power-cycled")
        self._kill(host)
        Path(host.console).write_text("")  # the ready markers below must be the new boot's
        if not (self.dir / "image" / "manifest.json").is_file():
            raise LabError(f"the lab's copy of its image is gone from {self.dir / 'image'}: "
                           "'kvmcheck lab down' and 'kvmcheck lab up' again")
        image = LabImage.load(self.dir / "image")
        public_key = (self.dir / "id_ed25519.pub").read_text().strip()
        started = time.monotonic()
        self._start(host, image, public_key, str(PRIVATE_NET.ip + 1))
        self._save(hosts, image)
        self._wait_ready(host)
        self._wait_shared(host)
        self.say(f"{name}: power-cycled, ready again {time.monotonic() - started:.1f} s after its QEMU started")
        return host

    def _place_other_qemu(self, host: LabHost, prefix: str) -> str:
        """Copy what a QEMU tree needs to run x86 guests (the binary, its modules, its firmware)
        to the shared storage, through ``host``, with a wrapper pointing it at its own files;
        returns the wrapper's path, the same on every host."""
        started = time.monotonic()
        root = Path(prefix)
        parts = [p for p in OTHER_QEMU_PARTS if (root / p).exists()]
        target = f"{SHARED_PATH}/other-qemu"
        transport = self.connect(host)
        try:
            with tempfile.TemporaryDirectory() as scratch:
                bundle = Path(scratch) / "qemu.tar.gz"
                subprocess.run(["tar", "-czf", str(bundle), "-C", str(root), *parts], check=True)
                transport.makedirs(target)
                transport.put_file(str(bundle), f"{target}/qemu.tar.gz")
            transport.run(["tar", "-xzf", f"{target}/qemu.tar.gz", "-C", target], timeout=120).check(
                "unpacking the other QEMU on the lab's shared storage")
            transport.run(["rm", "-f", f"{target}/qemu.tar.gz"]).check()
            wrapper = f"{target}/bin/qemu-system-x86_64"
            transport.makedirs(f"{target}/bin")
            transport.write_bytes(wrapper, (
                "#!/bin/sh\n"
                f"export QEMU_MODULE_DIR={target}/usr/lib/x86_64-linux-gnu/qemu\n"
                f"exec {target}/{OTHER_QEMU_BINARY} -L {target}/usr/share/qemu -L {target}/usr/share/seabios \"$@\"\n"
            ).encode(), mode=0o755)
            said = transport.run([wrapper, "--version"], timeout=60).check("the other QEMU on a lab host").stdout
        finally:
            transport.close()
        self.say(f"other QEMU ({said.splitlines()[0]}) on the shared storage in {time.monotonic() - started:.0f} s")
        return wrapper

    def _write_inventory(self, hosts: list[LabHost], other_qemu: str | None = None) -> None:
        lines = ["# Written by 'kvmcheck lab up'; removed by 'kvmcheck lab down'. Use: --kvm-hosts=lab", ""]
        kvmcheck = str(Path(sys.executable).parent / "kvmcheck")
        for h in hosts:
            assignable = [*h.assignable, *([h.sriov_pf] if h.sriov_pf else [])]
            lines += [
                f"[hosts.{h.name}]",
                f'url = "ssh://root@127.0.0.1:{h.ssh_port}"',
                f'key = "{self.dir / "id_ed25519"}"',
                f'known_hosts = "{self.dir / "known_hosts"}"',
                f'workdir = "{SHARED_PATH}"  # on the shared storage: every host sees the same paths',
                f'migrate_address = "{h.private_ip.split("/")[0]}"  # the private network',
                'bridge = "br0"',
                f"boot_timeout = {GUEST_BOOT_TIMEOUT}  # guests under nested KVM on an emulated CPU: ~20 s idle, more when busy",
                f"max_downtime_ms = {MIGRATION_DOWNTIME_BOUND_MS}  # the switchover runs on an emulated CPU too",
                "allow_host_changes = true  # the lab's hosts are the tests' own",
                f"assignable = {json.dumps(assignable)}",
                'tags = ["lab"]',
            ]
            if not h.power:  # the power host's RAM goes with its power: its guests stay on its disk
                lines.append(f'scratch = "{SCRATCH_DIR}"  # its own RAM: guests that stay here skip the NFS')
            if other_qemu and not h.power:
                lines.append(f'other_qemu = "{other_qemu}"  # kvmcheck lab up --other-qemu: version skew')
            if h.power:
                lines += [
                    'only = ["power-cycle"]  # no other test runs here: a power cycle kills every VM',
                    f'local_dir = "{LOCAL_DIR}"',
                    f"power_cycle = {json.dumps(['env', f'KVMCHECK_LAB_DIR={self.dir}', kvmcheck, 'lab', 'power-cycle', h.name])}",
                ]
            lines.append("")
        (self.dir / "inventory.toml").write_text("\n".join(lines))

    # ------------------------------------------------------------------ status
    def status(self) -> list[dict]:
        """Each host: alive, reachable, its kernel, KVM, nested, shared storage."""
        out = []
        for host in self.hosts():
            row = {"name": host.name, "pid": host.pid, "ssh": f"127.0.0.1:{host.ssh_port}",
                   "private_ip": host.private_ip, "alive": host.alive()}
            if row["alive"]:
                try:
                    t = self.connect(host)
                    try:
                        row["kernel"] = t.run(["uname", "-r"], timeout=20).stdout.strip()
                        row["kvm"] = t.exists("/dev/kvm")
                        row["nested"] = t.read_text("/sys/module/kvm_amd/parameters/nested", default="-").strip()
                        row["shared"] = t.run(["mountpoint", "-q", SHARED_PATH], timeout=20).ok
                    finally:
                        t.close()
                except KvmCheckError as exc:
                    row["error"] = str(exc)
            out.append(row)
        return out

    @staticmethod
    def _kill(host: LabHost) -> None:
        """SIGKILL the host's QEMU, if it runs, and wait until its last thread has ended."""
        if not host.alive():
            return
        os.kill(host.pid, signal.SIGKILL)
        deadline = time.monotonic() + KILLED_QEMU_ENDS_S
        while host.alive():
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: QEMU {host.pid} has not ended {KILLED_QEMU_ENDS_S} s after SIGKILL")
            time.sleep(0.05)

    # ------------------------------------------------------------------ down
    def _unnamed_hosts(self) -> list[LabHost]:
        """Hosts whose QEMU wrote its pidfile in the lab's dir before the lab's state named them:
        one started as an interrupt came (CI's interrupted lab up left the power host's)."""
        named = {host.directory for host in self.hosts()}
        found = []
        for pidfile in sorted(self.dir.glob("*/qemu.pid")) if self.dir.exists() else ():
            pid = pidfile.read_text(errors="replace").strip()
            if str(pidfile.parent) not in named and pid.isdigit():
                found.append(LabHost(name=pidfile.parent.name, index=0, directory=str(pidfile.parent), ssh_port=0,
                                     private_ip="", tap="", pid=int(pid)))
        return found

    def down(self) -> list[str]:
        """Kill every lab host, delete the namespace and the state dir. Safe to repeat."""
        notes = []
        hosts = self.hosts() + self._unnamed_hosts()
        for host in hosts:
            if host.alive():
                os.kill(host.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for host in hosts:
            while host.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                self._kill(host)
                notes.append(f"{host.name}: stopped (QEMU {host.pid})")
            except LabError as exc:  # the rest comes down all the same
                notes.append(str(exc))
        if _sh(["ip", "netns", "list"], check=False).stdout.split().count(self.netns):
            _sh(["ip", "netns", "del", self.netns])
            notes.append(f"deleted network namespace {self.netns}")
        for link in _sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
            name = link.split(":")[1].strip().split("@")[0] if ":" in link else ""
            if name.startswith(self.tap_prefix):  # a tap whose move into the namespace never happened
                _sh(["ip", "link", "del", name], check=False)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            notes.append(f"removed {self.dir}")
        return notes
