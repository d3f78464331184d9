"""Reports: attachments per test (HTML, Allure), JUnit properties, environment, verdicts.

Each test that used VMs carries the QEMU argv, QMP transcript, serial console and the
host's capability summary; a failed test also the guest's dmesg. Attachments go to
whichever reporters are active (pytest-html, allure-pytest); nothing here writes secrets:
the run's private key never leaves the local state dir.
"""
from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

import pytest

from . import verdicts
from .matrix import anchor
from .record import METRIC_PROPERTY


def attach(item: pytest.Item, report: pytest.TestReport, texts: dict[str, str]) -> None:
    """Add ``texts`` (name -> content) as attachments to every active reporter."""
    config = item.config
    if config.pluginmanager.hasplugin("html"):
        import pytest_html
        extras = getattr(report, "extras", [])
        for name, text in texts.items():
            extras.append(pytest_html.extras.text(text, name=name))
        report.extras = extras
    if getattr(config.option, "allure_report_dir", None):
        import allure
        for name, text in texts.items():
            allure.attach(text, name=name, attachment_type=allure.attachment_type.TEXT)


class HtmlRows:
    """pytest-html's results table: a Verdict column, anchored on the first row of each host x
    feature (where its matrix cell links to), and a Description column (the handbook step).
    One per run: the anchors already placed are this run's, not the process's."""

    def __init__(self) -> None:
        self.anchored: set[str] = set()

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_table_header(self, cells: list) -> None:
        cells.insert(1, '<th class="sortable" data-column-type="kvm-verdict">Verdict</th>')
        cells.insert(3, '<th data-column-type="kvm-description">Description</th>')

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_table_row(self, report, cells: list) -> None:
        cells.insert(1, f'<td class="col-kvm-verdict">{verdicts.of(report) or ""}{self.row_anchor(report)}</td>')
        cells.insert(3, f'<td class="col-kvm-description">{description_cell(report)}</td>')

    def row_anchor(self, report: pytest.TestReport) -> str:
        host = next((v for k, v in report.user_properties if k == "kvm_host"), None)
        if host is None:
            return ""
        name = anchor(host, verdicts.feature_of(report.nodeid))
        if name in self.anchored:
            return ""
        self.anchored.add(name)
        return f'<a id="{name}"></a>'


def description_cell(report: pytest.TestReport) -> str:
    """The first line of the test's docstring (the handbook step), HTML-escaped, for the results table."""
    text = next((value for key, value in report.user_properties if key == "description"), "")
    return html.escape(text.splitlines()[0] if text else "")


def write_artifacts(directory: str, nodeid: str, texts: dict[str, str]) -> Path:
    """Write ``texts`` as files under ``directory/<test id>/`` (for CI artifact upload)."""
    safe = "".join(c if c.isalnum() or c in "-_.[]" else "_" for c in nodeid)
    target = Path(directory) / safe
    target.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (target / ("".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".txt")).write_text(text)
    return target


def environment_rows(states: dict[str, dict]) -> list[tuple[str, str]]:
    """(key, value) rows describing each host (and its fingerprint), for report environments."""
    rows = []
    for name, state in states.items():
        if "caps" in state:
            caps = state["caps"]
            qemu = caps["qemu_version_text"]
            rows.append((f"host {name}", f"QEMU {qemu}, accel {caps['accel']}, kernel {caps['kernel']}"))
            rows += [(f"host {name} {key}", str(value)) for key, value in caps.get("fingerprint", {}).items()]
        else:
            rows.append((f"host {name}", f"not usable: {state.get('error', 'not prepared')}"))
    return rows


def write_allure_environment(alluredir: str, rows: list[tuple[str, str]]) -> None:
    path = Path(alluredir) / "environment.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for key, value in rows:
            f.write(f"{key.replace(' ', '.')}={value}\n")


def add_html_environment(config: pytest.Config, rows: list[tuple[str, str]]) -> None:
    try:
        from pytest_metadata.plugin import metadata_key
    except ImportError:
        return
    for key, value in rows:
        config.stash[metadata_key][key] = value


def chapter(item: pytest.Item) -> str:
    """The handbook chapter a suite checks: its module docstring's first line, up to the colon."""
    module = getattr(item, "module", None)
    doc = (module.__doc__ or "").strip().splitlines() if module is not None else []
    return doc[0].split(":", 1)[0].strip() if doc else verdicts.feature_of(item.nodeid)


def allure_labels(item: pytest.Item, host: str, description: str) -> None:
    """Group the test in Allure by host (parent suite) and feature (suite), under its handbook
    chapter (epic), titled by its docstring (story). Markers, so allure-pytest's own suite
    labels (the package and module) are not added beside them."""
    if not getattr(item.config.option, "allure_report_dir", None):
        return
    labels = [("parentSuite", host), ("suite", verdicts.feature_of(item.nodeid)), ("epic", chapter(item))]
    if description:
        labels.append(("story", description.splitlines()[0]))
    for label_type, value in labels:
        item.add_marker(pytest.mark.allure_label(value, label_type=label_type))


def label_verdict(item: pytest.Item, verdict: str) -> None:
    """Label the test's Allure result with its verdict (the controller maps it to a status)
    and its metrics (as parameters)."""
    if not getattr(item.config.option, "allure_report_dir", None):
        return
    import allure
    allure.dynamic.label(verdicts.VERDICT_PROPERTY, verdict)
    for key, value in item.user_properties:
        if key == METRIC_PROPERTY:
            metric = json.loads(value)
            samples = metric["samples"]
            shown = f"{samples[0]:.4g}" if len(samples) == 1 else f"{sum(samples) / len(samples):.4g} (mean of {len(samples)})"
            allure.dynamic.parameter(f"metric {metric['name']}", f"{shown} {metric['unit']}")


def add_junit_verdict_counts(config: pytest.Config, totals: Counter) -> None:
    """JUnit global properties ``kvm_PASS`` ... ``kvm_BROKEN``: BROKEN counted apart from FAIL."""
    from _pytest.junitxml import xml_key
    xml = config.stash.get(xml_key, None)
    if xml is not None:
        for verdict in verdicts.ORDER:
            xml.add_global_property(f"kvm_{verdict}", str(totals[verdict]))
