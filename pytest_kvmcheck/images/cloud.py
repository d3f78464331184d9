"""Disk-image guests: a qcow2 cloud image booted with a cloud-init NoCloud seed.

``--kvm-guest=IMAGE.qcow2`` boots the user's image (its own bootloader, its own kernel)
from a per-VM overlay, with a seed ISO that authorizes the run's key for root, installs
the run's guest host key (so the guest is verified, never trusted on first use), turns
password logins off, and prints the ready marker on the serial console once cloud-init
is done. ``kvmcheck image build --cloud`` makes such an image from Debian packages.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError, KvmCheckError
from ..paths import fixtures_dir
from .build import READY_MARKER, apt_source_files, cached_build, load_recipe, run_tool

QCOW2_MAGIC = b"QFI\xfb"


class CloudImageError(KvmCheckError, ValueError):
    """The file given as a cloud image is not usable."""


@dataclass(frozen=True)
class CloudImage:
    """A user's qcow2 cloud image on the controller, identified by content-ish digest."""

    path: Path
    digest: str

    @classmethod
    def open(cls, path: str | Path) -> "CloudImage":
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise CloudImageError(f"{path}: no such file (give 'tiny' or the path of a qcow2 cloud image)")
        with p.open("rb") as f:
            if f.read(4) != QCOW2_MAGIC:
                raise CloudImageError(f"{path}: not a qcow2 image (convert it: qemu-img convert -O qcow2 IN OUT)")
        st = p.stat()
        digest = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return cls(p, digest)


def user_data(authorized_key: str, host_key_private: str, host_key_public: str) -> str:
    """cloud-config: root by the run's key only, the run's host key, a ready marker."""
    private = "".join(f"    {line}\n" for line in host_key_private.strip().splitlines())
    return (
        "#cloud-config\n"
        "disable_root: false\n"
        "ssh_pwauth: false\n"
        "ssh_deletekeys: true\n"
        "ssh_genkeytypes: []\n"
        "users:\n"
        "  - name: root\n"
        "    lock_passwd: true\n"
        "    ssh_authorized_keys:\n"
        f"      - {authorized_key.strip()}\n"
        "ssh_keys:\n"
        "  ed25519_private: |\n"
        f"{private}"
        f"  ed25519_public: {host_key_public.strip()}\n"
        "runcmd:\n"
        f"  - [ sh, -c, 'echo {READY_MARKER} $(cut -d\" \" -f1 /proc/uptime) > /dev/ttyS0' ]\n"
    )


def seed_iso(output: Path, instance_id: str, authorized_key: str, host_key_private: str,
             host_key_public: str) -> Path:
    """Write a NoCloud seed ISO (volume id 'cidata') with avocado's ISO 9660 writer."""
    from avocado.utils import iso9660
    iso = iso9660.iso9660(str(output), ["create", "write"])
    if iso is None:
        raise ImageBuildError("cannot write ISO images: install pycdlib (a dependency of pytest-kvmcheck)")
    iso.create(flags={"interchange_level": 3, "joliet": 3, "vol_ident": "cidata"})
    iso.write("/meta-data", f"instance-id: {instance_id}\nlocal-hostname: kvmcheck-guest\n".encode())
    iso.write("/user-data", user_data(authorized_key, host_key_private, host_key_public).encode())
    iso.close()
    return output


# --------------------------------------------------------------------------- building one

def build_cloud(force: bool = False, progress=None) -> CloudImage:
    """Build (or reuse) a Debian cloud-style qcow2 from the configured package sources.

    Needs root (mmdebstrap, a loop mount for extlinux) and about 2-3 minutes once.
    """
    say = progress or (lambda msg: None)
    recipe = load_recipe("cloud")
    digest = hashlib.sha256((fixtures_dir() / "cloud" / "recipe.toml").read_bytes() +
                            Path(__file__).read_bytes()).hexdigest()[:16]

    def build(work: Path) -> Path:
        if os.geteuid() != 0:
            raise ImageBuildError("building the cloud image needs root (mmdebstrap, a loop mount for extlinux)")
        for tool in ("mmdebstrap", "extlinux", "mkfs.ext4", "losetup"):
            if shutil.which(tool) is None:
                raise ImageBuildError(f"building the cloud image needs {tool}: apt-get install mmdebstrap "
                                      "extlinux e2fsprogs mount")
        _build_cloud_into(work, recipe, say)
        return work / "disk.qcow2"
    return CloudImage.open(cached_build("cloud", f"cloud-{digest}.qcow2", build, force))


def _build_cloud_into(work: Path, recipe: dict, say) -> None:
    tar = work / "rootfs.tar"
    say(f"mmdebstrap {recipe['suite']} with {len(recipe['packages'])} packages (a few minutes)")
    run_tool(["mmdebstrap", "--quiet", f"--variant={recipe['variant']}", "--include=" + ",".join(recipe["packages"]),
          recipe["suite"], str(tar), *apt_source_files()], timeout=1800)
    raw, mnt = work / "disk.raw", work / "mnt"
    mnt.mkdir()
    run_tool(["qemu-img", "create", "-q", "-f", "raw", str(raw), recipe["size"]])
    run_tool(["mkfs.ext4", "-q", "-F", "-L", "root", str(raw)])
    loop = run_tool(["losetup", "--find", "--show", str(raw)]).strip()
    try:
        run_tool(["mount", loop, str(mnt)])
        try:
            run_tool(["tar", "-C", str(mnt), "-xf", str(tar)], timeout=600)
            kernel = sorted((mnt / "boot").glob("vmlinuz-*"))[-1].name
            initrd = sorted((mnt / "boot").glob("initrd.img-*"))[-1].name
            (mnt / "boot/extlinux").mkdir(parents=True, exist_ok=True)
            (mnt / "boot/extlinux/extlinux.conf").write_text(
                f"DEFAULT linux\nTIMEOUT 1\nPROMPT 0\nLABEL linux\n  KERNEL /boot/{kernel}\n"
                f"  INITRD /boot/{initrd}\n  APPEND {recipe['kernel_args']}\n")
            (mnt / "etc/fstab").write_text("LABEL=root / ext4 defaults 0 1\n")
            (mnt / "etc/hostname").write_text("kvmcheck-cloud\n")
            (mnt / "etc/cloud/cloud.cfg.d/90-kvmcheck.cfg").write_text("datasource_list: [ NoCloud, None ]\n")
            # Unpartitioned disk: extlinux's boot sector is the filesystem's first sector.
            run_tool(["extlinux", "--install", str(mnt / "boot/extlinux")])
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    say("converting to a compressed qcow2")
    run_tool(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(work / "disk.qcow2")], timeout=900)
