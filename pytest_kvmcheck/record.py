"""The run record: reports/run.json, what a later run is compared with (``kvmcheck compare``).

Written on the controller once the workers are done, also when the run fails or is
interrupted. Schema ``kvmcheck-run/1`` (a later version only adds keys)::

    {"schema": "kvmcheck-run/1", "run_id": ..., "started": epoch, "finished": epoch,
     "status": "passed" | "failed" | "interrupted" | "error", "argv": [...],
     "hosts": {NAME: {"url": ..., "usable": bool, "error": str, "fingerprint": {...},
                      "capabilities": [needs met], "expect": [...], "summary": str,
                      "stood_in_by": {FEATURE: the host that ran it in this one's place (--kvm-spread)}}},
     "tests": [{"nodeid": ..., "test": nodeid without the host, "host": ..., "feature": suite module,
                "verdict": "PASS" | "FAIL" | "ERROR" | "BROKEN" | "SKIP", "reason": str,
                "duration_s": float (its phases, less its wait for its machines: waited_s),
                "waited_s": float, "start": epoch, "stop": epoch, "worker": xdist worker id or "",
                "description": str, "notes": {"handbook": ..., ...},
                "metrics": {NAME: {"unit": ..., "direction": "lower" | "higher", "scope": "test" | "host",
                                   "samples": [float, ...]}}}]}

Metrics: a test records a named number with :func:`record_metric` (the ``kvm_metric``
fixture); ``scope="host"`` metrics (boot to ready, ...) are compared per host across tests.
"""
from __future__ import annotations

import json
import re
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from . import verdicts
from .hosts.capabilities import NEEDS, Capabilities

SCHEMA = "kvmcheck-run/1"
METRIC_PROPERTY = "kvm_metric"
WAIT_PROPERTY = "kvm_machine_wait_s"  # the setup's wait for the test's machines (another test's measurement)
# A test's user properties that are not notes (kvm_note): labels, metrics and its verdict.
NOT_NOTES = frozenset({"kvm_host", "qemu", "accel", "description", METRIC_PROPERTY, WAIT_PROPERTY,
                       verdicts.VERDICT_PROPERTY, verdicts.REASON_PROPERTY})


def record_metric(item: pytest.Item, name: str, samples, unit: str, direction: str = "lower",
                  scope: str = "test") -> None:
    """Record ``samples`` (a number or several) of metric ``name`` on the test ``item``."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"metric {name}: direction is 'lower' or 'higher' (which is better), not {direction!r}")
    if scope not in ("test", "host"):
        raise ValueError(f"metric {name}: scope is 'test' or 'host', not {scope!r}")
    values = [float(v) for v in (samples if isinstance(samples, (list, tuple)) else [samples])]
    item.user_properties.append((METRIC_PROPERTY, json.dumps(
        {"name": name, "samples": values, "unit": unit, "direction": direction, "scope": scope})))


def bare_test_id(nodeid: str, host: str) -> str:
    """The test's id without its host, wherever the host stands among its parameters:
    ``test_x[local-qcow2]`` on host local is ``test_x[qcow2]``, ``test_x[userspace-lab-1]`` on
    lab-1 is ``test_x[userspace]``, ``test_x[lab-1]`` is ``test_x``."""
    match = re.search(r"\[(.*)\]$", nodeid)
    if not match:
        return nodeid
    rest = f"-{match.group(1)}-".replace(f"-{host}-", "-", 1).strip("-")
    return nodeid[:match.start()] + (f"[{rest}]" if rest else "")


class RunRecorder:
    """Gathers every test's phases on the controller (xdist workers' reports arrive here too)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = report.user_properties
        host = next((v for k, v in props if k == "kvm_host"), None)
        if host is None:
            return
        entry = self.tests.setdefault(report.nodeid, {"duration_s": 0.0, "waited_s": 0.0, "start": report.start})
        waited = float(next((v for k, v in props if k == WAIT_PROPERTY), 0.0)) if report.when == "setup" else 0.0
        entry["duration_s"] = round(entry["duration_s"] + report.duration - waited, 3)  # what the test itself took
        entry["waited_s"] = round(entry["waited_s"] + waited, 3)
        entry["stop"] = report.stop  # setup to teardown: when the host was busy with it
        entry["worker"] = getattr(getattr(report, "node", None), "gateway", SimpleNamespace(id="")).id
        if report.when != "teardown":
            return
        metrics: dict[str, dict] = {}
        for key, value in props:
            if key == METRIC_PROPERTY:
                metric = json.loads(value)
                known = metrics.setdefault(metric.pop("name"), {**metric, "samples": []})
                known["samples"] += metric["samples"]
        description = next((v for k, v in props if k == "description"), "")
        entry.update({
            "nodeid": report.nodeid, "test": bare_test_id(report.nodeid, host), "host": host,
            "feature": verdicts.feature_of(report.nodeid), "verdict": verdicts.of(report) or "?",
            "reason": next((v for k, v in props if k == verdicts.REASON_PROPERTY), ""),
            "description": description.splitlines()[0] if description else "",
            "notes": {k: v for k, v in props if k not in NOT_NOTES}, "metrics": metrics,
        })

    def document(self, run, states: dict[str, dict], exitstatus: int) -> dict:
        hosts = {}
        stood = run.spread()
        for name, spec in run.specs.items():
            state = states.get(name, {})
            caps = state.get("caps")
            hosts[name] = {"url": spec.url, "usable": caps is not None, "error": state.get("error", ""),
                           "expect": list(spec.expect), "fingerprint": (caps or {}).get("fingerprint", {}),
                           "capabilities": met_needs(caps) if caps else [], "summary": summary(caps),
                           "stood_in_by": stood.get(name, {})}
        status = {0: "passed", 1: "failed", 2: "interrupted"}.get(int(exitstatus), "error")
        return {"schema": SCHEMA, "run_id": run.run_id, "started": self.started, "finished": time.time(),
                "status": status, "argv": sys.argv, "hosts": hosts,
                "tests": [t for t in self.tests.values() if "verdict" in t]}

    def write(self, path: Path, document: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path


def met_needs(caps: dict) -> list[str]:
    c = Capabilities.from_dict(caps)
    return [need for need in NEEDS if c.has(need)[0]]


def summary(caps: dict | None) -> str:
    return Capabilities.from_dict(caps).summary() if caps else ""


def load(path: str | Path) -> dict:
    """A run record, from its file or a report dir holding run.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "run.json"
    try:
        document = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no run record there (a run writes reports/run.json)") from None
    except ValueError as exc:
        raise ValueError(f"{p}: not a run record: {exc}") from None
    if not str(document.get("schema", "")).startswith("kvmcheck-run/"):
        raise ValueError(f"{p}: not a kvmcheck run record (schema {document.get('schema')!r})")
    return document
