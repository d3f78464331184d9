"""Reports: attachments per test (HTML, Allure), JUnit properties, environment, verdicts.

Each test that used VMs carries the QEMU argv, QMP transcript, serial console and the
host's capability summary; a failed test also the guest's dmesg. Attachments go to
whichever reporters are active (pytest-html, allure-pytest); nothing here writes secrets:
the run's private key never leaves the local state dir.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest


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


class Verdicts:
    """Outcome counts per host and feature (suite module), for the terminal summary."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        host = props.get("kvm_host")
        if host is None:
            return
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            feature = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            self.counts[(host, feature)][report.outcome] += 1

    def lines(self) -> list[str]:
        out = []
        for (host, feature), c in sorted(self.counts.items()):
            verdict = "FAIL" if c.get("failed") else ("PASS" if c.get("passed") else "SKIP")
            detail = ", ".join(f"{n} {k}" for k, n in sorted(c.items()))
            out.append(f"{host:<16} {feature:<28} {verdict:<5} ({detail})")
        return out
