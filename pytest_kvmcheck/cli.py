"""``kvmcheck``: the command line next to the plugin.

    kvmcheck image build [--force]        build (or reuse) the tiny guest image
    kvmcheck image build --cloud          build (or reuse) a Debian qcow2 cloud image
    kvmcheck cleanup [--kvm-hosts=...]    remove every run's leftovers on the hosts, kept VMs too
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
    args = parser.parse_args(argv)
    try:
        if args.command == "image":
            say = lambda m: print(f"kvmcheck: {m}", file=sys.stderr)  # noqa: E731
            if args.cloud:
                from .cloudimage import build_cloud
                cloud = build_cloud(force=args.force, progress=say)
                print(f"cloud image: {cloud.path}\n  use it with: pytest suites --kvm-guest={cloud.path}")
            else:
                from .image import build_tiny
                img = build_tiny(force=args.force, progress=say)
                print(f"tiny image {img.digest}: kernel {img.kernel_version}\n  {img.kernel}\n  {img.initrd}")
        elif args.command == "cleanup":
            from .hostspec import parse_hosts
            from .run import reap_stale_runs
            from .transport import connect
            for spec in parse_hosts(args.kvm_hosts):
                host = connect(spec)
                try:
                    notes = reap_stale_runs(host, everything=True)
                finally:
                    host.close()
                print(f"host {spec.name}: " + ("; ".join(notes) if notes else "nothing left behind"))
            from .session import remove_dead_state_dirs
            for path in remove_dead_state_dirs(including_kept=True):
                print(f"removed the local state of a finished run: {path}")
    except KvmCheckError as exc:
        print(f"kvmcheck: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
