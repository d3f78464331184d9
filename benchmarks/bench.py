"""Benchmarks (not a timed test): how fast the product's basic moves are, each suite's seconds
per check, the whole runs against their budgets, and a comparison with a saved baseline.

    python benchmarks/bench.py [--boots 5] [--commands 200] [--no-suite] [--json reports/bench.json]
    python benchmarks/bench.py --lab [--no-suite] [--json reports/bench-lab.json]
    python benchmarks/bench.py ... --baseline reports/bench-before.json

Measures the tiny guest's boot-to-ready and boot-to-first-command times, the guest command
round trip over the persistent connection, live migration total time and downtime (precopy,
multifd, postcopy; 512 MiB guest, loopback), and the suites: each suite's test durations (its
seconds per check) and the whole run's wall time, serial and with xdist (``--lab``: the lab's
two hosts with --kvm-spread). Every metric keeps its samples. With ``--baseline`` each metric
is compared with the baseline's as ``kvmcheck compare`` compares a run's metrics (a
permutation test, p < 0.01, and a move beyond a 5 % noise threshold: Firecracker's A/B rule);
a metric with too few samples for that says so. Whole runs are held to issue 16's budgets.
Exit status 1 if a budget is exceeded or a metric regressed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_kvmcheck.compare import DEFAULT_THRESHOLD, MetricChange
from pytest_kvmcheck.hosts.spec import parse_host
from pytest_kvmcheck.qemu.migration import destination_spec, listen, migrate, stats
from pytest_kvmcheck.run import KvmRun
from pytest_kvmcheck.qemu.spec import VMSpec

ROOT = Path(__file__).resolve().parents[1]
# Whole runs' budgets, seconds (issue 16). CI's (1800 s, setup included) is .ci/run's, in a fresh clone.
BUDGETS_S = {"suite_parallel_wall_s": 240, "lab_suite_parallel_wall_s": 900}


class Results:
    """Named metrics, each with its samples, unit and better direction (as run.json keeps them)."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict] = {}
        self.info: dict[str, str] = {}

    def add(self, name: str, samples: list[float], unit: str, direction: str = "lower") -> None:
        self.metrics[name] = {"unit": unit, "direction": direction, "samples": [float(x) for x in samples]}

    def update(self, other: "Results", prefix: str = "") -> None:
        self.metrics.update({prefix + k: v for k, v in other.metrics.items()})
        self.info.update({prefix + k: v for k, v in other.info.items()})

    def document(self) -> dict:
        return {"schema": "kvmcheck-bench/2", "metrics": self.metrics, "info": self.info}


def measure_boots(run: KvmRun, boots: int, commands: int, host: str = "local") -> Results:
    ready, first, rtts = [], [], []
    for _ in range(boots):
        vm = run.new_vm(host, VMSpec())
        start = time.monotonic()
        try:
            vm.boot()
            ready.append(time.monotonic() - start)
            vm.run("true", check=True)
            first.append(time.monotonic() - start)
            for _ in range(commands):
                t = time.monotonic()
                vm.run("true")
                rtts.append((time.monotonic() - t) * 1000)
        finally:
            vm.destroy()
    out = Results()
    out.add("boot_to_ready_s", ready, "s")
    out.add("boot_to_first_command_s", first, "s")
    out.add("command_rtt_ms", rtts, "ms")
    out.info["accel"] = run.host(host).caps.accel
    return out


def measure_migrations(run: KvmRun, hops: int) -> Results:
    """A 512 MiB tiny guest moved ``hops`` times along a chain per mode (one boot per mode)."""
    host = run.host("local")
    out = Results()
    for mode, caps in (("precopy", ()), ("multifd", ("multifd",)), ("postcopy", ("postcopy-ram",))):
        vm = run.new_vm("local", VMSpec(memory_mib=512, balloon=True))
        vms, totals, downtimes = [vm], [], []
        try:
            vm.boot()
            for _ in range(hops):
                dest = run.new_vm(host.name, destination_spec(vm, extra_args=("-incoming", "defer")))
                vms.append(dest)
                uri = listen(dest.start(), host.spec.migration_address, caps)
                numbers = stats(migrate(vm, uri, capabilities=caps, destination=dest))
                totals.append(numbers["total_time_ms"])
                downtimes.append(numbers["downtime_ms"])
                vm.destroy()
                vm = dest
        finally:
            for v in vms:
                v.destroy()
        out.add(f"migration_{mode}_total_ms", totals, "ms")
        out.add(f"migration_{mode}_downtime_ms", downtimes, "ms")
    return out


def measure_suite(extra: list[str], name: str) -> Results:
    """One run of the suites: its wall time, and each suite's test durations (from its run record)."""
    with tempfile.TemporaryDirectory(prefix="kc-bench-") as tmp:
        record = Path(tmp) / "run.json"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "suites"),
                               f"--kvm-record={record}", *extra], capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - start
        tests = json.loads(record.read_text())["tests"] if record.exists() else []
    out = Results()
    out.add(f"{name}_wall_s", [wall], "s")
    by_suite: dict[str, list[float]] = {}
    for t in tests:
        if t["verdict"] != "SKIP" and t.get("duration_s") is not None:
            by_suite.setdefault(t["feature"], []).append(t["duration_s"])
    for feature, durations in sorted(by_suite.items()):
        out.add(f"{name}_{feature.removeprefix('test_')}_test_s", durations, "s")
    lines = proc.stdout.strip().splitlines()
    out.info[f"{name}_args"] = " ".join(extra) or "(serial)"
    out.info[f"{name}_summary"] = lines[-1] if lines else proc.stderr[-300:]
    return out


def measure_lab(boots: int, commands: int, full_suite: bool) -> Results:
    """The virtual KVM lab: 2 hosts up (image cached), a guest on a lab host, the suites there."""
    from pytest_kvmcheck.hosts.spec import parse_hosts
    from pytest_kvmcheck.lab.control import Lab
    from pytest_kvmcheck.lab.image import build_lab_image
    lab = Lab()
    lab.down()
    out = Results()
    start = time.monotonic()
    build_lab_image()
    out.add("lab_image_build_or_reuse_s", [time.monotonic() - start], "s")
    start = time.monotonic()
    hosts = lab.up(2)
    out.add("lab_up_2_hosts_s", [time.monotonic() - start], "s")
    out.add("lab_host_boot_to_ssh_ready_s", [h.ready_s for h in hosts], "s")
    run = KvmRun.create(parse_hosts("lab"), accel="auto")
    try:
        out.update(measure_boots(run, boots, commands, "lab-1"), "lab_guest_")
    finally:
        run.finish()
    if full_suite:
        out.update(measure_suite(["--kvm-hosts=lab", "--kvm-spread", "-n", "2", "--dist", "loadscope"],
                                 "lab_suite_parallel"))
    return out


def compare_with(baseline: dict, results: Results) -> list[MetricChange]:
    """Each metric both have, decided as kvmcheck compare decides a run's metrics. A baseline
    of the first format (medians, no samples) gives one sample per metric."""
    old = baseline.get("metrics") or {k: {"unit": "", "direction": "lower", "samples": [v]}
                                      for k, v in baseline.items() if isinstance(v, (int, float))}
    return [MetricChange("bench", name, m["unit"], m["direction"], old[name]["samples"], m["samples"],
                         DEFAULT_THRESHOLD).decide()
            for name, m in results.metrics.items() if name in old and old[name]["samples"] and m["samples"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=5, help="guest boots (5 against 5 is the least a p < 0.01 needs)")
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--json", default=None, help="where the results go (default reports/bench.json, "
                    "reports/bench-lab.json with --lab)")
    ap.add_argument("--hops", type=int, default=5, help="migrations per mode (512 MiB guest)")
    ap.add_argument("--no-suite", action="store_true")
    ap.add_argument("--baseline", help="a saved bench JSON to compare with")
    ap.add_argument("--lab", action="store_true",
                    help="measure the virtual KVM lab instead: up, a guest on a lab host, the suites there (leaves it up)")
    args = ap.parse_args()
    target = args.json or str(ROOT / "reports" / ("bench-lab.json" if args.lab else "bench.json"))
    if args.lab:
        results = measure_lab(args.boots, args.commands, not args.no_suite)
    else:
        results = Results()
        run = KvmRun.create([parse_host("local")], accel="auto")
        try:
            results.update(measure_boots(run, args.boots, args.commands))
            results.update(measure_migrations(run, args.hops))
        finally:
            run.finish()
        if not args.no_suite:
            results.update(measure_suite([], "suite_serial"))
            results.update(measure_suite(["-n", "2", "--dist", "loadscope"], "suite_parallel"))
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    return report(results, target, baseline)


def report(results: Results, json_path: str, baseline: dict | None = None) -> int:
    results.info["machine"] = (f"{platform.node()} {platform.machine()}, "
                               f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs")
    width = max(map(len, [*results.metrics, *results.info]))
    status = 0
    for name, m in results.metrics.items():
        samples = m["samples"]
        line = f"{name:<{width}}  {statistics.median(samples):10.3f} {m['unit']:<3} median of {len(samples)}"
        if name in BUDGETS_S:
            over = statistics.median(samples) > BUDGETS_S[name]
            status |= over
            line += f"  budget {BUDGETS_S[name]} s: {'OVER' if over else 'within'}"
        print(line)
    for key, value in results.info.items():
        print(f"{key:<{width}}  {value}")
    if baseline is not None:
        changes = compare_with(baseline, results)
        print(f"\ncompared with the baseline ({len(changes)} metrics in both):")
        for change in changes:
            print(f"  {change.outcome:<15} {change.describe()}")
        status |= any(c.outcome == "regression" for c in changes)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(results.document(), indent=2))
    print(f"written to {json_path}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
