"""Fixtures the suites use: the host under test, its capabilities, and booted guests.

``kvm_host`` is parametrized over every ``--kvm-hosts`` entry (test ids carry the host
name). Guests come from :func:`vm_fixture` (one VM per module and host, the fast path)
or from the ``boot_vm`` factory (VMs a single test owns). Either way the VM is stopped
and its files removed at teardown, unless ``--kvm-keep-failed`` kept it for a human.
"""
from __future__ import annotations

import pytest

from .capabilities import Capabilities
from .errors import HostError, KvmCheckError
from .session import RUN_KEY, KvmRun, PreparedHost
from .vm import VM
from .vmspec import VMSpec


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
def kvm_caps(kvm_host: PreparedHost) -> Capabilities:
    return kvm_host.caps


@pytest.fixture
def kvm_note(request: pytest.FixtureRequest):
    """``kvm_note(key, text)``: a note for every report (HTML/Allure attachment, JUnit property).

    Unlike ``record_property`` it does not warn under the default JUnit family (xunit2).
    """
    def note(key: str, value) -> None:
        request.node.user_properties.append((key, str(value)))
    return note


def boot(kvm_run: KvmRun, kvm_host: PreparedHost, spec: VMSpec, timeout: float | None = None) -> VM:
    """Boot ``spec`` on the host; a guest that does not boot raises its error (the test's ERROR)."""
    vm = kvm_run.new_vm(kvm_host.name, spec)
    try:
        return vm.boot(timeout)
    except BaseException:
        vm.destroy()
        raise


def release(vm: VM) -> None:
    """Teardown: stop and remove the VM, unless it was kept for a human."""
    if not vm.kept:
        vm.destroy()


class VMFactory:
    """``boot_vm(spec)``: VMs owned by one test, all released at its teardown."""

    def __init__(self, kvm_run: KvmRun, kvm_host: PreparedHost):
        self.kvm_run, self.kvm_host = kvm_run, kvm_host
        self.vms: list[VM] = []

    def __call__(self, spec: VMSpec = VMSpec(), timeout: float | None = None) -> VM:
        vm = boot(self.kvm_run, self.kvm_host, spec, timeout)
        self.vms.append(vm)
        return vm

    def many(self, spec: VMSpec, count: int, timeout: float | None = None) -> list[VM]:
        """``count`` guests of one spec, started together and then awaited: their boots overlap."""
        vms = [self.adopt(self.kvm_run.new_vm(self.kvm_host.name, spec)) for _ in range(count)]
        for vm in vms:
            vm.start()
        for vm in vms:
            vm.wait_ready(timeout)
        return vms

    def adopt(self, vm: VM) -> VM:
        """Own a VM started some other way (a migration destination): released like the rest."""
        self.vms.append(vm)
        return vm

    def release(self) -> None:
        for vm in self.vms:
            release(vm)


@pytest.fixture
def boot_vm(kvm_run: KvmRun, kvm_host: PreparedHost):
    factory = VMFactory(kvm_run, kvm_host)
    yield factory
    factory.release()


def vm_fixture(spec, scope: str = "module"):
    """A fixture booting one guest per host, shared by the tests of a module.

    ``spec`` is a :class:`VMSpec`, or a dict of mode name -> VMSpec (or ``pytest.param(VMSpec,
    marks=...)``) to run the module once per mode; the fixture's ``vm.mode`` says which.
    Usage in a suite: ``virtio_guest = vm_fixture(VMSpec(balloon=True))``.
    """
    if isinstance(spec, VMSpec):
        @pytest.fixture(scope=scope)
        def _vm(kvm_run: KvmRun, kvm_host: PreparedHost):
            vm = boot(kvm_run, kvm_host, spec)
            yield vm
            release(vm)
        return _vm
    params = [pytest.param((mode, value), id=mode) if isinstance(value, VMSpec)
              else pytest.param((mode, value.values[0]), marks=value.marks, id=mode)
              for mode, value in spec.items()]

    @pytest.fixture(scope=scope, params=params)
    def _vm_per_mode(request: pytest.FixtureRequest, kvm_run: KvmRun, kvm_host: PreparedHost):
        mode, vm_spec = request.param
        vm = boot(kvm_run, kvm_host, vm_spec)
        vm.mode = mode
        yield vm
        release(vm)
    return _vm_per_mode


def vms_of(item: pytest.Item) -> list[VM]:
    """The VMs a test used (directly, or through the ``boot_vm`` factory)."""
    vms: list[VM] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, VM):
            vms.append(value)
        elif isinstance(value, VMFactory):
            vms.extend(value.vms)
    return vms
