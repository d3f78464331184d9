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
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping


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


def assign(units: Iterable[tuple[str, str]], keys: Mapping[str, str | None],
           peers: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """(unit, host) -> the host that runs it: features within groups of alike hosts, moves
    within groups of alike pairs, each counted by its tests."""
    units = list(units)
    local = Counter(u for u in units if not is_move(u[0]))
    moves = Counter(u for u in units if is_move(u[0]))
    return {**plan(local, groups(keys)), **plan(moves, pair_groups(keys, peers))}


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
