"""Benchmarks on the local host (not a timed test): how fast the product's basic moves are.

    python benchmarks/bench.py [--boots 3] [--commands 200] [--json reports/bench.json] [--no-suite]
    python benchmarks/bench.py --lab [--no-suite] [--json reports/bench-lab.json]

Measures the tiny guest's boot-to-ready and boot-to-first-command times, the median guest
command round trip over the persistent connection, live migration total time and downtime
(precopy, multifd, postcopy; 512 MiB guest, loopback), and the wall time of one run of the
suites; prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pytest_kvmcheck.hosts.spec import parse_host
from pytest_kvmcheck.qemu.migration import destination_spec, listen, migrate, stats
from pytest_kvmcheck.run import KvmRun
from pytest_kvmcheck.qemu.spec import VMSpec

ROOT = Path(__file__).resolve().parents[1]


def measure_boots(run: KvmRun, boots: int, commands: int, host: str = "local") -> dict:
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
    return {"boot_to_ready_s": statistics.median(ready), "boot_to_first_command_s": statistics.median(first),
            "command_rtt_median_ms": statistics.median(rtts),
            "command_rtt_p95_ms": sorted(rtts)[int(len(rtts) * 0.95) - 1],
            "boots": boots, "commands_per_boot": commands, "accel": run.host(host).caps.accel}


def measure_migrations(run: KvmRun, hops: int) -> dict:
    """A 512 MiB tiny guest moved ``hops`` times along a chain per mode (one boot per mode)."""
    host = run.host("local")
    out = {}
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
        out[f"migration_{mode}_total_ms_median"] = statistics.median(totals)
        out[f"migration_{mode}_downtime_ms_median"] = statistics.median(downtimes)
        out[f"migration_{mode}_downtime_ms_max"] = max(downtimes)
    out["migration_hops_per_mode"] = hops
    return out


def measure_suite(extra: list[str]) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "suites"),
                           *extra], capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - start
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return {"suite_wall_s": wall, "suite_args": " ".join(extra) or "(serial)", "suite_summary": summary}


def measure_lab(boots: int, commands: int, full_suite: bool) -> dict:
    """The virtual KVM lab: 2 hosts up (image cached), a guest on a lab host, the suites there."""
    from pytest_kvmcheck.hosts.spec import parse_hosts
    from pytest_kvmcheck.lab.control import Lab
    lab = Lab()
    lab.down()
    lab_image_build = time.monotonic()
    from pytest_kvmcheck.lab.image import build_lab_image
    build_lab_image()
    out = {"lab_image_build_or_reuse_s": time.monotonic() - lab_image_build}
    start = time.monotonic()
    hosts = lab.up(2)
    out["lab_up_2_hosts_s"] = time.monotonic() - start
    out["lab_host_boot_to_ssh_ready_s_max"] = max(h.ready_s for h in hosts)
    run = KvmRun.create(parse_hosts("lab"), accel="auto")
    try:
        out.update({f"lab_guest_{k}": v for k, v in measure_boots(run, boots, commands, "lab-1").items()})
    finally:
        run.finish()
    if full_suite:
        suite = measure_suite(["--kvm-hosts=lab", "-n", "2", "--dist", "loadscope"])
        out.update({f"lab_{k}": v for k, v in suite.items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--commands", type=int, default=200)
    ap.add_argument("--json", default=str(ROOT / "reports" / "bench.json"))
    ap.add_argument("--hops", type=int, default=5, help="migrations per mode (512 MiB guest)")
    ap.add_argument("--no-suite", action="store_true")
    ap.add_argument("--lab", action="store_true",
                    help="measure the virtual KVM lab instead: up, a guest on a lab host, the suites there (leaves it up)")
    args = ap.parse_args()
    if args.lab:
        return report(measure_lab(args.boots, args.commands, not args.no_suite), args.json)
    run = KvmRun.create([parse_host("local")], accel="auto")
    try:
        results = measure_boots(run, args.boots, args.commands)
        results.update(measure_migrations(run, args.hops))
    finally:
        run.finish()
    if not args.no_suite:
        results.update(measure_suite([]))
        parallel = measure_suite(["-n", "auto", "--dist", "loadscope"])
        results["suite_parallel_wall_s"] = parallel["suite_wall_s"]
        results["suite_parallel_summary"] = parallel["suite_summary"]
    return report(results, args.json)


def report(results: dict, json_path: str) -> int:
    results["machine"] = f"{platform.node()} {platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs"
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(results, indent=2))
    print(f"written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
