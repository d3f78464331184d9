"""``kvmcheck``: the command line next to the plugin.

    kvmcheck image build [--force]        build (or reuse) the tiny guest image
    kvmcheck image build --cloud          build (or reuse) a Debian qcow2 cloud image
    kvmcheck cleanup [--kvm-hosts=...]    remove every run's leftovers on the hosts, kept VMs too
    kvmcheck lab up [--hosts N]           boot the virtual KVM lab (nested KVM hosts under TCG)
    kvmcheck lab status                   each lab host: alive, reachable, KVM, nested, shared storage
    kvmcheck lab down                     stop the lab and remove everything it made
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
    cleanup = sub.add_parser("cleanup", help="kill leftover QEMU processes and remove run dirs on the hosts")
    cleanup.add_argument("--kvm-hosts", default="local", help="as for pytest (default: local)")
    lab = sub.add_parser("lab", help="the virtual KVM lab: KVM hosts for machines without VT-x/AMD-V")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_up = lab_sub.add_parser("up", help="build the lab image if needed and boot the hosts")
    lab_up.add_argument("--hosts", type=int, default=2, help="how many lab hosts (default 2)")
    lab_up.add_argument("--memory", type=int, default=4096, help="MiB of RAM per lab host (default 4096)")
    lab_up.add_argument("--cpus", type=int, default=1,
                        help="vCPUs per lab host (default 1: with more, 6.1 kernels under multi-threaded TCG can livelock in text patching when KVM starts guests)")
    lab_sub.add_parser("status", help="show each lab host")
    lab_sub.add_parser("down", help="stop the lab; leaves no process, device, namespace or dir")
    args = parser.parse_args(argv)
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
        elif args.command == "cleanup":
            from .hosts.spec import parse_hosts
            from .hosts.footprint import reap_stale_runs
            from .hosts.connect import connect
            for spec in parse_hosts(args.kvm_hosts):
                host = connect(spec)
                try:
                    notes = reap_stale_runs(host, everything=True)
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


def _lab(args) -> int:
    from .lab.control import Lab
    from .paths import lab_inventory
    lab = Lab(progress=lambda m: print(f"kvmcheck lab: {m}", file=sys.stderr, flush=True))
    if args.lab_command == "up":
        hosts = lab.up(args.hosts, memory_mib=args.memory, cpus=args.cpus)
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
    else:
        for note in lab.down() or ["nothing to do: the lab is down"]:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
