"""The pytest plugin: options, the ``kvm_requires`` marker, host parametrization and hooks.

Only wiring lives here. Host specs are parsed in :mod:`.hosts.spec`, hosts prepared in
:mod:`.run`, VMs made by the factory in :mod:`.fixtures`, verdicts decided in
:mod:`.verdicts`, reports made in :mod:`.reporting`. Nothing heavy happens unless a test
needs a host: ``--help``, ``--collect-only`` and runs of other tests make no state and no key.
"""
from __future__ import annotations

import inspect
from collections import Counter
import logging

import pytest

from . import hookspecs, reporting, spread, verdicts
from .errors import HostSpecError, KvmCheckError
from .fixtures import *  # noqa: F401,F403 - registers the fixtures with pytest
from .fixtures import MACHINE_HOLD, vms_of
from .hosts.capabilities import Capabilities, check_need_names
from .hosts.spec import ACCELS, parse_hosts
from .images.cloud import CloudImage, CloudImageError
from .compare import compare, parse_pairs, render_html, render_text
from .matrix import report_head
from .record import NOT_NOTES, WAIT_PROPERTY, RunRecorder, bare_test_id, load, met_needs
from .run import RUN_KEY, KvmRun, worker_id

log = logging.getLogger(__name__)
VERDICTS_KEY = pytest.StashKey[verdicts.Verdicts]()
SUMMARY_KEY = pytest.StashKey[list]()
SPREAD_KEY = pytest.StashKey[dict]()
RECORD_KEY = pytest.StashKey[RunRecorder]()
DOCUMENT_KEY = pytest.StashKey[dict]()
DEFAULT_TIMEOUT_S = 900  # a hung guest or host never hangs a run (pytest-timeout; --timeout overrides)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmcheck", "KVM/QEMU host conformance (pytest-kvmcheck)")
    options = [
        ("--kvm-hosts", "kvm_hosts", "local",
         "hosts to qualify: comma list of 'local', 'ssh://user@host[:port][?key=..&qemu=..&workdir=..]', "
         "'@inventory.toml', 'lab' (default: local)"),
        ("--kvm-guest", "kvm_guest", "tiny", "guest: 'tiny' (kernel + busybox initramfs, built on first use) or "
         "the path of a qcow2 cloud image (booted with a cloud-init NoCloud seed carrying the run's key)"),
        ("--kvm-accel", "kvm_accel", "auto", "accelerator: auto (KVM if a guest really runs under it, else TCG), kvm, tcg"),
        ("--kvm-artifacts", "kvm_artifacts", "", "also write each test's QEMU argv, QMP transcript and console here"),
        ("--kvm-log-level", "kvm_log_level", "INFO", "level of kvmcheck's own log (QMP, SSH, VM lifecycle) captured "
         "per test and shown on failure: DEBUG shows every QMP message"),
    ]
    for flag, ini, default, help_text in options:
        group.addoption(flag, dest=ini, default=None, help=help_text)
        parser.addini(ini, help=help_text, default=default)
    group.addoption("--kvm-keep-failed", dest="kvm_keep_failed", action="store_true", default=None,
                    help="leave a failed test's VM running and print how to reach it")
    parser.addini("kvm_keep_failed", type="bool", default=False, help="as --kvm-keep-failed")
    group.addoption("--kvm-spread", dest="kvm_spread", action="store_true", default=None,
                    help="hosts of one fingerprint split the host-local features between them, each feature on "
                    "one of them, and alike pairs split their moves (each still between two different hosts); "
                    "the report says who stood for whom")
    parser.addini("kvm_spread", type="bool", default=False, help="as --kvm-spread")
    group.addoption("--kvm-durations", dest="kvm_durations", default=None,
                    help="with --kvm-spread, weigh each test by its seconds in this earlier run's record (its "
                    "run.json, or its report dir) instead of counting tests, so that alike hosts finish together")
    parser.addini("kvm_durations", default="", help="as --kvm-durations")
    parser.addini("kvm_max_downtime_ms", default="2000", help="live migration downtime bound (ms), default 2000")
    for flag, ini, default, help_text in [
        ("--kvm-record", "kvm_record", "reports/run.json", "where the run record goes (run.json: verdicts, reasons, "
         "metrics, host fingerprints; what 'kvmcheck compare' reads); '' for none"),
        ("--kvm-baseline", "kvm_baseline", "", "a baseline run.json (or report dir): compare this run with it at "
         "the end (reports/compare.html); any regression makes the run fail"),
        ("--kvm-host-map", "kvm_host_map", "", "OLD=NEW,...: the baseline's host names as this run calls them")]:
        group.addoption(flag, dest=ini, default=None, help=help_text)
        parser.addini(ini, help=help_text, default=default)
    parser.addini("kvm_metric_thresholds", type="linelist", default=[],
                  help="NAME=FRACTION lines: a metric's noise threshold for the baseline comparison (default 0.05)")
    parser.addini("kvm_timeout", default=str(DEFAULT_TIMEOUT_S),
                  help=f"seconds a kvmcheck test may take before it is stopped as ERROR (default {DEFAULT_TIMEOUT_S}; "
                       "pytest-timeout's --timeout overrides it)")


def setting(config: pytest.Config, name: str):
    value = config.getoption(name)
    return config.getini(name) if value is None else value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kvm_requires(*needs, on='host'): the test needs these capabilities of the host under test "
        "(on='peer': of its migration peer; see pytest_kvmcheck.hosts.capabilities.NEEDS); an unmet need skips "
        "the test, before any VM boots, with a reason naming the host and the capability")
    config.addinivalue_line(
        "markers", "kvm_changes_host(what): the test changes host-wide state (KSM knobs, sriov_numvfs, driver "
        "bindings); it runs only where the host's spec allows it (allow_host_changes) and skips elsewhere")
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
        for spec in specs:
            check_need_names(spec.expect)
    except HostSpecError as exc:
        raise pytest.UsageError(f"--kvm-hosts: {exc}") from None
    except ValueError as exc:
        raise pytest.UsageError(f"--kvm-hosts: host {spec.name}: expect: {exc}") from None
    level = str(setting(config, "kvm_log_level")).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise pytest.UsageError(f"--kvm-log-level: {level!r} is not a logging level")
    logging.getLogger("pytest_kvmcheck").setLevel(level)
    config.pluginmanager.register(reporting.HtmlRows(), "kvmcheck-html-rows")

    def progress(msg: str) -> None:  # the terminal reporter registers after us: look it up late
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"kvmcheck: {msg}")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        run = KvmRun.attach(specs, workerinput["kvmcheck_run"], worker_id())
    else:
        run = KvmRun.create(specs, accel, guest=guest)
    run.progress = progress
    run.on_host_prepared = lambda host: config.hook.pytest_kvmcheck_host_prepared(host=host)
    config.stash[RUN_KEY] = run
    collector = config.stash[VERDICTS_KEY] = verdicts.Verdicts()
    # On the controller, pytest_runtest_logreport sees every worker's reports too.
    config.pluginmanager.register(collector, "kvmcheck-verdicts")
    if workerinput is None:
        config.pluginmanager.register(config.stash.setdefault(RECORD_KEY, RunRecorder()), "kvmcheck-record")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: hand the run (its id, the name of its state dir) to each worker."""
    node.workerinput["kvmcheck_run"] = node.config.stash[RUN_KEY].describe()


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = config.stash[RUN_KEY]
    return [f"kvmcheck: run {run.run_id}, accel {run.accel}, guest {run.guest}"] + [
        f"kvmcheck host {spec.name}: {spec.url} (qemu {spec.qemu or 'found on the host'}"
        f"{', accel ' + spec.accel if spec.accel else ''}{', tags ' + '+'.join(spec.tags) if spec.tags else ''})"
        for spec in run.specs.values()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvm_host" in metafunc.fixturenames:
        needs = {need for marker in metafunc.definition.iter_markers("kvm_requires") for need in marker.args}
        # A host kept for some tests alone (only=, a host that gets power-cycled) takes no other.
        names = [name for name, spec in metafunc.config.stash[RUN_KEY].specs.items()
                 if not spec.only or needs & set(spec.only)]
        metafunc.parametrize("kvm_host", names, indirect=True, scope="session", ids=names)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadscope`` over several hosts groups by host and module (schedule.py)."""
    if config.getoption("dist", None) != "loadscope" or RUN_KEY not in config.stash:
        return None
    hosts = list(config.stash[RUN_KEY].specs)
    if len(hosts) < 2:
        return None
    from .schedule import HostModuleScheduling
    return HostModuleScheduling(config, log, hosts)


def _host_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("kvm_host") if callspec else None


def description(item: pytest.Item) -> str:
    """The test's docstring: the handbook step it checks, and why."""
    function = getattr(item, "function", None)
    return inspect.cleandoc(function.__doc__) if function is not None and function.__doc__ else ""


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each kvmcheck test gets the default time limit (unless one is set) and its docstring as
    description; with --kvm-spread, identical hosts' host-local tests are split between them."""
    if setting(config, "kvm_spread"):
        spread_items(config, items)
    limit = None
    if config.pluginmanager.hasplugin("timeout") and not config.getoption("timeout", None) \
            and not config.getini("timeout"):
        limit = float(config.getini("kvm_timeout"))
    for item in items:
        if _host_of(item) is None:
            continue
        if limit and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
        text = description(item)
        if text:
            item.user_properties.append(("description", text))
        reporting.allure_labels(item, _host_of(item), text)


def _has_peer(item: pytest.Item) -> bool:
    return "kvm_peer" in getattr(item, "fixturenames", ()) or any(
        m.kwargs.get("on") == "peer" for m in item.iter_markers("kvm_requires"))


def _earlier_record(config: pytest.Config) -> dict | None:
    """--kvm-durations' run record (None when not given)."""
    path = setting(config, "kvm_durations")
    if not path:
        return None
    try:
        return load(path)
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"--kvm-durations: {exc}") from None


def spread_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--kvm-spread: deselect the tests another host of the same fingerprint runs (spread.py).

    The hosts are prepared here, during collection, to read their fingerprints; a host that
    cannot be prepared is in no group (its tests end as ERROR, as without --kvm-spread)."""
    run = config.stash[RUN_KEY]
    run.prepare_all(name for name, spec in run.specs.items() if not spec.only)
    keys = {}
    for name, spec in run.specs.items():
        if spec.only:  # kept for some tests alone: it stands for no one
            continue
        try:
            caps = run.host(name).caps.to_dict()
        except KvmCheckError:
            keys[name] = None
            continue
        keys[name] = spread.group_key({"caps": caps}, spec.expect, met_needs(caps))
    if not spread.groups(keys):
        return
    peers = {}
    for name in keys:
        try:
            peers[name] = run.peer(name).name
        except KvmCheckError:
            peers[name] = name  # an unusable peer: its moves are not spread
    durations = spread.Durations(_earlier_record(config))
    units, weights = {}, Counter()
    for item in items:
        host = _host_of(item)
        if host is None:
            continue
        move = ""
        if _has_peer(item):
            move = bare_test_id(f"{getattr(item, 'originalname', item.name)}[{item.callspec.id}]", host)
        feature = verdicts.feature_of(item.nodeid)
        units[item.nodeid] = unit = (spread.unit(feature, move), host)
        weights[unit] += durations.of(feature, bare_test_id(item.nodeid, host))
    assignment = spread.assign(weights, keys, peers)
    keep, drop = [], []
    for item in items:
        unit = units.get(item.nodeid)
        (drop if unit and assignment.get(unit, unit[1]) != unit[1] else keep).append(item)
    run.write_spread(spread.stood_in_by(assignment))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Prepare the item's host and skip it, with the reason, if the host (or its peer) lacks a need."""
    name = _host_of(item)
    if name is None:
        return
    item.user_properties.append(("kvm_host", name))
    run = item.config.stash[RUN_KEY]
    # The machines its host and its migration peer run on, held shared until its teardown ends
    # (a measurement in it runs alone there: kvm_alone). Taken in the setup phase, so that a
    # wait cut short (pytest-timeout) is this test's ERROR, not an error that ends the worker.
    hold = run.machine_hold({name, run.peer_name(name)} if _has_peer(item) else {name})
    item.config.stash[MACHINE_HOLD] = hold.__enter__()  # one test at a time per process
    if hold.waited >= 0.1:
        item.user_properties.append((WAIT_PROPERTY, f"{hold.waited:.1f}"))  # not the test's own time (record.py)
    caps = run.host(name).caps  # a host that cannot be prepared: its HostError is the test's ERROR
    item.user_properties += [("qemu", caps.qemu_version_text), ("accel", caps.accel)]
    needs, peer_needs = [], []
    for marker in item.iter_markers("kvm_requires"):
        on = marker.kwargs.get("on", "host")
        if on not in ("host", "peer"):
            raise ValueError(f"kvm_requires(on={on!r}): on is 'host' or 'peer'")  # the suite's bug: BROKEN
        (peer_needs if on == "peer" else needs).extend(marker.args)
    if item.get_closest_marker("kvm_changes_host"):
        needs.append("allow_host_changes")
    missing = run.unmet(name, needs, peer_needs)  # an unknown need is the suite's bug: its ValueError reads as BROKEN
    expected = [m for m in missing if m.expected]
    if expected:  # a production host that lost what it must have is not "skipped"
        pytest.fail("; ".join(map(str, expected)), pytrace=False)
    if missing:
        pytest.skip("; ".join(map(str, missing)))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    """Let go of the machines the setup held, once the test's fixtures are torn down."""
    try:
        return (yield)
    finally:
        hold = item.config.stash.get(MACHINE_HOLD, None)
        if hold is not None:
            del item.config.stash[MACHINE_HOLD]
            hold.__exit__(None, None, None)


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
    texts: dict[str, str] = {key: value for key, value in item.user_properties if key not in NOT_NOTES}
    try:
        _gather_evidence(item, report, name, vms, texts)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the worker and its other tests go on
        # Raised here, outside the test's phases, it would end the xdist worker with an
        # INTERNALERROR and lose every test still queued on it; the verdict is the test's own.
        whose = ("the host did not answer" if isinstance(exc, (KvmCheckError, *verdicts.outside_errors()))
                 else "kvmcheck's own code raised (a bug)")
        log.error("%s: evidence not gathered: %s: %s: %s", item.nodeid, whose, type(exc).__name__, exc, exc_info=True)
        texts["kvmcheck: evidence not gathered"] = f"{whose}: {type(exc).__name__}: {exc}"
        report.sections.append(("kvmcheck: evidence not gathered", texts["kvmcheck: evidence not gathered"]))
    reporting.attach(item, report, texts)
    artifacts = setting(item.config, "kvm_artifacts")
    if artifacts:
        reporting.write_artifacts(artifacts, item.nodeid, texts)


def _gather_evidence(item: pytest.Item, report: pytest.TestReport, name: str | None, vms: list,
                     texts: dict[str, str]) -> None:
    """Into ``texts``: the host's capabilities and each VM's argv, QMP transcript, console and
    stderr, and, for a test that failed, its guests' dmesg (and the VM kept, if asked)."""
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
        if report.failed and vm.alive() and not vm.stopped:
            try:
                texts[prefix + "guest dmesg"] = vm.guest_dmesg()
            except KvmCheckError as exc:
                texts[prefix + "guest dmesg"] = f"(could not read: {exc})"
            if setting(item.config, "kvm_keep_failed"):
                report.sections.append(("kvmcheck: VM kept running", vm.keep()))


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
    states = run.prepared_states()
    stood = config.stash[SPREAD_KEY] = run.spread()
    summary += spread.summary_lines(stood)
    for name, state in states.items():
        summary += [f"host {name}: {note}" for note in state.get("notes", [])]
        if "caps" in state:
            summary.append(f"host {name}: {Capabilities.from_dict(state['caps']).summary()}")
        elif "error" in state:
            summary.append(f"host {name}: could not be prepared, so its tests ended as ERROR: {state['error']}")
    summary += write_record(session, run, states)
    config.stash[SUMMARY_KEY] = summary + run.finish()
    reporting.add_junit_verdict_counts(config, config.stash[VERDICTS_KEY].totals())
    if getattr(config.option, "allure_report_dir", None):
        verdicts.retag_allure_results(config.option.allure_report_dir)


def write_record(session: pytest.Session, run: KvmRun, states: dict) -> list[str]:
    """Write run.json if any kvmcheck test ran, and compare it with the baseline if one is given."""
    config = session.config
    recorder = config.stash.get(RECORD_KEY, None)
    if recorder is None or not recorder.tests:
        return []
    config.stash[DOCUMENT_KEY] = recorder.document(run, states, session.exitstatus)  # the reports read it
    target = setting(config, "kvm_record")
    if not target:
        return []
    path = config.invocation_params.dir / target
    document = config.stash[DOCUMENT_KEY]
    recorder.write(path, document)
    lines = [f"run record: {path}"]
    baseline = setting(config, "kvm_baseline")
    if baseline:
        try:
            thresholds = {k: float(v) for k, v in parse_pairs(config.getini("kvm_metric_thresholds"),
                                                               "kvm_metric_thresholds").items()}
            result = compare(load(config.invocation_params.dir / baseline), document,
                             parse_pairs(setting(config, "kvm_host_map"), "--kvm-host-map"), thresholds)
        except ValueError as exc:
            return lines + [f"baseline: {exc}"]
        html_path = path.with_name("compare.html")
        html_path.write_text(render_html(result))
        lines += render_text(result).splitlines() + [f"comparison: {html_path}"]
        if result.regressed and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return lines


def pytest_unconfigure(config: pytest.Config) -> None:
    """Runs that end before a session (--help, usage errors) still leave nothing behind."""
    run = config.stash.get(RUN_KEY, None)
    if run is not None and not hasattr(config, "workerinput") and not run.finished:
        run.finish()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    collected = config.stash[VERDICTS_KEY]
    lines = collected.lines(spread.by_feature(config.stash.get(SPREAD_KEY, {})))
    if lines:
        terminalreporter.section("kvmcheck verdicts per host and feature")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"kvmcheck verdicts: {collected.summary()}")
    for line in config.stash.get(SUMMARY_KEY, []):
        terminalreporter.write_line(f"kvmcheck: {line}")


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix: list, summary: list, postfix: list, session) -> None:
    document = session.config.stash.get(DOCUMENT_KEY, None)
    if document is not None and document["tests"]:
        prefix.append(report_head(document["tests"], document["hosts"]))
