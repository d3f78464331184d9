"""Verdicts: what one test's outcome says about the host, and the counts a reviewer reads.

Every test ends as exactly one of

- ``PASS``: the host did what the check asks;
- ``FAIL``: the host contradicts the check (an assertion, or QEMU or the guest refused or
  lost what must work: :class:`~.errors.QMPCommandError`, a migration that failed, ...);
- ``ERROR``: no verdict could be reached (host unreachable, QEMU would not start, a guest
  never booted, a premise the check needs did not hold: :class:`~.errors.PremiseError`);
- ``BROKEN``: kvmcheck's own code raised something that is not an assertion
  (AttributeError, KeyError, TypeError, ...): a bug of the suite, never the host's;
- ``SKIP``: the host lacks a need (``host X: needs Y: why``).

The verdict of each phase is decided on the worker that ran it (:func:`classify`) and
travels with the report as the user property ``kvm_verdict``; the teardown report carries
the test's final verdict, so JUnit (which writes the teardown's properties), the HTML
report, Allure and the terminal table all read the same word.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from .errors import KvmCheckError

ORDER = ("PASS", "FAIL", "ERROR", "BROKEN", "SKIP")
# Which verdict a test (or a host x feature cell) ends on when its phases differ.
_TEST_RANK = {"BROKEN": 4, "FAIL": 3, "ERROR": 2, "SKIP": 1, "PASS": 0}
_CELL_RANK = {"FAIL": 4, "BROKEN": 3, "ERROR": 2, "PASS": 1, "SKIP": 0}
ALLURE_STATUS = {"PASS": "passed", "FAIL": "failed", "ERROR": "unknown", "BROKEN": "broken", "SKIP": "skipped"}
VERDICT_PROPERTY = "kvm_verdict"
REASON_PROPERTY = "kvm_reason"  # on the teardown report of a test that did not PASS: its one line
_ITEM_VERDICT = pytest.StashKey[str]()
_ITEM_REASON = pytest.StashKey[str]()

# Exceptions from the world outside our code: a host or guest connection that broke.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, EOFError)


def outside_errors() -> tuple[type[BaseException], ...]:
    try:  # paramiko is imported only when an SSH host or a guest is used
        import paramiko
        return (*_CONNECTION_ERRORS, paramiko.SSHException)
    except ImportError:  # pragma: no cover - paramiko is a dependency
        return _CONNECTION_ERRORS


_TIMEOUT = re.compile(r"Timeout \(?>")  # pytest-timeout's words: "Timeout >2s", "Timeout (>2.0s) from pytest-timeout."


def classify(excinfo: pytest.ExceptionInfo | None) -> str:
    """The verdict of a test phase that ended with ``excinfo`` (None: it passed)."""
    if excinfo is None:
        return "PASS"
    exc = excinfo.value
    if isinstance(exc, pytest.skip.Exception):
        return "SKIP"
    if isinstance(exc, pytest.fail.Exception) and _TIMEOUT.match(str(exc)):
        return "ERROR"  # pytest-timeout ended a test that hung: no verdict was reached
    if isinstance(exc, (AssertionError, pytest.fail.Exception)):
        return "FAIL"
    if isinstance(exc, KvmCheckError):
        return exc.verdict
    if isinstance(exc, outside_errors()):
        return "ERROR"
    return "BROKEN"


def short_reason(excinfo: pytest.ExceptionInfo) -> str:
    """The one line a reviewer reads: the exception's type (for bugs) and its message."""
    exc = excinfo.value
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (AssertionError, KvmCheckError, pytest.fail.Exception, pytest.skip.Exception)):
        return text
    return f"{type(exc).__name__}: {text}"


def record(item: pytest.Item, report: pytest.TestReport, excinfo: pytest.ExceptionInfo | None) -> str:
    """Decide this phase's verdict, fold it into the test's, and label the report with it.

    A KvmCheckError ends in its own words, without a traceback through our code; a BROKEN
    one keeps its traceback (the bug needs it) and says whose bug it is.
    """
    phase = {"passed": "PASS", "skipped": "SKIP"}.get(report.outcome) or classify(excinfo)
    if excinfo is not None and report.outcome == "failed":
        if phase == "BROKEN":
            report.sections.append(("kvmcheck verdict", "BROKEN: an exception in kvmcheck's own code, not a verdict "
                                                        "on the host: " + short_reason(excinfo)))
        elif isinstance(excinfo.value, KvmCheckError):
            report.longrepr = f"{phase}: {type(excinfo.value).__name__}: {excinfo.value}"
    previous = item.stash.get(_ITEM_VERDICT, None)
    if report.when == "setup" or previous is None:
        final = phase
    elif phase == "PASS":  # a clean teardown keeps what the test was
        final = previous
    else:
        final = max(previous, phase, key=_TEST_RANK.__getitem__)
    item.stash[_ITEM_VERDICT] = final
    if phase != "PASS" and (final == phase or _ITEM_REASON not in item.stash):  # the phase that decided it
        item.stash[_ITEM_REASON] = (skip_reason(report) if phase == "SKIP"
                                    else short_reason(excinfo) if excinfo is not None else phase)
    report.user_properties.append((VERDICT_PROPERTY, final if report.when == "teardown" else phase))
    if report.when == "teardown" and final != "PASS":
        report.user_properties.append((REASON_PROPERTY, item.stash.get(_ITEM_REASON, final)))
    return final


def skip_reason(report: pytest.TestReport) -> str:
    """A skip's reason, as pytest keeps it (file, line, "Skipped: why")."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def of(report: pytest.TestReport) -> str | None:
    """The verdict a report carries (the phase's; the teardown's is the test's)."""
    return next((v for k, v in report.user_properties if k == VERDICT_PROPERTY), None)


def feature_of(nodeid: str) -> str:
    return nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")


class Verdicts:
    """Verdicts per host and feature (suite module), gathered on the controller."""

    def __init__(self) -> None:
        self.tests: dict[str, tuple[str, str, str]] = {}  # nodeid -> (host, feature, verdict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        host, verdict = props.get("kvm_host"), of(report)
        if host is None or verdict is None or report.when != "teardown":
            return
        self.tests[report.nodeid] = (host, feature_of(report.nodeid), verdict)

    def cells(self) -> dict[tuple[str, str], Counter]:
        out: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for host, feature, verdict in self.tests.values():
            out[(host, feature)][verdict] += 1
        return out

    def totals(self) -> Counter:
        return Counter(verdict for _, _, verdict in self.tests.values())

    def rows(self, stood_in_by: dict[str, dict[str, str]] | None = None) -> list[tuple[str, str, str, str]]:
        """(host, feature, the cell's verdict, its counts as text), sorted by host and feature.
        With --kvm-spread's plan, a host another stood for shows that host's verdict, saying so."""
        cells = self.cells()
        stood = {(host, feature): by for host, features in (stood_in_by or {}).items()
                 for feature, by in features.items()}
        out = []
        for key in sorted(cells.keys() | stood.keys()):
            counts, by = cells.get(key, Counter()), stood.get(key)
            detail = ", ".join(f"{counts[v]} {v}" for v in ORDER if counts[v])
            if by is not None:
                theirs = sum((cells.get((h, key[1]), Counter()) for h in by.split(", ")), Counter())
                if not counts and not theirs:  # nothing ran (--collect-only, an interrupted run)
                    continue
                counts = counts + theirs
                detail = "; ".join(filter(None, (detail, f"{by} stood for it: {cell_verdict(theirs)}")))
            out.append((*key, cell_verdict(counts), detail))
        return out

    def lines(self, stood_in_by: dict[str, dict[str, str]] | None = None) -> list[str]:
        return [f"{host:<16} {feature:<28} {cell:<6} ({detail})"
                for host, feature, cell, detail in self.rows(stood_in_by)]

    def summary(self) -> str:
        totals = self.totals()
        text = ", ".join(f"{totals[v]} {v}" for v in ORDER)
        if totals["BROKEN"]:
            text += f" ({totals['BROKEN']} BROKEN: bugs in kvmcheck itself, not verdicts on the hosts)"
        return text


def cell_verdict(counts: Counter) -> str:
    """A host x feature cell: FAIL if the host failed anything, then BROKEN, ERROR, PASS, SKIP."""
    present = [v for v in ORDER if counts[v]]
    return max(present, key=_CELL_RANK.__getitem__) if present else "SKIP"


def retag_allure_results(alluredir: str | Path) -> int:
    """Give each Allure result the status of its kvmcheck verdict (label ``kvm_verdict``).

    allure-pytest calls every non-assertion exception "broken"; our FAIL (a refused QMP
    command, a failed migration) must read as failed, ERROR as unknown, and only BROKEN
    as broken. Returns how many results changed.
    """
    changed = 0
    for path in Path(alluredir).glob("*-result.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        verdict = next((label["value"] for label in result.get("labels", []) if label.get("name") == VERDICT_PROPERTY),
                       None)
        status = ALLURE_STATUS.get(verdict or "")
        if status and result.get("status") != status:
            result["status"] = status
            details = result.setdefault("statusDetails", {})
            details["message"] = f"{verdict}: {details.get('message', '')}".rstrip(": ")
            path.write_text(json.dumps(result))
            changed += 1
    return changed
