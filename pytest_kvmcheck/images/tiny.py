"""The ``tiny`` guest: a Debian kernel, a busybox initramfs and dropbear.

The recipe lives in ``fixtures/tiny``. The kernel package is fetched with ``apt-get
download``; the programs are taken from installed Debian packages together with the shared
libraries they link. The first run builds it (about 10 s); later runs reuse the cached copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError
from ..paths import fixtures_dir
from . import build as _build
from .build import (CpioWriter, KernelImage, cached_build, load_recipe, module_closure, package_version, pvh_kernel,
                    resolve_kernel_package, run_tool, shared_libraries)

HOST_KEY_NAME = "dropbear_ed25519_host_key"


@dataclass(frozen=True)
class TinyImage(KernelImage):
    """The tiny guest: a Debian kernel with a busybox initramfs and dropbear."""

    @classmethod
    def load(cls, directory: Path) -> "TinyImage":
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory, manifest["digest"], manifest["kernel_version"])

    @property
    def placement_name(self) -> str:
        """The image's dir on a host (under ``<workdir>/images``): its digest, and its host key's.

        Two builds of one digest differ in their generated host key; a host that kept the first
        build's copy would boot guests presenting a key the run does not expect (ERROR: "its SSH
        host key is not the image's"), so the copy is named after the key too."""
        return f"tiny-{self.digest}-{hashlib.sha256(self.host_public_key.encode()).hexdigest()[:8]}"

    @property
    def initrd_kvm(self) -> Path:
        """The initramfs with the KVM modules too, for a guest that is a KVM host (VMSpec.guest_kvm)."""
        return self.directory / "initrd-kvm.img"

    @property
    def net_probe(self) -> Path:
        """kvmcheck-net, the static program the guest has too: the host's end of network measurements."""
        return self.directory / "kvmcheck-net"


def _digest(recipe_dir: Path, kernel_pkg: str, recipe: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(recipe_dir)):
        h.update(name.encode() + (recipe_dir / name).read_bytes())
    h.update(Path(__file__).read_bytes() + Path(_build.__file__).read_bytes())
    h.update(kernel_pkg.encode())
    for package in sorted(recipe.get("programs", {})) + sorted(recipe.get("data", {})):
        h.update(f"{package}={package_version(package)}".encode())
    return h.hexdigest()[:16]


def build_tiny(force: bool = False, progress=None) -> TinyImage:
    """Return the cached tiny image, building it first if its inputs changed (about 6 s)."""
    say = progress or (lambda msg: None)
    recipe_dir = fixtures_dir() / "tiny"
    recipe = load_recipe("tiny")
    kernel_pkg = resolve_kernel_package(recipe["kernel_package"])
    digest = _digest(recipe_dir, kernel_pkg, recipe)

    def build(work: Path) -> Path:
        say(f"building the tiny guest image {digest} (kernel {kernel_pkg})")
        _build_into(work, recipe_dir, recipe, kernel_pkg, digest, say)
        return work / "out"
    return TinyImage.load(cached_build("tiny", f"tiny-{digest}", build, force))


def _build_into(work: Path, recipe_dir: Path, recipe: dict, kernel_pkg: str, digest: str, say) -> None:
    debs = work / "debs"
    debs.mkdir()
    say(f"apt-get download {kernel_pkg}")
    run_tool(["apt-get", "download", kernel_pkg], cwd=debs)
    deb = next(debs.glob("*.deb"))
    kroot = work / "kernel"
    run_tool(["dpkg-deb", "-x", str(deb), str(kroot)])
    kver = next((kroot / "lib/modules").iterdir()).name
    run_tool(["depmod", "-b", str(kroot), kver])
    moddir = kroot / "lib/modules" / kver
    kvm_modules = recipe.get("kvm_modules", {})
    modules_dep = (moddir / "modules.dep").read_text()
    modules = module_closure(modules_dep, [*recipe["modules"], *recipe.get("device_modules", []),
                                           *sorted(set(kvm_modules.values()))])
    # The KVM modules (4 of 17.8 MB) go only into initrd-kvm.img, for guests that are KVM hosts.
    kvm_only = set(modules) - set(module_closure(modules_dep, [*recipe["modules"], *recipe.get("device_modules", [])]))

    root = work / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/dropbear", "etc/kvmcheck", "root/.ssh",
              "proc", "sys", "dev", "tmp", "run", "var/log", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)

    def copy(src: str) -> None:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)

    stubs = recipe.get("stubs", {})
    for package, programs in recipe.get("programs", {}).items():
        package_version(package)  # fails with an install hint if missing
        for prog in programs:
            copy(prog)
            for lib in shared_libraries(prog, stubbed=stubs):
                copy(lib)
    for package, files in recipe.get("data", {}).items():
        package_version(package)
        for f in files:
            copy(f)
    if (stubs or recipe.get("compiled")) and shutil.which("gcc") is None:
        raise ImageBuildError("the tiny guest's probes and library stand-ins are built with gcc: "
                              "apt-get install gcc libc6-dev")
    libdir = next(root.glob("lib/*/libc.so.6")).parent
    for name, (source, version) in stubs.items():
        script = work / f"{name}.map"
        script.write_text(f"{version} {{ global: *; }};\n")
        run_tool(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-s", f"-Wl,-soname,{name}",
                  f"-Wl,--version-script={script}", "-o", str(libdir / name), str(recipe_dir / source)])
    statics = work / "static"
    statics.mkdir()
    for source, target in recipe.get("compiled", {}).items():
        program = root / target.lstrip("/")
        run_tool(["gcc", "-O2", "-Wall", "-s", "-o", str(program), str(recipe_dir / source)])
        for lib in shared_libraries(str(program)):
            copy(lib)
        run_tool(["gcc", "-static", "-O2", "-Wall", "-s", "-o", str(statics / program.name), str(recipe_dir / source)])
    # /lib64 loader path and /lib -> usr merge as Debian has it.
    if (root / "lib/x86_64-linux-gnu").is_dir() and not (root / "lib64").exists():
        (root / "lib64").mkdir()
        loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        if loader.exists():
            os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")

    # busybox applets, except those a real program provides (and never "busybox" itself).
    applets = run_tool([str(root / "bin/busybox"), "--list-full"]).split()
    provided = {p.name for d in ("bin", "sbin", "usr/bin", "usr/sbin") for p in (root / d).iterdir()}
    for applet in applets:
        name = Path(applet).name
        if name == "busybox" or name in provided:
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink("/bin/busybox", link)

    # Kernel modules through modules.dep, then depmod over the reduced tree.
    kmods = root / "lib/modules" / kver
    for rel in modules:
        dst = kmods / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dst)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / f).exists():
            shutil.copy2(moddir / f, kmods / f)
    run_tool(["depmod", "-b", str(root), kver])
    (root / "etc/kvmcheck/modules").write_text("\n".join(recipe["modules"]) + "\n")
    (root / "etc/kvmcheck/kvm-modules").write_text("".join(f"{vendor} {m}\n" for vendor, m in kvm_modules.items()))

    # Users, init, host key.
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")  # no password can log in
    (root / "etc/shells").write_text("/bin/sh\n")
    shutil.copy2(recipe_dir / "inittab", root / "etc/inittab")
    shutil.copy2(recipe_dir / "init.sh", root / "etc/kvmcheck/init.sh")
    os.chmod(root / "etc/kvmcheck/init.sh", 0o755)
    os.symlink("/bin/busybox", root / "init")
    hostkey = root / "etc/dropbear" / HOST_KEY_NAME
    keyout = run_tool(["dropbearkey", "-t", "ed25519", "-f", str(hostkey)])
    pub = next(line for line in keyout.splitlines() if line.startswith("ssh-ed25519 "))

    say(f"packing the initramfs ({len(modules)} modules, {len(kvm_only)} of them for KVM hosts alone)")
    kvm_root = work / "kvm-root"
    for rel in kvm_only:
        moved = kvm_root / kmods.relative_to(root) / rel
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kmods / rel, moved)
    cpio = CpioWriter()
    cpio.add_tree(root)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3)
    kvm_part = CpioWriter()
    kvm_part.add_tree(kvm_root)
    out = work / "out"
    out.mkdir()
    # Uncompressed: unpacking a gzip initramfs under TCG costs more than reading the bigger file,
    # and a nested guest unpacks it at about 15 MB a second, on every boot. A KVM host's guest
    # gets the KVM modules as a second archive after the first (the kernel unpacks both).
    base = cpio.finish()
    (out / "initrd.img").write_bytes(base)
    (out / "initrd-kvm.img").write_bytes(base + kvm_part.finish())
    shutil.copy2(kroot / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    elf = pvh_kernel(out / "vmlinuz")
    if elf is not None:
        (out / "vmlinux").write_bytes(elf)
    (out / "host_key.pub").write_text(pub.strip() + "\n")
    for target in recipe.get("compiled", {}).values():
        shutil.copy2(statics / os.path.basename(target), out / os.path.basename(target))
    (out / "manifest.json").write_text(json.dumps({
        "digest": digest, "kernel_package": kernel_pkg, "kernel_version": kver,
        "modules": modules, "kvm_only_modules": sorted(kvm_only), "initrd_bytes": (out / "initrd.img").stat().st_size,
    }, indent=2))
