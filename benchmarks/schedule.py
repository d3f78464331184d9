"""How long a fleet's run takes under xdist's loadscope and under kvmcheck's host+module
grouping: a recorded run's test durations replayed through the real schedulers (not a timed test).

    python benchmarks/schedule.py [reports/lab/run.json] [--hosts 1,2,8,32] [--workers-per-host 1]

The record is a run's run.json (``make lab-suite`` writes reports/lab/run.json): its test ids
carry their module, which both schedulers group by.

Each recorded test's duration (averaged over the hosts it ran on) is given to H made-up hosts;
both schedulers see the same collection, with as many workers as hosts, and a simulated clock
runs each worker's items in the order the scheduler sent them. Prints the makespan of each.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from xdist.scheduler import LoadScopeScheduling

from pytest_kvmcheck.schedule import HostModuleScheduling

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """What a scheduler needs of a worker: an id, and a queue it fills."""

    def __init__(self, index: int):
        self.gateway = SimpleNamespace(id=f"gw{index}")
        self.queue: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices) -> None:
        self.queue.extend(indices)

    def send_runtest_all(self) -> None:
        raise AssertionError("loadscope never sends everything at once")

    def shutdown(self) -> None:
        self.shutting_down = True


def durations_of(record: dict) -> dict[str, float]:
    """Test id without its host -> seconds, averaged over the hosts it ran on."""
    seen = defaultdict(list)
    for test in record["tests"]:
        if "::" not in test["test"]:  # fixtures/lab-durations.json: seconds per test, without module
            raise SystemExit(f"benchmarks/schedule.py: {test['test']!r} names no module: give a run's run.json")
        seen[test["test"]].append(test["duration_s"])
    return {test: statistics.mean(values) for test, values in seen.items()}


def fleet(durations: dict[str, float], hosts: int) -> tuple[list[str], list[float], list[str]]:
    """The collection for ``hosts`` hosts (host first in each id, as kvmcheck parametrizes)."""
    names = [f"host{i}" for i in range(hosts)]
    nodeids, seconds = [], []
    for test, duration in durations.items():
        path, _, rest = test.partition("::")
        function, _, params = rest.partition("[")
        for host in names:
            inner = f"{host}-{params[:-1]}" if params else host
            nodeids.append(f"{path}::{function}[{inner}]")
            seconds.append(duration)
    return nodeids, seconds, names


def makespan(scheduler_class, nodeids: list[str], seconds: list[float], workers: int, hosts: list[str]) -> float:
    config = SimpleNamespace(getvalue=lambda name: [f"{workers}*popen"],
                             option=SimpleNamespace(loadscopereorder=True))
    quiet = SimpleNamespace(loadscopesched=lambda *args, **kwargs: None)
    scheduler = (HostModuleScheduling(config, quiet, hosts) if scheduler_class is HostModuleScheduling
                 else scheduler_class(config, quiet))
    nodes = [Worker(i) for i in range(workers)]
    for node in nodes:
        scheduler.add_node(node)
    for node in nodes:
        scheduler.add_node_collection(node, nodeids)
    scheduler.schedule()
    counter = itertools.count()
    running: list[tuple[float, int, Worker, int]] = []

    def start(node: Worker, now: float) -> None:
        if node.queue:
            index = node.queue.pop(0)
            heapq.heappush(running, (now + seconds[index], next(counter), node, index))

    for node in nodes:
        start(node, 0.0)
    end = 0.0
    while running:
        end, _, node, index = heapq.heappop(running)
        scheduler.mark_test_complete(node, index, seconds[index])
        start(node, end)
        for other in nodes:  # a worker idle until now may have been given work
            if other is not node and other.queue and not any(r[2] is other for r in running):
                start(other, end)
    return end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", nargs="?", default=str(ROOT / "reports/lab/run.json"))
    parser.add_argument("--hosts", default="1,2,8,32")
    parser.add_argument("--workers-per-host", type=int, default=1)
    args = parser.parse_args()
    if not Path(args.record).is_file():
        raise SystemExit(f"benchmarks/schedule.py: no run record at {args.record}: run make lab-suite, or give one")
    durations = durations_of(json.loads(Path(args.record).read_text()))
    print(f"{len(durations)} tests from {args.record}, {sum(durations.values()):.0f} s of test time per host")
    print(f"{'hosts':>5} {'workers':>7} {'loadscope (module)':>19} {'host+module':>12} {'vs one host':>11}")
    one_host = None
    for hosts in (int(h) for h in args.hosts.split(",")):
        nodeids, seconds, names = fleet(durations, hosts)
        workers = hosts * args.workers_per_host
        module = makespan(LoadScopeScheduling, nodeids, seconds, workers, names)
        host_module = makespan(HostModuleScheduling, nodeids, seconds, workers, names)
        one_host = one_host or host_module
        print(f"{hosts:>5} {workers:>7} {module:>17.0f} s {host_module:>10.0f} s {host_module / one_host:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
