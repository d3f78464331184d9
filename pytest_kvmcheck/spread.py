"""``--kvm-spread``: identical hosts split the host-local features between them.

A fleet's hosts often share one build: same CPU, kernel, QEMU binary, firmware, and the same
capabilities. Running every host-local feature on each of them checks one build many times.
With ``--kvm-spread`` the hosts of one fingerprint (the run record's, plus the needs they
meet and the inventory's expectations) form a group; each feature (suite module) runs on one
host of the group, which stands for the others. A test with a migration peer is spread test
by test, and only where the pairs are alike (hosts of one group whose peers are of one group
too, never themselves): each such move runs once, between two different hosts, and the
group's hosts take turns as its source. The terminal summary, the run record
(``hosts.NAME.stood_in_by``: feature, or feature::test for a move) and the verdict table say
which host stood for which.

The plan is a pure function of the hosts' prepared states and the collected items, so every
xdist worker, collecting on its own, deselects the same tests.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from statistics import median


def group_key(state: Mapping, expect: Iterable[str] = (), met: Iterable[str] = ()) -> str | None:
    """What identical hosts share: fingerprint, the needs met, the expected needs. None for
    a host that could not be prepared (it stands for nobody, and nobody for it)."""
    caps = state.get("caps")
    if not caps or not caps.get("fingerprint"):
        return None
    return json.dumps([caps["fingerprint"], sorted(met), sorted(expect)], sort_keys=True)


def groups(keys: Mapping[str, str | None]) -> list[list[str]]:
    """Hosts with the same key, in the order given; only groups of two or more."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for host, key in keys.items():
        if key is not None:
            by_key[key].append(host)
    return [hosts for hosts in by_key.values() if len(hosts) > 1]


def plan(weights: Mapping[tuple[str, str], float], host_groups: list[list[str]]) -> dict[tuple[str, str], str]:
    """(feature, host) -> the host that runs the feature for it.

    ``weights`` holds each (feature, host)'s spreadable work (its test count, or seconds).
    Within a group each feature goes to one host, heaviest feature first to the host with the
    least work so far (ties: the group's order), so the group's hosts finish together."""
    out: dict[tuple[str, str], str] = {}
    for hosts in host_groups:
        features = sorted({f for (f, h) in weights if h in hosts},
                          key=lambda f: (-max(weights.get((f, h), 0) for h in hosts), f))
        load = dict.fromkeys(hosts, 0.0)
        for feature in features:
            able = [h for h in hosts if (feature, h) in weights]
            chosen = min(able, key=lambda h: (load[h], hosts.index(h)))
            load[chosen] += weights[(feature, chosen)]
            for host in able:
                out[(feature, host)] = chosen
    return out


def pair_groups(keys: Mapping[str, str | None], peers: Mapping[str, str]) -> list[list[str]]:
    """Hosts whose moves are alike: the same key, and peers of the same key, not themselves."""
    return groups({h: None if keys.get(h) is None or peers.get(h, h) == h or keys.get(peers[h]) is None
                   else json.dumps([keys[h], keys[peers[h]]]) for h in keys})


def unit(feature: str, move: str = "") -> str:
    """What is spread as one: a feature (suite module), or ``feature::test[params]`` for a move
    (a test with a migration peer), ``move`` being the test's id without its host."""
    return f"{feature}::{move}" if move else feature


def is_move(unit: str) -> bool:
    return "::" in unit


def assign(weights: Mapping[tuple[str, str], float], keys: Mapping[str, str | None],
           peers: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """(unit, host) -> the host that runs it: features within groups of alike hosts, moves
    within groups of alike pairs, each weighed by its tests (their count, or their seconds)."""
    local = {u: w for u, w in weights.items() if not is_move(u[0])}
    moves = {u: w for u, w in weights.items() if is_move(u[0])}
    return {**plan(local, groups(keys)), **plan(moves, pair_groups(keys, peers))}


def duration_key(feature: str, test: str) -> str:
    """A test's name in :class:`Durations`: its feature and its id without host or path
    (``test_migration::test_x[precopy]``), the same on every host and in any checkout."""
    return f"{feature}::{test.rsplit('::', 1)[-1]}"


class Durations:
    """Seconds per test from an earlier run's record (``--kvm-durations``), to weigh the spread
    by: test counts alone gave one lab host 650 s of features and the other 410. A test the
    record lacks weighs its feature's median test, else the record's median; with no record,
    every test weighs 1 (the spread goes by count)."""

    def __init__(self, record: Mapping | None = None):
        runs: dict[str, list[float]] = defaultdict(list)
        for test in (record or {}).get("tests", ()):
            if test.get("duration_s") is not None and test.get("feature") and test.get("test"):
                runs[duration_key(test["feature"], test["test"])].append(float(test["duration_s"]))
        self.seconds = {key: median(values) for key, values in runs.items()}
        by_feature: dict[str, list[float]] = defaultdict(list)
        for key, value in self.seconds.items():
            by_feature[key.split("::", 1)[0]].append(value)
        self._feature = {feature: median(values) for feature, values in by_feature.items()}
        self._any = median(self.seconds.values()) if self.seconds else 1.0

    def of(self, feature: str, test: str) -> float:
        if not self.seconds:
            return 1.0
        key = duration_key(feature, test)
        return self.seconds.get(key, self._feature.get(feature, self._any))


def feature_of_unit(unit: str) -> str:
    """A spread unit is a feature, or feature::test for a test with a migration peer."""
    return unit.split("::", 1)[0]


def by_feature(stood: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """host -> {feature: the host(s) that stood for it there}, units folded into their features."""
    out: dict[str, dict[str, str]] = {}
    for host, units in stood.items():
        bys: dict[str, set[str]] = defaultdict(set)
        for unit, by in units.items():
            bys[feature_of_unit(unit)].add(by)
        out[host] = {feature: ", ".join(sorted(hosts)) for feature, hosts in bys.items()}
    return out


def stood_in_by(assignment: Mapping[tuple[str, str], str]) -> dict[str, dict[str, str]]:
    """host -> {feature: the host that ran it in its place}, for hosts that did not run it."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for (feature, host), chosen in sorted(assignment.items()):
        if chosen != host:
            out[host][feature] = chosen
    return dict(out)


def summary_lines(stood: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One line per host that another stood for: which host ran which of its features."""
    lines = []
    for host, units in sorted(stood.items()):
        by: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for unit, chosen in sorted(units.items()):
            by[chosen][feature_of_unit(unit)] += is_move(unit)
        lines.append(f"spread: host {host} (same fingerprint) was stood for by " + "; ".join(
            f"{chosen} in " + ", ".join(f"{f} ({n} of its moves)" if n else f for f, n in fs.items())
            for chosen, fs in sorted(by.items())))
    return lines
