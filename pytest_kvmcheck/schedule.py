"""``--dist loadscope`` by host and module: different hosts run at once.

pytest-xdist's loadscope groups tests by module, so every host's copy of a module lands on
one worker and a fleet of H hosts takes H times the longest module. Grouping by module *and*
host keeps what loadscope is for (a module's shared guest, booted once per host, serves all
its tests on one worker) and lets the hosts' copies run on different workers.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

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


class HostModuleScheduling(LoadScopeScheduling):
    """LoadScopeScheduling with each module's tests split by host."""

    def __init__(self, config, log=None, hosts: Iterable[str] = ()):
        super().__init__(config, log)
        self.hosts = tuple(hosts)

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid, self.hosts)
