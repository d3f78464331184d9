"""The verdict matrix: hosts x features, one coloured cell per verdict with its counts.

report.html opens on it (with each host's fingerprint and the handbook notes); ``kvmcheck
matrix RUN...`` renders several run records side by side (a fleet's history: host x feature
x run) as one self-contained HTML file.
"""
from __future__ import annotations

import html
import json
from collections import Counter, defaultdict

from . import spread, verdicts

STYLE = """
.kvm-matrix{border-collapse:collapse;margin:0.5em 0 1em}
.kvm-matrix th,.kvm-matrix td{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left}
.kvm-cell a{color:inherit;text-decoration:none;display:block}
.kvm-PASS{background:#c8e6c9}.kvm-FAIL{background:#ef9a9a}.kvm-ERROR{background:#ffe082}
.kvm-BROKEN{background:#ce93d8}.kvm-SKIP{background:#eeeeee}.kvm-none{background:#fff;color:#999}
.kvm-fingerprints td,.kvm-notes li{font-size:12px}
"""


def anchor(host: str, feature: str) -> str:
    return "kvm-" + "".join(c if c.isalnum() else "-" for c in f"{host}-{feature}")


def cells(tests: list[dict]) -> dict[tuple[str, str], Counter]:
    out: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for t in tests:
        out[(t["host"], t["feature"])][t["verdict"]] += 1
    return out


def _counts(counts: Counter) -> str:
    return ", ".join(f"{counts[v]} {v}" for v in verdicts.ORDER if counts[v])


def _cell(counts: Counter | None, link: str = "", detail: str = "") -> str:
    if not counts:
        return '<td class="kvm-cell kvm-none">-</td>'
    verdict = verdicts.cell_verdict(counts)
    detail = detail or _counts(counts)
    body = f"<b>{verdict}</b><br><small>{detail}</small>"
    if link:
        body = f'<a href="#{link}">{body}</a>'
    return (f'<td class="kvm-cell kvm-{verdict}" data-verdict="{verdict}" data-counts="{html.escape(detail)}">'
            f"{body}</td>")


def matrix_table(tests: list[dict], link: bool = True, stood_in_by: dict[str, dict[str, str]] | None = None) -> str:
    """Rows: features; columns: hosts; each cell the feature's verdict on the host, with counts.
    A cell another host stood for (--kvm-spread) shows that host's verdict and names it."""
    grid = cells(tests)
    stood = {(h, f): by for h, features in (stood_in_by or {}).items() for f, by in features.items()}
    hosts = sorted({h for h, _ in grid} | {h for h, _ in stood})
    features = sorted({f for _, f in grid})

    def cell(h: str, f: str) -> str:
        by = stood.get((h, f))
        if by is None:
            return _cell(grid.get((h, f)), anchor(h, f) if link else "")
        own = grid.get((h, f), Counter())
        theirs = sum((grid.get((b, f), Counter()) for b in by.split(", ")), Counter())
        return _cell(own + theirs, anchor(by.split(", ")[0], f) if link else "",
                     "; ".join(filter(None, (_counts(own), f"{by} stood for it: {verdicts.cell_verdict(theirs)}"))))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in hosts)
    rows = "".join(f"<tr><th>{html.escape(f)}</th>" + "".join(cell(h, f) for h in hosts) + "</tr>" for f in features)
    return f'<table class="kvm-matrix" id="kvm-matrix"><tr><th>feature \\ host</th>{head}</tr>{rows}</table>'


def fingerprint_table(hosts: dict[str, dict]) -> str:
    keys = sorted({k for h in hosts.values() for k in h.get("fingerprint", {})})
    if not keys:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in hosts)
    rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(
        f"<td>{html.escape(str(h.get('fingerprint', {}).get(k, '')))}</td>" for h in hosts.values()) + "</tr>"
        for k in keys)
    return f'<h3>Hosts</h3><table class="kvm-matrix kvm-fingerprints"><tr><th></th>{head}</tr>{rows}</table>'


def handbook_notes(tests: list[dict]) -> str:
    notes = sorted({t.get("notes", {}).get("handbook", "") for t in tests} - {""})
    if not notes:
        return ""
    return ('<h3>The 2016 handbook on today\'s QEMU</h3><ul class="kvm-notes">'
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")


def report_head(tests: list[dict], hosts: dict[str, dict]) -> str:
    """What report.html opens on: the matrix (cells link to their rows), fingerprints, handbook notes.

    The style moves pytest-html's summary, where this goes, above its environment table.
    """
    totals = Counter(t["verdict"] for t in tests)
    line = ", ".join(f"{totals[v]} {v}" for v in verdicts.ORDER)
    return (f"<style>{STYLE} body{{display:flex;flex-direction:column}} #title{{order:-2}} "
            f".summary{{order:-1}}</style><h2>kvmcheck verdicts</h2><p class=\"kvm-totals\">{line}</p>"
            + matrix_table(tests, stood_in_by=spread.by_feature({h: v.get("stood_in_by", {}) for h, v in hosts.items()}))
            + fingerprint_table(hosts) + handbook_notes(tests))


def history_page(runs: list[tuple[str, dict]]) -> str:
    """``kvmcheck matrix``: host x feature x run, oldest run first, one self-contained page."""
    keys = sorted({(t["host"], t["feature"]) for _, run in runs for t in run.get("tests", [])})
    grids = [cells(run.get("tests", [])) for _, run in runs]
    head = "".join(f"<th>{html.escape(run.get('run_id', name))}<br><small>{html.escape(name)}</small></th>"
                   for name, run in runs)
    rows = "".join(f"<tr><th>{html.escape(h)}</th><th>{html.escape(f)}</th>"
                   + "".join(_cell(grid.get((h, f))) for grid in grids) + "</tr>" for h, f in keys)
    data = html.escape(json.dumps([[name, run.get("run_id")] for name, run in runs]))
    return (f"<!doctype html><meta charset=utf-8><title>kvmcheck matrix</title><style>body{{font-family:sans-serif}}"
            f"{STYLE}</style><h1>kvmcheck: verdicts per host and feature, run by run</h1>"
            f'<table class="kvm-matrix" id="kvm-history" data-runs="{data}"><tr><th>host</th><th>feature</th>{head}'
            f"</tr>{rows}</table>")
