"""The virtual KVM lab's host image: a Debian root booted as one initramfs.

The recipe lives in ``fixtures/lab``. mmdebstrap installs the packages from the system's
configured sources; the kernel's modules are cut to what a KVM host needs (through
modules.dep); busybox init runs ``lab-init.sh``, which brings up the network, sshd and the
shared storage, without systemd, so a lab host is reachable a few seconds after QEMU starts.
Packed uncompressed (unpacking under TCG costs more than reading a bigger file) and cached
by content hash like every image here.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError
from ..images.build import (CpioWriter, KernelImage, apt_source_files, cached_build, load_recipe,
                             module_closure, pvh_kernel, run_tool)
from ..paths import fixtures_dir

SHARED_MARKER = "KVMCHECK-SHARED"


@dataclass(frozen=True)
class LabImage(KernelImage):
    """The lab host image; its host key goes into the lab's known_hosts."""

    kernel_args: str = ""

    @classmethod
    def load(cls, directory: Path) -> "LabImage":
        m = json.loads((directory / "manifest.json").read_text())
        return cls(directory, m["digest"], m["kernel_version"], m["kernel_args"])


def _candidate_versions(packages: list[str]) -> str:
    """What apt would install now: a package update makes a new image."""
    out = subprocess.run(["apt-cache", "policy", *packages], capture_output=True, text=True).stdout
    return "\n".join(line.strip() for line in out.splitlines() if line.strip().startswith(("Candidate:", "linux")))


def lab_digest(recipe: dict) -> str:
    h = hashlib.sha256()
    recipe_dir = fixtures_dir() / "lab"
    for name in sorted(os.listdir(recipe_dir)):
        h.update(name.encode() + (recipe_dir / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(_candidate_versions(recipe["packages"]).encode())
    return h.hexdigest()[:16]


def build_lab_image(force: bool = False, progress=None) -> LabImage:
    """Return the cached lab host image, building it first (about a minute and a half) if needed."""
    say = progress or (lambda msg: None)
    recipe = load_recipe("lab")
    digest = lab_digest(recipe)

    def build(work: Path) -> Path:
        if os.geteuid() != 0:
            raise ImageBuildError("building the lab host image needs root (mmdebstrap makes device nodes "
                                  "and root-owned files)")
        if shutil.which("mmdebstrap") is None:
            raise ImageBuildError("building the lab host image needs mmdebstrap: apt-get install mmdebstrap")
        say(f"building the lab host image {digest}: mmdebstrap {recipe['suite']} with "
            f"{len(recipe['packages'])} packages (about a minute)")
        _build_lab_into(work, recipe, digest, say)
        return work / "out"
    return LabImage.load(cached_build("lab", f"lab-{digest}", build, force))


def _drop(root: Path, patterns: list[str]) -> None:
    for pattern in patterns:
        parent, _, leaf = pattern.rpartition("/")
        base = root / parent
        if not base.is_dir():
            continue
        for entry in base.iterdir():
            if fnmatch.fnmatch(entry.name, leaf):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _build_lab_into(work: Path, recipe: dict, digest: str, say) -> None:
    recipe_dir = fixtures_dir() / "lab"
    root = work / "root"
    run_tool(["mmdebstrap", "--quiet", f"--variant={recipe['variant']}", "--include=" + ",".join(recipe["packages"]),
          "--dpkgopt=path-exclude=/usr/share/doc/*", recipe["suite"], str(root), *apt_source_files()],
         timeout=1800)
    moddirs = sorted((root / "usr/lib/modules").iterdir())
    if not moddirs:
        raise ImageBuildError("the lab root has no kernel modules: is linux-image-amd64 in the recipe?")
    kver = moddirs[-1].name
    say(f"keeping the modules a KVM host needs (kernel {kver})")
    moddir = moddirs[-1]
    keep = set(module_closure((moddir / "modules.dep").read_text(), recipe["modules"]))
    for path in list(moddir.rglob("*.ko*")):
        if str(path.relative_to(moddir)) not in keep:
            path.unlink()
    run_tool(["depmod", "-b", str(root), kver])
    kernel = root / "boot" / f"vmlinuz-{kver}"
    out = work / "out"
    out.mkdir()
    shutil.copy2(kernel, out / "vmlinuz")
    _drop(root, recipe.get("drop", []))

    etc = root / "etc"
    (etc / "kvmcheck").mkdir(exist_ok=True)
    shutil.copy2(recipe_dir / "lab-init.sh", etc / "kvmcheck/lab-init.sh")
    os.chmod(etc / "kvmcheck/lab-init.sh", 0o755)
    (etc / "kvmcheck/modules").write_text("\n".join(recipe["load"]) + "\n")
    shutil.copy2(recipe_dir / "inittab", etc / "inittab")
    shutil.copy2(recipe_dir / "sshd_config", etc / "ssh/sshd_config")
    for old in (etc / "ssh").glob("ssh_host_*"):
        old.unlink()
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmcheck-lab",
          "-f", str(etc / "ssh/ssh_host_ed25519_key")])
    shutil.copy2(etc / "ssh/ssh_host_ed25519_key.pub", out / "host_key.pub")
    (etc / "fstab").write_text("")
    (root / "init").unlink(missing_ok=True)
    os.symlink("/usr/bin/busybox", root / "init")

    say("packing the lab host initramfs")
    cpio = CpioWriter()
    cpio.add_tree(root)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3)
    (out / "initrd.img").write_bytes(cpio.finish())
    elf = pvh_kernel(out / "vmlinuz")
    if elf is not None:
        (out / "vmlinux").write_bytes(elf)
    (out / "manifest.json").write_text(json.dumps({
        "digest": digest, "kernel_version": kver, "kernel_args": recipe["kernel_args"],
        "modules": len(keep), "initrd_bytes": (out / "initrd.img").stat().st_size,
    }, indent=2))
