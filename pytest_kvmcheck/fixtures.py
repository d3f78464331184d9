"""Fixtures the suites use: the host under test, its peer, its capabilities, and the VM factory.

``kvm_host`` is parametrized over every ``--kvm-hosts`` entry (test ids carry the host
name). Every VM a test touches comes from a :class:`VMFactory`, which owns it: built (not
started), booted, made a migration destination on the peer, or adopted; all destroyed at
the factory's end unless ``--kvm-keep-failed`` kept one for a human. ``boot_vm`` is the
test's own factory; :func:`vm_fixture` boots one guest per module and host and shares it.
The factory records on the test item every VM the test used: reports attach their argv,
QMP transcript and console from there.
"""
from __future__ import annotations

import contextlib

import pytest

from .errors import HostError, KvmCheckError, again
from .hosts.capabilities import Capabilities
from .machines import MachineHold
from .qemu.migration import destination_spec, listen
from .qemu.spec import VMSpec
from .qemu.vm import VM
from .record import record_metric
from .run import RUN_KEY, KvmRun, PreparedHost

TEST_VMS = pytest.StashKey[list]()  # on a test item: the VMs it used, for its report
ROUND_TRIPS_TAKEN = pytest.StashKey[bool]()  # on a test item: its guest command round trips are measured
MIGRATION_FIXTURES = {"kvm_peer", "kvm_other_qemu"}  # a test using one may move a guest to another host
MACHINE_HOLD = pytest.StashKey[MachineHold]()  # on the config: the running test's machines (plugin.py)


@pytest.fixture(scope="session")
def kvm_run(request: pytest.FixtureRequest) -> KvmRun:
    return request.config.stash[RUN_KEY]


@pytest.fixture(scope="session")
def kvm_host(request: pytest.FixtureRequest, kvm_run: KvmRun) -> PreparedHost:
    """The host under test (the plugin parametrizes this over ``--kvm-hosts``).

    A host that cannot be prepared raises its :class:`HostError`: the test's ERROR."""
    return kvm_run.host(request.param)


@pytest.fixture(scope="session")
def kvm_peer(kvm_host: PreparedHost, kvm_run: KvmRun) -> PreparedHost:
    """Where ``kvm_host``'s guests migrate to: the next host given, or the same host if alone."""
    try:
        return kvm_run.peer(kvm_host.name)
    except KvmCheckError as exc:
        raise HostError(f"host {kvm_host.name}: its migration peer is unusable: {exc}") from None


@pytest.fixture(scope="session")
def kvm_other_qemu(kvm_host: PreparedHost, kvm_run: KvmRun) -> PreparedHost:
    """``kvm_host`` with the second QEMU its spec offers (other_qemu=): version skew on one
    machine, as a fleet mid-upgrade has it. Tests using it declare ``kvm_requires("other-qemu")``."""
    try:
        return kvm_run.other_qemu(kvm_host.name)
    except KvmCheckError as exc:
        raise HostError(f"host {kvm_host.name}: its other QEMU is unusable: {exc}") from None


@pytest.fixture(scope="session")
def kvm_caps(kvm_host: PreparedHost) -> Capabilities:
    return kvm_host.caps


@pytest.fixture(scope="session")
def kvm_alone(request: pytest.FixtureRequest):
    """``with kvm_alone():`` a speed measurement runs alone on the machines the running test's
    hosts run on: the tests running there end first, none starts there until it ends
    (machines.py). Session-scoped, so a module's fixture that measures can use it too."""
    def alone():
        held = request.config.stash.get(MACHINE_HOLD, None)
        return held.alone() if held is not None else contextlib.nullcontext(0.0)  # not a kvmcheck test
    return alone


@pytest.fixture
def kvm_metric(request: pytest.FixtureRequest):
    """``kvm_metric(name, samples, unit, direction="lower", scope="test")``: a measured number (or
    several samples of it) for run.json, compared across runs by ``kvmcheck compare``;
    ``direction`` says which way is better; ``scope="host"`` pools samples of all tests per host."""
    def metric(name: str, samples, unit: str, direction: str = "lower", scope: str = "test") -> None:
        record_metric(request.node, name, samples, unit, direction, scope)
    return metric


@pytest.fixture
def kvm_note(request: pytest.FixtureRequest):
    """``kvm_note(key, text)``: a note for every report (HTML/Allure attachment, JUnit property).

    Unlike ``record_property`` it does not warn under the default JUnit family (xunit2).
    """
    def note(key: str, value) -> None:
        request.node.user_properties.append((key, str(value)))
    return note


ROUND_TRIPS = 5


def booted(item: pytest.Item | None, vm: VM) -> VM:
    """Record on the test that booted it the VM's boot to ready and, for its first guest, a few
    guest command round trips (host-wide metrics: every boot of the run is a sample; a test
    that boots many guests pays for the round trips once)."""
    if item is None or vm.boot_seconds is None:
        return vm
    record_metric(item, "boot_to_ready", vm.boot_seconds, "s", "lower", scope="host")
    if item.stash.get(ROUND_TRIPS_TAKEN, False):
        return vm
    item.stash[ROUND_TRIPS_TAKEN] = True
    try:
        vm.run(["true"])  # the session's first command opens it: not a round trip
        trips = [vm.run(["true"]).duration * 1000 for _ in range(ROUND_TRIPS)]
    except KvmCheckError:
        return vm  # the test will meet the guest's trouble itself, in its own words
    record_metric(item, "guest_command_round_trip", trips, "ms", "lower", scope="host")
    return vm


def used_by(item: pytest.Item, vm: VM) -> VM:
    """Record that the test ``item`` used ``vm`` (its report shows the VM's artifacts)."""
    vms = item.stash.setdefault(TEST_VMS, [])
    if vm not in vms:
        vms.append(vm)
    return vm


class VMFactory:
    """Every VM of one scope (a test, or a module's shared guests), destroyed at its end.

    ``factory(spec)`` boots one; :meth:`build` makes one without starting it; :meth:`many`
    boots several at once; :meth:`destination` starts one on a peer, listening for a
    migration of a source; :meth:`successor` builds one to take a source over by other means
    (``-loadvm``, ``-incoming exec:``); :meth:`adopt` takes one made elsewhere.
    """

    def __init__(self, kvm_run: KvmRun, kvm_host: PreparedHost, config: pytest.Config,
                 item: pytest.Item | None = None):
        self.kvm_run, self.kvm_host, self.config, self.item = kvm_run, kvm_host, config, item
        # A test with no second host (a peer, another QEMU) never migrates its guests away:
        # they live in the host's scratch dir, where it has one. A module's guests stay too.
        self.stays = item is None or not MIGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
        self.vms: list[VM] = []
        self.shared: dict[str, VM | BaseException] = {}  # a module's guests by mode (vm_fixture)

    # ---------------------------------------------------------------- making VMs
    def build(self, spec: VMSpec = VMSpec(), on: PreparedHost | None = None, boot_disk: str = "",
              mode: str = "") -> VM:
        """A VM of ``spec`` on ``on`` (default: the host under test), owned here, not started."""
        vm = self.kvm_run.new_vm((on or self.kvm_host).name, spec, boot_disk=boot_disk, mode=mode, stays=self.stays)
        return self.adopt(vm)

    def start(self, vm: VM) -> VM:
        """Launch a built VM's QEMU (it returns once QEMU daemonized; the guest may still boot)."""
        vm.start()
        self.config.hook.pytest_kvmcheck_vm_started(vm=vm)
        return vm

    def __call__(self, spec: VMSpec = VMSpec(), timeout: float | None = None, on: PreparedHost | None = None,
                 mode: str = "") -> VM:
        """A VM of ``spec`` booted until its guest is ready (a guest that does not boot: ERROR)."""
        vm = self.build(spec, on, mode=mode)
        try:
            return booted(self.item, self.start(vm).wait_ready(timeout))
        except BaseException:
            vm.stop()  # its console and stderr stay for the report; its files go with the factory
            raise

    def many(self, spec: VMSpec, count: int, timeout: float | None = None) -> list[VM]:
        """``count`` guests of one spec, started together and then awaited: their boots overlap."""
        vms = [self.start(self.build(spec)) for _ in range(count)]
        for vm in vms:
            booted(self.item, vm.wait_ready(timeout))
        return vms

    def successor(self, source: VM, on: PreparedHost, *extra_args: str, disk_paths: tuple[str, ...] | None = None,
                  **changes) -> VM:
        """A VM built to take ``source`` over: its spec, MACs and images (see
        :func:`~.qemu.migration.destination_spec`), on ``on``; not started."""
        spec = destination_spec(source, disk_paths, extra_args, **changes)
        return self.build(spec, on, boot_disk=source.boot_disk, mode=source.mode)

    def destination(self, source: VM, on: PreparedHost, capabilities: tuple[str, ...] = (),
                    disk_paths: tuple[str, ...] | None = None, **changes) -> tuple[VM, str]:
        """The destination QEMU for ``source`` on ``on``, listening on that host's migration
        address (never every interface) with ``capabilities`` set; returns it and the URI."""
        dest = self.start(self.successor(source, on, "-incoming", "defer", disk_paths=disk_paths, **changes))
        return dest, listen(dest, on.spec.migration_address, capabilities)

    def adopt(self, vm: VM) -> VM:
        """Own ``vm``: destroyed with the rest, and shown in the test's report."""
        self.vms.append(vm)
        if self.item is not None:
            used_by(self.item, vm)
        return vm

    # ---------------------------------------------------------------- the end
    def release(self) -> None:
        """Stop and remove every VM, unless it was kept for a human."""
        errors = []
        # Every QEMU first, then the files: a destination on another host may hold an image in
        # its source's dir open, and on NFS a file open elsewhere keeps that dir from going.
        for stage in ("stop", "destroy"):
            for vm in self.vms:
                if vm.kept:
                    continue
                try:
                    getattr(vm, stage)()
                except KvmCheckError as exc:  # the host went away: the run's end removes what is left
                    errors.append(f"{vm.name}: {exc}")
        self.vms.clear()
        if errors:
            raise HostError("could not remove VMs: " + "; ".join(errors))


@pytest.fixture
def boot_vm(request: pytest.FixtureRequest, kvm_run: KvmRun, kvm_host: PreparedHost):
    """The test's own VM factory: ``boot_vm(VMSpec(...))``; every VM it made is gone after the test."""
    factory = VMFactory(kvm_run, kvm_host, request.config, request.node)
    yield factory
    factory.release()


@pytest.fixture(scope="module")
def kvm_module_vms(request: pytest.FixtureRequest, kvm_run: KvmRun, kvm_host: PreparedHost):
    """The factory of a module's shared guests (:func:`vm_fixture`), per host, released with the module."""
    factory = VMFactory(kvm_run, kvm_host, request.config)
    yield factory
    factory.release()


def vm_fixture(spec, name: str | None = None):
    """A fixture booting one guest per module and host, shared by the module's tests.

    ``spec`` is a :class:`VMSpec`, or a function of the host's :class:`Capabilities` that
    returns one (a guest with a device only where the host has it), or a dict of mode name ->
    VMSpec (or ``pytest.param(VMSpec, marks=...)``) to run the tests once per mode; ``vm.mode``
    says which. Each mode's guest boots when a test first needs it and lives until the module
    ends. Usage in a suite: ``balloon_guest = vm_fixture(VMSpec(balloon=True))``.
    """
    single = isinstance(spec, VMSpec) or callable(spec)
    specs = {"": spec} if single else spec
    params = [pytest.param(mode, id=mode) if isinstance(value, VMSpec) or callable(value)
              else pytest.param(mode, marks=value.marks, id=mode) for mode, value in specs.items()]

    def shared_vm(request: pytest.FixtureRequest, kvm_module_vms: VMFactory) -> VM:
        mode = getattr(request, "param", "")
        vm = kvm_module_vms.shared.get(mode)
        if vm is None:
            value = specs[mode]
            try:
                if callable(value):
                    value = value(kvm_module_vms.kvm_host.caps)
                vm = booted(request.node, kvm_module_vms(value if isinstance(value, VMSpec) else value.values[0],
                                                         mode=mode))
            except KvmCheckError as exc:  # the module's other tests get the same error, without booting again
                kvm_module_vms.shared[mode] = exc
                raise
            kvm_module_vms.shared[mode] = vm
        if isinstance(vm, BaseException):
            raise again(vm) from None
        return used_by(request.node, vm)
    if single:
        return pytest.fixture(name=name)(shared_vm) if name else pytest.fixture(shared_vm)
    return pytest.fixture(params=params, name=name)(shared_vm) if name else pytest.fixture(params=params)(shared_vm)


def vms_of(item: pytest.Item) -> list[VM]:
    """The VMs the test used, as the factories recorded them."""
    return list(item.stash.get(TEST_VMS, []))
