"""``kvmcheck``: the command line next to the plugin.

    kvmcheck image build [--force]        build (or reuse) the tiny guest image
    kvmcheck image build --cloud          build (or reuse) a Debian qcow2 cloud image
    kvmcheck doctor [--kvm-hosts=...]     what each host has of what the suites need, and what to do;
                                          exit 1 if a host cannot run the suites at all
    kvmcheck cleanup [--kvm-hosts=...]    remove every run's leftovers on the hosts, kept VMs too
    kvmcheck lab up [--hosts N] [--other-qemu PREFIX]  boot the virtual KVM lab (nested KVM hosts under TCG)
    kvmcheck lab status                   each lab host: alive, reachable, KVM, nested, shared storage
    kvmcheck lab power-cycle NAME         cut lab-power's power and boot it again (its disk stays)
    kvmcheck lab down                     stop the lab and remove everything it made
    kvmcheck compare BASELINE CANDIDATE   what changed between two runs (run.json or report dirs);
                                          exit 1 on any regression
    kvmcheck matrix RUN... [-o FILE]      several runs side by side: host x feature x run, one HTML file
"""
from __future__ import annotations

import argparse
import sys

from .errors import KvmCheckError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="guest images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build the tiny guest (cached by content hash)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--cloud", action="store_true",
                       help="build a Debian qcow2 cloud image with cloud-init instead (root, a few minutes)")
    doctor = sub.add_parser("doctor", help="check each host's prerequisites, one row each, with what to do")
    doctor.add_argument("--kvm-hosts", default="local", help="as for pytest (default: local)")
    doctor.add_argument("--kvm-accel", default="auto", choices=("auto", "kvm", "tcg"), help="as for pytest")
    cleanup = sub.add_parser("cleanup", help="kill leftover QEMU processes and remove run dirs on the hosts")
    cleanup.add_argument("--kvm-hosts", default="local", help="as for pytest (default: local)")
    lab = sub.add_parser("lab", help="the virtual KVM lab: KVM hosts for machines without VT-x/AMD-V")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_up = lab_sub.add_parser("up", help="build the lab image if needed and boot the hosts")
    lab_up.add_argument("--hosts", type=int, default=2, help="how many lab hosts (default 2)")
    lab_up.add_argument("--memory", type=int, default=4096, help="MiB of RAM per lab host (default 4096)")
    lab_up.add_argument("--cpus", type=int, default=1,
                        help="vCPUs per lab host (default 1: with more, 6.1 kernels under multi-threaded TCG can livelock in text patching when KVM starts guests)")
    lab_up.add_argument("--other-qemu", metavar="PREFIX",
                        help="an unpacked QEMU package tree (scripts/qemu-backports.sh's) offered to each host as "
                             "its second QEMU, for version skew")
    lab_sub.add_parser("status", help="show each lab host")
    lab_sub.add_parser("down", help="stop the lab; leaves no process, device, namespace or dir")
    power = lab_sub.add_parser("power-cycle", help="kill a power host's QEMU (its page cache goes) and boot it again")
    power.add_argument("name", help="the lab host (lab-power)")
    cmp = sub.add_parser("compare", help="compare a candidate run with a baseline (exit 1 on a regression)")
    cmp.add_argument("baseline", help="the baseline's run.json, or its report dir")
    cmp.add_argument("candidate", help="the candidate's run.json, or its report dir")
    cmp.add_argument("--host-map", default="", help="OLD=NEW,...: baseline host names as the candidate calls them")
    cmp.add_argument("--threshold", type=float, default=None,
                     help="noise threshold for every metric, as a fraction (default 0.05)")
    cmp.add_argument("--metric-threshold", action="append", default=[], metavar="NAME=FRACTION",
                     help="noise threshold for one metric (repeatable)")
    cmp.add_argument("--html", default="", help="also write the comparison as an HTML page here")
    history = sub.add_parser("matrix", help="several runs side by side (host x feature x run) as one HTML file")
    history.add_argument("runs", nargs="+", help="run.json files or report dirs, oldest first")
    history.add_argument("-o", "--output", default="reports/matrix.html", help="default reports/matrix.html")
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "matrix":
        return _matrix(args)
    try:
        if args.command == "image":
            say = lambda m: print(f"kvmcheck: {m}", file=sys.stderr)  # noqa: E731
            if args.cloud:
                from .images.cloud import build_cloud
                cloud = build_cloud(force=args.force, progress=say)
                print(f"cloud image: {cloud.path}\n  use it with: pytest suites --kvm-guest={cloud.path}")
            else:
                from .images.tiny import build_tiny
                img = build_tiny(force=args.force, progress=say)
                print(f"tiny image {img.digest}: kernel {img.kernel_version}\n  {img.kernel}\n  {img.initrd}")
        elif args.command == "lab":
            return _lab(args)
        elif args.command == "doctor":
            return _doctor(args)
        elif args.command == "cleanup":
            from .hosts.spec import parse_hosts
            from .hosts.footprint import reap_stale_runs
            from .hosts.settings import replay_stale_changes
            from .hosts.connect import connect
            for spec in parse_hosts(args.kvm_hosts):
                host = connect(spec)
                try:
                    notes = reap_stale_runs(host, everything=True) + replay_stale_changes(host)
                finally:
                    host.close()
                print(f"host {spec.name}: " + ("; ".join(notes) if notes else "nothing left behind"))
            from .run import remove_dead_state_dirs
            for path in remove_dead_state_dirs(including_kept=True):
                print(f"removed the local state of a finished run: {path}")
    except KvmCheckError as exc:
        print(f"kvmcheck: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvmcheck: interrupted; nothing it started is left running", file=sys.stderr)
        return 130
    return 0


def _doctor(args) -> int:
    from .doctor import Doctor, render, unusable
    from .hosts.spec import parse_hosts
    rows = Doctor(parse_hosts(args.kvm_hosts), accel=args.kvm_accel,
                  progress=lambda m: print(f"kvmcheck: {m}", file=sys.stderr)).examine()
    print(render(rows))
    return 1 if unusable(rows) else 0


def _compare(args) -> int:
    from pathlib import Path

    from .compare import DEFAULT_THRESHOLD, compare, parse_pairs, render_html, render_text
    from .record import load
    try:
        baseline, candidate = load(args.baseline), load(args.candidate)
        thresholds = {k: float(v) for k, v in parse_pairs(args.metric_threshold, "--metric-threshold").items()}
        host_map = parse_pairs(args.host_map, "--host-map")
    except ValueError as exc:
        print(f"kvmcheck compare: {exc}", file=sys.stderr)
        return 2
    result = compare(baseline, candidate, host_map, thresholds,
                     DEFAULT_THRESHOLD if args.threshold is None else args.threshold)
    print(render_text(result))
    if args.html:
        Path(args.html).write_text(render_html(result))
        print(f"kvmcheck compare: {args.html}")
    return 1 if result.regressed else 0


def _matrix(args) -> int:
    from pathlib import Path

    from .matrix import history_page
    from .record import load
    try:
        runs = [(name, load(name)) for name in args.runs]
    except ValueError as exc:
        print(f"kvmcheck matrix: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(history_page(runs))
    print(f"kvmcheck matrix: {len(runs)} runs -> {out}")
    return 0


def _lab(args) -> int:
    from .lab.control import Lab
    from .paths import lab_inventory
    lab = Lab(progress=lambda m: print(f"kvmcheck lab: {m}", file=sys.stderr, flush=True))
    if args.lab_command == "up":
        hosts = lab.up(args.hosts, memory_mib=args.memory, cpus=args.cpus, other_qemu=args.other_qemu)
        for h in hosts:
            print(f"{h.name}: ssh 127.0.0.1:{h.ssh_port}, private {h.private_ip}, "
                  f"assignable {', '.join(h.assignable) or '-'}, SR-IOV PF {h.sriov_pf or '-'}")
        print(f"inventory: {lab_inventory()}\n  run the suites there with: pytest suites --kvm-hosts=lab")
    elif args.lab_command == "status":
        rows = lab.status()
        if not rows:
            print("the lab is down")
            return 1
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        return 0 if all(r["alive"] and "error" not in r for r in rows) else 1
    elif args.lab_command == "power-cycle":
        lab.power_cycle(args.name)
    else:
        for note in lab.down() or ["nothing to do: the lab is down"]:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
