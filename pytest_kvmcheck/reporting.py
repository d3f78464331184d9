"""Reports: attachments per test (HTML, Allure), JUnit properties, environment, verdicts.

Each test that used VMs carries the QEMU argv, QMP transcript, serial console and the
host's capability summary; a failed test also the guest's dmesg. Attachments go to
whichever reporters are active (pytest-html, allure-pytest); nothing here writes secrets:
the run's private key never leaves the local state dir.
"""
from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import pytest

from . import verdicts


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
    """(key, value) rows describing each host, for report environments."""
    rows = []
    for name, state in states.items():
        if "caps" in state:
            caps = state["caps"]
            qemu = caps["qemu_version_text"]
            rows.append((f"host {name}", f"QEMU {qemu}, accel {caps['accel']}, kernel {caps['kernel']}"))
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


def label_verdict(item: pytest.Item, verdict: str) -> None:
    """Label the test's Allure result with its verdict (the controller maps it to a status)."""
    if getattr(item.config.option, "allure_report_dir", None):
        import allure
        allure.dynamic.label(verdicts.VERDICT_PROPERTY, verdict)


def add_junit_verdict_counts(config: pytest.Config, totals: Counter) -> None:
    """JUnit global properties ``kvm_PASS`` ... ``kvm_BROKEN``: BROKEN counted apart from FAIL."""
    from _pytest.junitxml import xml_key
    xml = config.stash.get(xml_key, None)
    if xml is not None:
        for verdict in verdicts.ORDER:
            xml.add_global_property(f"kvm_{verdict}", str(totals[verdict]))


def html_verdict_summary(collected: verdicts.Verdicts) -> str:
    """The HTML report's verdict table per host and feature, above pytest-html's summary."""
    rows = [f"<tr><td>{html.escape(host)}</td><td>{html.escape(feature)}</td>"
            f"<td class=\"kvm-{cell}\">{cell}</td><td>{detail}</td></tr>"
            for host, feature, cell, detail in collected.rows()]
    return ("<h2>kvmcheck verdicts</h2>"
            f"<p class=\"kvm-totals\">{html.escape(collected.summary())}</p>"
            "<table class=\"kvm-verdicts\"><tr><th>host</th><th>feature</th><th>verdict</th><th>tests</th></tr>"
            + "".join(rows) + "</table>")
