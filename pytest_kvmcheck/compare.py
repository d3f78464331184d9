"""``kvmcheck compare BASELINE CANDIDATE``: what changed between two runs, and is it worse?

Hosts are matched by name (or a mapping, when the fleet was renamed). Per host and
feature it lists regressions (PASS to FAIL/ERROR/BROKEN/SKIP), fixes, tests that appeared
or disappeared, and changes of a host's capabilities and fingerprint. A metric regressed
only when a permutation test of the two runs' samples gives p < 0.01 *and* its mean moved
the wrong way by more than a noise threshold (5 % unless set per metric), as Firecracker's
tools/ab_test.py decides; with too few samples for such a p it says so instead of guessing.
Any regression makes the exit status 1, so a CI job can gate on it.
"""
from __future__ import annotations

import html
import itertools
import math
import random
import statistics
from dataclasses import dataclass, field

ALPHA = 0.01
DEFAULT_THRESHOLD = 0.05
PERMUTATIONS = 20000  # random permutations when there are more ways to split the samples than this


def permutation_p(a: list[float], b: list[float], rounds: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of the difference of means under random relabelling of the samples."""
    pooled, n = a + b, len(a)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    total = sum(pooled)

    def extreme(first: tuple[float, ...] | list[float]) -> bool:
        s = sum(first)
        return abs(s / n - (total - s) / len(b)) >= observed - 1e-12
    if math.comb(len(pooled), n) <= rounds:
        splits = list(itertools.combinations(pooled, n))
        return sum(extreme(s) for s in splits) / len(splits)
    rng = random.Random(seed)
    hits = sum(extreme(rng.sample(pooled, n)) for _ in range(rounds))
    return (hits + 1) / (rounds + 1)


def smallest_p(n: int, m: int) -> float:
    """The smallest two-sided p any permutation test can give with n and m samples."""
    return 2 / math.comb(n + m, n) if n and m else 1.0


@dataclass
class MetricChange:
    host: str
    name: str  # "test_x[qcow2]: name" for a test's metric, "name" for a host-wide one
    unit: str
    direction: str
    baseline: list[float]
    candidate: list[float]
    threshold: float
    outcome: str = ""  # "regression", "improvement", "unchanged", "too few samples"
    p: float | None = None

    def decide(self) -> "MetricChange":
        a, b = self.baseline, self.candidate
        if smallest_p(len(a), len(b)) >= ALPHA:
            self.outcome = "too few samples"
            return self
        self.p = permutation_p(a, b)
        moved = (statistics.fmean(b) - statistics.fmean(a)) / abs(statistics.fmean(a)) if statistics.fmean(a) \
            else math.inf
        worse = moved > 0 if self.direction == "lower" else moved < 0
        if self.p < ALPHA and abs(moved) > self.threshold:
            self.outcome = "regression" if worse else "improvement"
        else:
            self.outcome = "unchanged"
        return self

    def describe(self) -> str:
        a, b = statistics.fmean(self.baseline), statistics.fmean(self.candidate)
        change = f"{(b - a) / abs(a) * 100:+.1f} %" if a else "from 0"
        tail = f"p={self.p:.4f}" if self.p is not None else \
            f"n={len(self.baseline)} vs {len(self.candidate)}: no permutation test can reach p<{ALPHA}"
        return (f"{self.host}: {self.name}: {a:.4g} -> {b:.4g} {self.unit} ({change}, {self.direction} is better; "
                f"{tail}; threshold {self.threshold * 100:.0f} %)")


@dataclass
class Comparison:
    baseline_id: str
    candidate_id: str
    regressions: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    appeared: list[str] = field(default_factory=list)
    disappeared: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # capability and fingerprint changes, hosts gone or new
    metrics: list[MetricChange] = field(default_factory=list)

    @property
    def metric_regressions(self) -> list[MetricChange]:
        return [m for m in self.metrics if m.outcome == "regression"]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions or self.metric_regressions)

    def sections(self) -> list[tuple[str, list[str]]]:
        return [
            ("regressions", self.regressions + [m.describe() for m in self.metric_regressions]),
            ("fixes", self.fixes + [m.describe() for m in self.metrics if m.outcome == "improvement"]),
            ("tests that appeared", self.appeared), ("tests that disappeared", self.disappeared),
            ("hosts: capabilities and fingerprints", self.hosts),
            ("metrics without a verdict", [m.describe() for m in self.metrics if m.outcome == "too few samples"]),
        ]


def _tests(run: dict, host_map: dict[str, str]) -> dict[tuple[str, str], dict]:
    return {(host_map.get(t["host"], t["host"]), t["test"]): t for t in run.get("tests", [])}


def _metrics(run: dict, host_map: dict[str, str]) -> dict[tuple[str, str], dict]:
    """(host, metric) -> {unit, direction, samples}: test metrics per test, host metrics pooled."""
    out: dict[tuple[str, str], dict] = {}
    for t in run.get("tests", []):
        host = host_map.get(t["host"], t["host"])
        for name, m in t.get("metrics", {}).items():
            key = (host, name if m.get("scope") == "host" else f"{t['test']}: {name}")
            entry = out.setdefault(key, {"unit": m["unit"], "direction": m["direction"], "samples": []})
            entry["samples"] += m["samples"]
    return out


def compare(baseline: dict, candidate: dict, host_map: dict[str, str] | None = None,
            thresholds: dict[str, float] | None = None, default_threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """``host_map`` renames the baseline's hosts to the candidate's; ``thresholds`` per metric name."""
    host_map, thresholds = host_map or {}, thresholds or {}
    c = Comparison(baseline.get("run_id", "?"), candidate.get("run_id", "?"))
    before, after = _tests(baseline, host_map), _tests(candidate, {})
    for key in sorted(before.keys() | after.keys()):
        host, test = key
        a, b = before.get(key), after.get(key)
        where = f"{host}: {b['feature'] if b else a['feature']}: {test}"
        if a is None:
            c.appeared.append(f"{where} ({b['verdict']})")
        elif b is None:
            c.disappeared.append(f"{where} (was {a['verdict']})")
        elif a["verdict"] == "PASS" and b["verdict"] != "PASS":
            reason = (b.get("reason") or "").strip().splitlines()[:1]
            c.regressions.append(f"{where}: PASS -> {b['verdict']}" + (f": {reason[0]}" if reason else ""))
        elif a["verdict"] != "PASS" and b["verdict"] == "PASS":
            c.fixes.append(f"{where}: {a['verdict']} -> PASS")
    old_hosts = {host_map.get(n, n): h for n, h in baseline.get("hosts", {}).items()}
    for name in sorted(old_hosts.keys() | candidate.get("hosts", {}).keys()):
        a, b = old_hosts.get(name), candidate.get("hosts", {}).get(name)
        if a is None or b is None:
            c.hosts.append(f"{name}: {'new in the candidate' if a is None else 'missing from the candidate'}")
            continue
        lost, gained = sorted(set(a["capabilities"]) - set(b["capabilities"])), \
            sorted(set(b["capabilities"]) - set(a["capabilities"]))
        if lost or gained:
            c.hosts.append(f"{name}: capabilities{' lost ' + ', '.join(lost) if lost else ''}"
                           f"{' gained ' + ', '.join(gained) if gained else ''}")
        for key in sorted(a.get("fingerprint", {}).keys() | b.get("fingerprint", {}).keys()):
            old, new = a.get("fingerprint", {}).get(key), b.get("fingerprint", {}).get(key)
            if old != new:
                c.hosts.append(f"{name}: {key} {old} -> {new}")
    m_before, m_after = _metrics(baseline, host_map), _metrics(candidate, {})
    for key in sorted(m_before.keys() & m_after.keys()):
        host, name = key
        a, b = m_before[key], m_after[key]
        bare = name.rsplit(": ", 1)[-1]
        c.metrics.append(MetricChange(host, name, b["unit"], b["direction"], a["samples"], b["samples"],
                                      thresholds.get(bare, default_threshold)).decide())
    return c


def parse_pairs(text: str | list[str], what: str) -> dict[str, str]:
    """``a=b,c=d`` (or a list of ``a=b``) as a dict; a malformed pair is a usage error."""
    items = [p for part in ([text] if isinstance(text, str) else text) for p in part.split(",") if p.strip()]
    if any("=" not in p for p in items):
        raise ValueError(f"{what}: expected NAME=VALUE pairs, got {','.join(items)!r}")
    return dict(p.strip().split("=", 1) for p in items)


def render_text(c: Comparison) -> str:
    lines = [f"kvmcheck compare: baseline {c.baseline_id} -> candidate {c.candidate_id}"]
    for title, rows in c.sections():
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines += [f"  {row}" for row in rows]
    unchanged = sum(m.outcome == "unchanged" for m in c.metrics)
    lines.append(f"{len(c.regressions)} test regressions, {len(c.metric_regressions)} metric regressions, "
                 f"{len(c.fixes)} fixes, {unchanged} metrics unchanged: "
                 + ("REGRESSED" if c.regressed else "no regression"))
    return "\n".join(lines)


def render_html(c: Comparison) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>kvmcheck compare {html.escape(c.baseline_id)} -> "
             f"{html.escape(c.candidate_id)}</title><style>body{{font-family:sans-serif}}"
             ".regressions{color:#b00020}.fixes{color:#1b5e20}</style>",
             f"<h1>kvmcheck compare: {html.escape(c.baseline_id)} &rarr; {html.escape(c.candidate_id)}</h1>",
             f"<p id=verdict>{'REGRESSED' if c.regressed else 'no regression'}</p>"]
    for title, rows in c.sections():
        cls = title.split()[0].rstrip(":")
        parts.append(f"<h2 class={cls}>{html.escape(title)} ({len(rows)})</h2><ul class={cls}>"
                     + "".join(f"<li>{html.escape(r)}</li>" for r in rows) + "</ul>")
    return "\n".join(parts)
