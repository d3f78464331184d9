"""The handbook's 2016 commands against today's QEMU: the table, the translation, the check.

:data:`LEGACY_FORMS` lists each command of the handbook that changed, what replaces it,
since when, and (for command-line options) its own rewrite to the modern form, which
:func:`translate_legacy` applies. Suites put the table's verdict into the report with :func:`describe`
and ask the host's QEMU about a legacy form without a guest (:mod:`.noguest`);
:func:`command_arguments` reads a QMP command's arguments from the host's own schema.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..hosts.transport import Host
from .noguest import NoGuestQemu

Rewrite = Callable[[str, "Counter[str]"], list]  # (the option's value, names used so far) -> modern argv


@dataclass(frozen=True)
class LegacyForm:
    """One command of the 2016 handbook and what it means on today's QEMU and kernels.

    A row about a QEMU option names it (``option``), says which of its values it covers
    (``applies``) and rewrites them (``rewrite``); rows about host steps have no option.
    """

    legacy: str
    modern: str
    status: str  # "removed", "deprecated", "accepted"
    since: str  # the QEMU (or kernel) version where the status began
    note: str
    option: str = ""
    takes_value: bool = True
    applies: Callable[[str], bool] = field(default=lambda value: True, compare=False)
    rewrite: Rewrite | None = field(default=None, compare=False)

    def removed_in(self, qemu_version: tuple[int, int, int]) -> bool:
        if self.status != "removed" or not self.since.startswith("QEMU "):
            return False
        major, minor = (int(x) for x in self.since.split()[1].split(".")[:2])
        return qemu_version[:2] >= (major, minor)


def _fresh(prefix: str, used: "Counter[str]") -> str:
    name = f"{prefix}{used[prefix]}"
    used[prefix] += 1
    return name


def _params(value: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in value.split(",") if "=" in p)


def _net_nic(value: str, used) -> list[str]:
    model = _params(value).get("model", "e1000")
    netdev = _fresh("legacynet", used)
    return ["-netdev", f"user,id={netdev}", "-device", f"{ {'virtio': 'virtio-net-pci'}.get(model, model)},netdev={netdev}"]


def _net_tap(value: str, used) -> list[str]:
    params = value.split(",", 1)[1] if "," in value else ""
    netdev = _fresh("legacynet", used)
    return ["-netdev", f"tap,id={netdev}" + (f",{params}" if params else ""), "-device", f"virtio-net-pci,netdev={netdev}"]


def _drive_virtio(value: str, used) -> list[str]:
    params = _params(value)
    node = _fresh("legacydisk", used)
    return ["-blockdev", f"driver=file,filename={params['file']},node-name={node}f",
            "-blockdev", f"driver={params.get('format', 'qcow2')},file={node}f,node-name={node}",
            "-device", f"virtio-blk-pci,drive={node}"]


LEGACY_FORMS: tuple[LegacyForm, ...] = (
    LegacyForm("-balloon virtio", "-device virtio-balloon-pci", "removed", "QEMU 3.1",
               "the balloon is an ordinary PCI device now", option="-balloon",
               applies=lambda v: v.startswith("virtio") or v == "none",
               rewrite=lambda v, used: ["-device", "virtio-balloon-pci"] if v.startswith("virtio") else []),
    LegacyForm("-net nic,model=virtio", "-netdev user,id=n0 -device virtio-net-pci,netdev=n0",
               "accepted", "QEMU 2.12",
               "-net still works (hub-based), -netdev/-device is the supported form; 'vlan=' was removed in 3.0",
               option="-net", applies=lambda v: v.startswith("nic"), rewrite=_net_nic),
    LegacyForm("-net tap,vhost=on", "-netdev tap,id=n0,vhost=on -device virtio-net-pci,netdev=n0",
               "accepted", "QEMU 2.12", "vhost needs /dev/vhost-net on the host",
               option="-net", applies=lambda v: v.startswith("tap"), rewrite=_net_tap),
    LegacyForm("-drive file=IMG,if=virtio",
               "-blockdev driver=file,filename=IMG,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 "
               "-device virtio-blk-pci,drive=d0",
               "accepted", "QEMU 2.9", "-drive still works; -blockdev is the modern, explicit form",
               option="-drive", applies=lambda v: "if=virtio" in v, rewrite=_drive_virtio),
    LegacyForm("-device pci-assign,host=BDF", "-device vfio-pci,host=BDF", "removed", "QEMU 2.12",
               "legacy KVM device assignment is gone from QEMU and Linux (KVM_ASSIGN_PCI_DEVICE removed in 4.12); "
               "VFIO replaces it", option="-device", applies=lambda v: v.startswith("pci-assign"),
               rewrite=lambda v, used: ["-device", "vfio-pci" + v[len("pci-assign"):]]),
    LegacyForm("echo VENDOR DEVICE > /sys/bus/pci/drivers/pci-stub/new_id",
               "echo vfio-pci > /sys/bus/pci/devices/BDF/driver_override; echo BDF > /sys/bus/pci/drivers_probe",
               "accepted", "Linux 3.16", "pci-stub still exists but cannot hand a device to QEMU; vfio-pci binds "
               "per device with driver_override"),
    LegacyForm("migrate -b tcp:HOST:PORT", "blockdev-mirror to an NBD export on the destination, then migrate",
               "removed", "QEMU 9.1", "block migration (-b/-i) was deprecated in 8.2"),
    LegacyForm("-incoming tcp:0:6666", "-incoming tcp:ADDRESS:6666", "accepted", "QEMU 0.12",
               "tcp:0 listens on every address; bind the migration listener to one address",
               option="-incoming", applies=lambda v: v.startswith("tcp:0:"),
               rewrite=lambda v, used: ["-incoming", "tcp:127.0.0.1:" + v.split(":", 2)[2]]),
    LegacyForm("qemu-kvm ... (or -enable-kvm)", "qemu-system-x86_64 -accel kvm", "accepted", "QEMU 1.3",
               "qemu-kvm was merged into QEMU; -enable-kvm is an alias of -accel kvm",
               option="-enable-kvm", takes_value=False, rewrite=lambda v, used: ["-accel", "kvm"]),
)


def translate_legacy(argv: list[str]) -> tuple[list[str], list[LegacyForm]]:
    """Rewrite the handbook's legacy options in ``argv`` to modern ones, each by its own row.

    Returns the new argv and the rows that applied. Options that are still accepted
    verbatim are rewritten too, so the suites always exercise the modern form.
    """
    out: list[str] = []
    used_rows: list[LegacyForm] = []
    names: Counter[str] = Counter()
    i = 0
    while i < len(argv):
        opt = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        row = next((r for r in LEGACY_FORMS if r.option == opt and r.rewrite is not None
                    and (not r.takes_value or r.applies(value))), None)
        if row is None:
            out.append(opt)
            i += 1
            continue
        out += row.rewrite(value if row.takes_value else "", names)
        used_rows.append(row)
        i += 2 if row.takes_value else 1
    return out, used_rows


def form(legacy: str) -> LegacyForm:
    """The table row whose legacy form starts with ``legacy``."""
    for row in LEGACY_FORMS:
        if row.legacy.startswith(legacy):
            return row
    raise KeyError(f"no handbook form {legacy!r} in LEGACY_FORMS")


def describe(row: LegacyForm) -> str:
    return f"handbook: {row.legacy} -> today: {row.modern} ({row.status} since {row.since}; {row.note})"


# --------------------------------------------------------------------------- the host's own schema

def command_arguments(host: Host, workdir: str, command: str) -> set[str]:
    """The argument names the host's QEMU accepts for a QMP command (from its schema)."""
    with NoGuestQemu(host, workdir) as monitor:
        schema = monitor.cmd("query-qmp-schema")
    by_name = {entry["name"]: entry for entry in schema}
    entry = by_name.get(command)
    if entry is None:
        return set()
    return {m["name"] for m in by_name[entry["arg-type"]].get("members", [])}
