"""Host specs: the one place where ``--kvm-hosts`` values and inventories are parsed.

Accepted forms, comma separated::

    local                                   this machine, via subprocesses
    ssh://user@host[:port][?key=..&qemu=..&qemu_img=..&workdir=..&accel=..&name=..&boot_timeout=..
                                            &max_downtime_ms=..&allow_host_changes=1&sudo=1&accept_new_host_key=1
                                            &known_hosts=..&power_cycle=..&local_dir=..&only=..&other_qemu=..
                                            &machine=..&scratch=..]
    @inventory.toml                         a TOML inventory (see fixtures/inventory.example.toml)
    lab                                     the virtual KVM lab's inventory, once it is up

A malformed entry raises :class:`HostSpecError` naming the entry and the bad part.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .. import paths
from ..errors import HostSpecError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ACCELS = ("auto", "kvm", "tcg")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_QUERY_KEYS = {"key", "qemu", "qemu_img", "workdir", "accel", "name", "accept_new_host_key",
               "known_hosts", "memory_budget_mib", "tags", "assignable", "migrate_address", "expect",
               "bridge", "boot_timeout", "max_downtime_ms", "allow_host_changes", "sudo", "power_cycle",
               "local_dir", "only", "other_qemu", "machine", "scratch"}
_INVENTORY_KEYS = _QUERY_KEYS | {"url"}


@dataclass(frozen=True)
class HostSpec:
    """Everything needed to reach one host and run QEMU there."""

    name: str
    transport: str = "local"  # "local" or "ssh"
    hostname: str | None = None
    user: str | None = None
    port: int | None = None
    key: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    qemu: str | None = None  # None: found on the host (see capabilities.QEMU_CANDIDATES)
    qemu_img: str | None = None  # None: found on the host (see capabilities.QEMU_IMG_CANDIDATES)
    accel: str | None = None  # overrides --kvm-accel for this host
    workdir: str | None = None
    # A directory on the host's own storage (tmpfs will do) for the guests that stay on the host
    # (tests with no migration peer). Where workdir is shared storage, their disks then need no
    # network round trips and no cache=none: the lab's HMP savevm took 82 s on its NFS, 13 s here.
    scratch: str | None = None
    memory_budget_mib: int | None = None  # tests needing more memory (kvm_requires("memory:N")) skip here
    assignable: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()  # capabilities the host must have: a test skipped for one of them FAILs
    migrate_address: str | None = None  # where other hosts reach this one's migration listener
    bridge: str | None = None  # a Linux bridge guests' bridged NICs join (it must have an IPv4 address)
    boot_timeout: int | None = None  # seconds a guest may take to boot there (slow hosts: nested, emulated)
    max_downtime_ms: int | None = None  # live migration downtime bound to or from it (default: the ini's)
    # Tests that change host-wide state (KSM, sriov_numvfs, driver bindings) run there only if
    # allowed; None: allowed on this machine (local), not on a host reached over SSH.
    allow_host_changes: bool | None = None
    sudo: bool = False  # reached as a user who is not root: what needs root runs through sudo -n
    # A command run on this machine that cuts the host's power and turns it back on (a BMC's
    # "chassis power cycle"; the lab's "kvmcheck lab power-cycle NAME"): every VM there dies.
    power_cycle: tuple[str, ...] = ()
    local_dir: str | None = None  # a directory on the host's own disk (not tmpfs, not NFS)
    only: tuple[str, ...] = ()  # the host takes only tests that need one of these (a host kept for power cycles)
    # A second QEMU build on the host (another release): version skew, as a fleet upgraded host by
    # host has it. The run prepares it as a host of its own, NAME.other-qemu (KvmRun.other_qemu).
    other_qemu: str | None = None
    # The physical machine whose CPUs the host's guests use (None: see machine_name): hosts that
    # are VMs of one machine share it, and a speed measurement on one of them runs alone there.
    machine: str | None = None

    @property
    def machine_name(self) -> str:
        """``machine=``, or this machine for ``local`` and for hosts reached on loopback (VMs
        forwarded here, as the lab's are), or else the host's own address."""
        if self.machine:
            return self.machine
        if self.transport == "local" or self.hostname in LOOPBACK:
            return socket.gethostname()
        return self.hostname or self.name

    @property
    def host_changes_allowed(self) -> bool:
        return self.allow_host_changes if self.allow_host_changes is not None else self.transport == "local"

    @property
    def migration_address(self) -> str:
        """The address a destination QEMU listens on: never 0.0.0.0, only where peers reach it."""
        return self.migrate_address or self.hostname or "127.0.0.1"

    @property
    def url(self) -> str:
        """A display form without secrets (key paths are not secrets, but left out for brevity)."""
        if self.transport == "local":
            return "local"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.hostname}{port}"


def _bool(value: str, what: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise HostSpecError(f"{what}: expected a yes/no value, got {value!r}")


def _int(value, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise HostSpecError(f"{what}: expected a whole number, got {value!r}") from None
    if n <= 0:
        raise HostSpecError(f"{what}: must be positive, got {n}")
    return n


def _list(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    # '+' separates items; in a URL query it arrives decoded as a space.
    return tuple(v for v in re.split(r"[+\s]+", str(value)) if v)


def _apply_options(spec: HostSpec, options: dict, where: str) -> HostSpec:
    changes: dict = {}
    for key, value in options.items():
        what = f"{where}: {key}"
        if key == "accel":
            if value not in ACCELS:
                raise HostSpecError(f"{what}: must be one of {', '.join(ACCELS)}, got {value!r}")
            changes["accel"] = None if value == "auto" else value
        elif key in ("accept_new_host_key", "allow_host_changes", "sudo"):
            changes[key] = value if isinstance(value, bool) else _bool(value, what)
        elif key in ("memory_budget_mib", "boot_timeout", "max_downtime_ms"):
            changes[key] = _int(value, what)
        elif key in ("tags", "assignable", "expect", "only"):
            changes[key] = _list(value)
        elif key == "power_cycle":
            changes[key] = tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else tuple(shlex.split(value))
            if not changes[key]:
                raise HostSpecError(f"{what}: an empty command")
        elif key == "name":
            if not _NAME_RE.match(str(value)):
                raise HostSpecError(f"{what}: {value!r} is not a valid host name "
                                    "(letters, digits, '.', '_', '-')")
            changes["name"] = str(value)
        elif key in ("key", "known_hosts", "workdir", "scratch"):
            changes[key] = os.path.expanduser(str(value)) if key in ("key", "known_hosts") else str(value)
        else:
            changes[key] = str(value)
    spec = replace(spec, **changes)
    if spec.sudo and spec.transport == "local":
        raise HostSpecError(f"{where}: sudo is for hosts reached over SSH; for this machine, run pytest as root")
    if spec.power_cycle and spec.transport == "local":
        raise HostSpecError(f"{where}: power_cycle is for hosts reached over SSH: this machine runs the tests")
    return spec


def parse_host(entry: str) -> HostSpec:
    """Parse one ``local`` or ``ssh://`` entry."""
    entry = entry.strip()
    if not entry:
        raise HostSpecError("empty host entry (two commas in a row?)")
    if entry == "local" or entry.startswith("local?"):
        query = entry.partition("?")[2]
        return _apply_options(HostSpec(name="local"), _query(query, entry), f"host {entry!r}")
    if "://" not in entry:
        raise HostSpecError(
            f"host {entry!r}: not understood; use 'local', 'ssh://user@host[:port]' or '@inventory.toml'")
    parts = urlsplit(entry)
    if parts.scheme != "ssh":
        raise HostSpecError(f"host {entry!r}: unsupported scheme {parts.scheme!r}; only ssh:// is supported")
    if not parts.hostname:
        raise HostSpecError(f"host {entry!r}: no host name after ssh://")
    try:
        port = parts.port
    except ValueError:
        raise HostSpecError(f"host {entry!r}: the port is not a number between 1 and 65535") from None
    if parts.path not in ("", "/"):
        raise HostSpecError(f"host {entry!r}: unexpected path {parts.path!r}; options go after '?'")
    user = unquote(parts.username) if parts.username else None
    spec = HostSpec(name=parts.hostname if port in (None, 22) else f"{parts.hostname}-{port}",
                    transport="ssh", hostname=parts.hostname, user=user, port=port)
    if parts.password:
        raise HostSpecError(f"host {parts.hostname!r}: passwords in host specs are refused; use key=PATH")
    return _apply_options(spec, _query(parts.query, entry), f"host {spec.url!r}")


def _query(query: str, entry: str) -> dict:
    options: dict = {}
    for key, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if key not in _QUERY_KEYS:
            raise HostSpecError(f"host {entry.split('?')[0]!r}: unknown option {key!r} "
                                f"(known: {', '.join(sorted(_QUERY_KEYS))})")
        options[key] = values[-1]
    return options


def load_inventory(path: str | Path) -> list[HostSpec]:
    """Read a TOML inventory: ``[hosts.NAME]`` tables with ``url`` and host options."""
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise HostSpecError(f"inventory {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise HostSpecError(f"inventory {str(p)!r} is not valid TOML: {exc}") from None
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise HostSpecError(f"inventory {str(p)!r} has no [hosts.NAME] tables")
    out = []
    for name, table in hosts.items():
        where = f"inventory {p.name} host {name!r}"
        if not isinstance(table, dict):
            raise HostSpecError(f"{where}: must be a table")
        unknown = set(table) - _INVENTORY_KEYS
        if unknown:
            raise HostSpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        base = parse_host(str(table.get("url", "local")))
        options = {k: v for k, v in table.items() if k != "url"}
        options.setdefault("name", name)
        key = options.get("key")
        if key and not os.path.isabs(os.path.expanduser(str(key))):
            options["key"] = str(p.parent / str(key))  # relative to the inventory
        out.append(_apply_options(base, options, where))
    return out


def parse_hosts(value: str | None, lab_inventory: Path | None = None) -> list[HostSpec]:
    """Parse a whole ``--kvm-hosts`` value. Host names must be unique."""
    value = (value or "local").strip() or "local"
    specs: list[HostSpec] = []
    for entry in value.split(","):
        entry = entry.strip()
        if entry.startswith("@"):
            specs.extend(load_inventory(entry[1:]))
        elif entry == "lab":
            lab_inventory = lab_inventory or paths.lab_inventory()
            if not Path(lab_inventory).is_file():
                raise HostSpecError("host 'lab': the virtual KVM lab is not up; run 'kvmcheck lab up' first")
            specs.extend(load_inventory(lab_inventory))
        else:
            specs.append(parse_host(entry))
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise HostSpecError(f"host name {s.name!r} is given twice; add name=... to tell them apart")
        seen.add(s.name)
    return specs
