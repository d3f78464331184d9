"""``--dist loadscope`` by host and module: different hosts run at once.

pytest-xdist's loadscope groups tests by module, so every host's copy of a module lands on
one worker and a fleet of H hosts takes H times the longest module. Grouping by module *and*
host keeps what loadscope is for (a module's shared guest, booted once per host, serves all
its tests on one worker) and lets the hosts' copies run on different workers.

A free worker takes the next scope on the host where the other workers run the fewest scopes
at that moment (of those, the host with the fewest scopes begun), the largest of that host's first. Each host is a machine of its own: two workers on one host
while another idles halve what the run gets from its hosts (the lab run: 376 s of 1,332 with
both workers on one lab host's single vCPU), and a host with one small scope (lab-power's
power-loss check) would otherwise start last and run alone at the end.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

from xdist.scheduler import LoadScopeScheduling


def host_in_id(nodeid: str, hosts: Iterable[str]) -> str | None:
    """The host a parametrized test id names (``test_x[lab-1-vhost]`` -> ``lab-1``): the
    longest host name that is a whole ``-``-separated part of the id's parameters."""
    match = re.search(r"\[(.*)\]$", nodeid)
    if not match:
        return None
    params = f"-{match.group(1)}-"
    for host in sorted(hosts, key=len, reverse=True):
        if f"-{host}-" in params:
            return host
    return None


def scope_of(nodeid: str, hosts: Iterable[str]) -> str:
    """loadscope's scope (the module, or a class) plus the test's host, if it has one."""
    scope = nodeid.rsplit("::", 1)[0]
    host = host_in_id(nodeid, hosts)
    return f"{scope}@{host}" if host else scope


def host_of_scope(scope: str) -> str:
    """The host part of a :func:`scope_of` scope ("" for a scope without one)."""
    return scope.rpartition("@")[2] if "@" in scope else ""


def next_scope(queue: Mapping[str, Mapping], busy: Mapping[str, int], started: Mapping[str, int] | None = None) -> str:
    """The scope a free worker takes from ``queue`` (scope -> its tests, in queue order): one of
    the host with the fewest scopes running elsewhere (``busy``); among those, of the host with
    the fewest scopes begun (``started``), so that a host with one long scope does not begin
    last (the lab's power-loss check, 64 s, ran alone at the end when its one test lost to the
    migration module's count); then the one with the most tests."""
    started = started or {}
    return min(queue, key=lambda scope: (busy.get(host_of_scope(scope), 0), started.get(host_of_scope(scope), 0),
                                         -len(queue[scope])))


def busy_elsewhere(assigned: Mapping[object, Mapping[str, Mapping[str, bool]]], node: object) -> Counter:
    """Host -> scopes with tests still to run on the *other* workers. The asking worker's own
    scopes do not count: it asks while finishing one (xdist asks with two tests left), and
    counting it sent the worker back to the host it was leaving, beside the other worker
    (the lab run: security after balloon on lab-1, where hotplug ran, while lab-2 idled)."""
    return Counter(host_of_scope(scope) for other, units in assigned.items() if other is not node
                   for scope, tests in units.items() if not all(tests.values()))


class HostModuleScheduling(LoadScopeScheduling):
    """LoadScopeScheduling with each module's tests split by host."""

    def __init__(self, config, log=None, hosts: Iterable[str] = ()):
        super().__init__(config, log)
        self.hosts = tuple(hosts)

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid, self.hosts)

    def _assign_work_unit(self, node) -> None:
        busy = busy_elsewhere(self.assigned_work, node)
        started = Counter(host_of_scope(scope) for units in self.assigned_work.values() for scope in units)
        self.workqueue.move_to_end(next_scope(self.workqueue, busy, started), last=False)  # loadscope pops the first
        super()._assign_work_unit(node)
