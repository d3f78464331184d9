"""Benchmark (not a timed test): how long a fresh lab takes to get the tiny guest's files, the
start of every first run after ``kvmcheck lab up`` (and of every run after the image changed).

    python benchmarks/place.py [--rounds 3] [--json reports/bench-place.json]

Places the tiny image's files (kernel, both initramfs, the network probe) on each lab host at
once, as a run's host preparation does, under a name of the benchmark's own, and removes them.
Prints each round's seconds until the last host had them, and the median.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pytest_kvmcheck.hosts.connect import connect
from pytest_kvmcheck.hosts.footprint import place_files
from pytest_kvmcheck.hosts.spec import parse_hosts
from pytest_kvmcheck.images.tiny import build_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    tiny = build_tiny()
    files = {"vmlinux": str(tiny.kernel), "initrd.img": str(tiny.initrd), "initrd-kvm.img": str(tiny.initrd_kvm),
             "kvmcheck-net": str(tiny.net_probe)}
    hosts = [connect(spec) for spec in parse_hosts("lab")]
    samples = []
    try:
        for round_ in range(args.rounds):
            name = f"bench-place-{secrets.token_hex(4)}"
            start = time.monotonic()
            with ThreadPoolExecutor(len(hosts)) as pool:
                placed = list(pool.map(place_files, hosts, [name] * len(hosts), [files] * len(hosts),
                                       [("kvmcheck-net",)] * len(hosts)))
            samples.append(time.monotonic() - start)
            print(f"round {round_ + 1}: {samples[-1]:.1f} s for {len(hosts)} hosts")
            for host, paths in zip(hosts, placed, strict=True):
                host.run(["rm", "-rf", paths["vmlinux"].rsplit("/", 1)[0]]).check()
    finally:
        for host in hosts:
            host.close()
    print(f"median {statistics.median(samples):.1f} s ({', '.join(f'{s:.1f}' for s in samples)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"place_tiny_s": samples}, f)


if __name__ == "__main__":
    main()
