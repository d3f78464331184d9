"""The pytest plugin: options, the ``kvm_requires`` marker, host parametrization and hooks.

Only wiring lives here. Host specs are parsed in :mod:`.hostspec`, hosts prepared in
:mod:`.session`, VMs run by :mod:`.vm`, reports made in :mod:`.reporting`, and the
fixtures tests use are in :mod:`.fixtures`.
"""
from __future__ import annotations


import pytest

from . import reporting, verdicts
from .capabilities import Capabilities, unmet
from .cloudimage import CloudImage, CloudImageError
from .errors import HostSpecError, KvmCheckError
from .fixtures import *  # noqa: F401,F403 - registers the fixtures with pytest
from .fixtures import vms_of
from .hostspec import ACCELS, parse_hosts
from .session import RUN_KEY, KvmRun, worker_id
VERDICTS_KEY = pytest.StashKey[verdicts.Verdicts]()
SUMMARY_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmcheck", "KVM/QEMU host conformance (pytest-kvmcheck)")
    options = [
        ("--kvm-hosts", "kvm_hosts", "local",
         "hosts to qualify: comma list of 'local', 'ssh://user@host[:port][?key=..&qemu=..&workdir=..]', "
         "'@inventory.toml' (default: local)"),
        ("--kvm-guest", "kvm_guest", "tiny", "guest: 'tiny' (kernel + busybox initramfs, built on first use) or "
         "the path of a qcow2 cloud image (booted with a cloud-init NoCloud seed carrying the run's key)"),
        ("--kvm-accel", "kvm_accel", "auto", "accelerator: auto (KVM if a guest really runs under it, else TCG), kvm, tcg"),
        ("--kvm-artifacts", "kvm_artifacts", "", "also write each test's QEMU argv, QMP transcript and console here"),
    ]
    for flag, ini, default, help_text in options:
        group.addoption(flag, dest=ini, default=None, help=help_text)
        parser.addini(ini, help=help_text, default=default)
    group.addoption("--kvm-keep-failed", dest="kvm_keep_failed", action="store_true", default=None,
                    help="leave a failed test's VM running and print how to reach it")
    parser.addini("kvm_keep_failed", type="bool", default=False, help="as --kvm-keep-failed")
    parser.addini("kvm_max_downtime_ms", default="2000", help="live migration downtime bound (ms), default 2000")


def setting(config: pytest.Config, name: str):
    value = config.getoption(name)
    return config.getini(name) if value is None else value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvm_requires(*needs): the test needs these host capabilities (kvm, vhost-net, tap, bridge, iommu, "
        "sriov, ksm, nested, device:NAME, machine:NAME, memory:MIB, qemu>=X.Y); unmet needs skip the test "
        "with a reason naming the host and the capability")
    accel = setting(config, "kvm_accel")
    if accel not in ACCELS:
        raise pytest.UsageError(f"--kvm-accel: {accel!r} is not one of {', '.join(ACCELS)}")
    guest = setting(config, "kvm_guest")
    if guest != "tiny":
        try:
            guest = str(CloudImage.open(guest).path)
        except CloudImageError as exc:
            raise pytest.UsageError(f"--kvm-guest: {exc}") from None
    try:
        specs = parse_hosts(setting(config, "kvm_hosts"))
    except HostSpecError as exc:
        raise pytest.UsageError(f"--kvm-hosts: {exc}") from None
    workerinput = getattr(config, "workerinput", None)

    def progress(msg: str) -> None:  # the terminal reporter registers after us: look it up late
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"kvmcheck: {msg}")
    if workerinput is not None:
        run = KvmRun.attach(specs, workerinput["kvmcheck_state"], worker_id())
        run.progress = progress
    else:
        run = KvmRun.create(specs, accel, progress=progress, guest=guest)
    config.stash[RUN_KEY] = run
    collector = config.stash[VERDICTS_KEY] = verdicts.Verdicts()
    # On the controller, pytest_runtest_logreport sees every worker's reports too.
    config.pluginmanager.register(collector, "kvmcheck-verdicts")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: hand the run's state dir (key, prepared hosts) to each worker."""
    node.workerinput["kvmcheck_state"] = str(node.config.stash[RUN_KEY].state_dir)


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = config.stash[RUN_KEY]
    return [f"kvmcheck: run {run.run_id}, accel {run.accel}, guest {run.guest}"] + [
        f"kvmcheck host {spec.name}: {spec.url} (qemu {spec.qemu}"
        f"{', accel ' + spec.accel if spec.accel else ''}{', tags ' + '+'.join(spec.tags) if spec.tags else ''})"
        for spec in run.specs.values()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvm_host" in metafunc.fixturenames:
        names = list(metafunc.config.stash[RUN_KEY].specs)
        metafunc.parametrize("kvm_host", names, indirect=True, scope="session", ids=names)


def _host_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("kvm_host") if callspec else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Prepare the item's host and skip it, with the reason, if the host lacks a need."""
    name = _host_of(item)
    if name is None:
        return
    item.user_properties.append(("kvm_host", name))
    run = item.config.stash[RUN_KEY]
    caps = run.host(name).caps  # a host that cannot be prepared: its HostError is the test's ERROR
    item.user_properties += [("qemu", caps.qemu_version_text), ("accel", caps.accel)]
    needs = [need for marker in item.iter_markers("kvm_requires") for need in marker.args]
    reasons = unmet(caps, needs)  # an unknown need is the suite's bug: its ValueError reads as BROKEN
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    final = verdicts.record(item, report, call.excinfo)
    if report.when == "teardown":
        reporting.label_verdict(item, final)
    if report.when != "call":
        return
    vms = vms_of(item)
    name = _host_of(item)
    if not vms and name is None:
        return
    # Notes the test recorded (kvm_note): what the handbook's command means today, migration numbers.
    texts: dict[str, str] = {key: value for key, value in item.user_properties
                             if key not in ("kvm_host", "qemu", "accel")}
    run = item.config.stash[RUN_KEY]
    if name is not None:
        try:
            texts["host capabilities"] = f"host {name}: {run.host(name).caps.summary()}"
        except KvmCheckError:
            pass
    for vm in vms:
        prefix = f"{vm.name}: " if len(vms) > 1 else ""
        for key, text in vm.artifacts().items():
            texts[prefix + key] = text
        if report.failed:
            vm.failed = True
            if vm.alive() and not vm._stopped:
                try:
                    texts[prefix + "guest dmesg"] = vm.run("dmesg", timeout=10).stdout
                except KvmCheckError as exc:
                    texts[prefix + "guest dmesg"] = f"(could not read: {exc})"
                if setting(item.config, "kvm_keep_failed"):
                    report.sections.append(("kvmcheck: VM kept running", vm.keep()))
    reporting.attach(item, report, texts)
    artifacts = setting(item.config, "kvm_artifacts")
    if artifacts:
        reporting.write_artifacts(artifacts, item.nodeid, texts)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    run = config.stash[RUN_KEY]
    if hasattr(config, "workerinput"):
        run.close()
        return
    rows = reporting.environment_rows(run.prepared_states())
    reporting.add_html_environment(config, rows)
    if getattr(config.option, "allure_report_dir", None) and rows:
        reporting.write_allure_environment(config.option.allure_report_dir, rows)
    summary = []
    for name, state in run.prepared_states().items():
        summary += [f"host {name}: {note}" for note in state.get("notes", [])]
        if "caps" in state:
            summary.append(f"host {name}: {Capabilities.from_dict(state['caps']).summary()}")
    config.stash[SUMMARY_KEY] = summary + run.finish()
    reporting.add_junit_verdict_counts(config, config.stash[VERDICTS_KEY].totals())
    if getattr(config.option, "allure_report_dir", None):
        verdicts.retag_allure_results(config.option.allure_report_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Runs that end before a session (--help, usage errors) still leave nothing behind."""
    run = config.stash.get(RUN_KEY, None)
    if run is not None and not hasattr(config, "workerinput") and not run.finished:
        run.finish()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    collected = config.stash[VERDICTS_KEY]
    lines = collected.lines()
    if lines:
        terminalreporter.section("kvmcheck verdicts per host and feature")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"kvmcheck verdicts: {collected.summary()}")
    for line in config.stash.get(SUMMARY_KEY, []):
        terminalreporter.write_line(f"kvmcheck: {line}")


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_table_header(cells: list) -> None:
    cells.insert(1, '<th class="sortable" data-column-type="kvm-verdict">Verdict</th>')


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_table_row(report, cells: list) -> None:
    cells.insert(1, f'<td class="col-kvm-verdict">{verdicts.of(report) or ""}</td>')


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix: list, summary: list, postfix: list, session) -> None:
    collected = session.config.stash.get(VERDICTS_KEY, None)
    if collected is not None and collected.tests:
        prefix.append(reporting.html_verdict_summary(collected))
