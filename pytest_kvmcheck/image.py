"""Guest images: the ``tiny`` guest (Debian kernel + busybox initramfs + dropbear).

The recipe lives in ``fixtures/tiny``. Everything comes from the system's configured
Debian package sources: the kernel package is fetched with ``apt-get download``, the
programs are taken from installed Debian packages together with the shared libraries
they link. The result is cached by content hash under the user's cache dir, so the
first run builds it (about 10 s) and later runs reuse it.
"""
from __future__ import annotations

import fcntl
import lzma
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageBuildError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

READY_MARKER = "KVMCHECK-READY"
HOST_KEY_NAME = "dropbear_ed25519_host_key"


def fixtures_dir() -> Path:
    """Where image recipes and example inventories live (``fixtures/`` of the checkout)."""
    env = os.environ.get("KVMCHECK_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "fixtures"


def cache_dir() -> Path:
    base = os.environ.get("KVMCHECK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pytest-kvmcheck")
    return Path(base)


@dataclass(frozen=True)
class KernelImage:
    """A built image booted with -kernel/-initrd: its files and the public half of its SSH host key."""

    directory: Path
    digest: str
    kernel_version: str

    @property
    def kernel(self) -> Path:
        """The uncompressed ELF kernel, booted through its PVH entry point when present.

        Under TCG, decompressing a bzImage costs about 2 s of every boot; the ELF skips it.
        """
        elf = self.directory / "vmlinux"
        return elf if elf.exists() else self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def host_public_key(self) -> str:
        """``ssh-ed25519 AAAA...``: the image's sshd is verified against this, never trusted blindly."""
        return " ".join((self.directory / "host_key.pub").read_text().split()[:2])



@dataclass(frozen=True)
class TinyImage(KernelImage):
    """The tiny guest: a Debian kernel with a busybox initramfs and dropbear."""

    @classmethod
    def load(cls, directory: Path) -> "TinyImage":
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory, manifest["digest"], manifest["kernel_version"])


# --------------------------------------------------------------------------- helpers

def _run(argv: list[str], cwd: str | Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"building the tiny guest needs {argv[0]!r}, which is not installed: "
            "run the README's setup command (it installs the Debian packages)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{' '.join(argv)} took longer than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return proc.stdout


def load_recipe(name: str = "tiny") -> dict:
    path = fixtures_dir() / name / "recipe.toml"
    if not path.is_file():
        raise ImageBuildError(f"no image recipe at {path}: set KVMCHECK_FIXTURES to the fixtures dir")
    return tomllib.loads(path.read_text())


def resolve_kernel_package(metapackage: str) -> str:
    """``linux-image-amd64`` -> ``linux-image-6.1.0-NN-amd64`` via the configured sources."""
    out = _run(["apt-cache", "depends", metapackage])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    raise ImageBuildError(
        f"apt-cache knows no kernel behind {metapackage!r}: run 'apt-get update' first")


def _package_version(package: str) -> str:
    try:
        return _run(["dpkg-query", "-W", "-f=${Version}", package]).strip()
    except ImageBuildError:
        raise ImageBuildError(
            f"the Debian package {package!r} is not installed; the tiny guest takes its "
            f"programs from it: apt-get install {package}") from None


def shared_libraries(binary: str) -> list[str]:
    """The shared objects (with the loader) that ``binary`` links, as ldd resolves them."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
    return libs


def module_closure(modules_dep: str, wanted: list[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and everything they depend on (modules.dep).

    Module names are matched with ``-`` and ``_`` treated alike, as modprobe does;
    names the kernel does not have (built in, or absent) are skipped.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    out: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        out.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path:
            visit(path)
    return out


class CpioWriter:
    """A minimal newc ("070701") archive writer, enough for an initramfs.

    Written here rather than calling cpio(1) so that the archive can hold device
    nodes (/dev/console) without root, and is byte-for-byte reproducible.
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + name_b)
        self._buf.write(b"\0" * ((4 - self._buf.tell() % 4) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * ((4 - self._buf.tell() % 4) % 4))

    def add_dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir != ".":
                self.add_dir(rel_dir)
            for fname in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                full = os.path.join(dirpath, fname)
                rel = os.path.normpath(os.path.join(rel_dir, fname))
                if os.path.islink(full):
                    self.add_symlink(rel, os.readlink(full))
                else:
                    self.add_file(rel, Path(full).read_bytes(), os.stat(full).st_mode & 0o7777)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def pvh_kernel(bzimage: Path) -> bytes | None:
    """The ELF inside an xz-compressed bzImage, if it has a PVH entry note (QEMU boots it directly)."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return None
    # XEN_ELFNOTE_PHYS32_ENTRY (type 18) in a "Xen" note is what QEMU's PVH loader needs.
    if not elf.startswith(b"\x7fELF") or b"Xen\x00" not in elf:
        return None
    return elf


# --------------------------------------------------------------------------- build

def _digest(recipe_dir: Path, kernel_pkg: str, recipe: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(recipe_dir)):
        h.update(name.encode() + (recipe_dir / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(kernel_pkg.encode())
    for package in sorted(recipe.get("programs", {})) + sorted(recipe.get("data", {})):
        h.update(f"{package}={_package_version(package)}".encode())
    return h.hexdigest()[:16]


def cached_build(kind: str, final_name: str, build, force: bool = False) -> Path:
    """The image cache's one protocol: build once under a lock, publish atomically, prune.

    ``build(work_dir)`` makes the image inside a fresh temporary dir and returns its path;
    it is renamed to ``<cache>/images/final_name``. Several processes (xdist workers) may
    ask at once: one builds, the others wait and reuse. Older images of ``kind`` are removed.
    """
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / final_name
    with open(images / f".lock-{kind}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists() and not force:
            return final
        work = Path(tempfile.mkdtemp(prefix=f".build-{kind}.", dir=images))
        try:
            result = build(work)
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(result, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in images.glob(f"{kind}-*"):  # images of older recipes: nothing uses them any more
            if old != final:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return final


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
    _run(["apt-get", "download", kernel_pkg], cwd=debs)
    deb = next(debs.glob("*.deb"))
    kroot = work / "kernel"
    _run(["dpkg-deb", "-x", str(deb), str(kroot)])
    kver = next((kroot / "lib/modules").iterdir()).name
    _run(["depmod", "-b", str(kroot), kver])
    moddir = kroot / "lib/modules" / kver
    modules = module_closure((moddir / "modules.dep").read_text(), recipe["modules"])

    root = work / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/dropbear", "etc/kvmcheck", "root/.ssh",
              "proc", "sys", "dev", "tmp", "run", "var/log", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)

    def copy(src: str) -> None:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)

    for package, programs in recipe.get("programs", {}).items():
        _package_version(package)  # fails with an install hint if missing
        for prog in programs:
            copy(prog)
            for lib in shared_libraries(prog):
                copy(lib)
    for package, files in recipe.get("data", {}).items():
        _package_version(package)
        for f in files:
            copy(f)
    for source, target in recipe.get("compiled", {}).items():
        if shutil.which("gcc") is None:
            raise ImageBuildError(f"the tiny guest's {target} is built from {source} with gcc: "
                                  "apt-get install gcc libc6-dev")
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(root / target.lstrip("/")), str(recipe_dir / source)])
    # /lib64 loader path and /lib -> usr merge as Debian has it.
    if (root / "lib/x86_64-linux-gnu").is_dir() and not (root / "lib64").exists():
        (root / "lib64").mkdir()
        loader = root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        if loader.exists():
            os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", root / "lib64/ld-linux-x86-64.so.2")

    # busybox applets, except those a real program provides (and never "busybox" itself).
    applets = _run([str(root / "bin/busybox"), "--list-full"]).split()
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
    _run(["depmod", "-b", str(root), kver])
    (root / "etc/kvmcheck/modules").write_text("\n".join(recipe["modules"]) + "\n")

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
    keyout = _run(["dropbearkey", "-t", "ed25519", "-f", str(hostkey)])
    pub = next(line for line in keyout.splitlines() if line.startswith("ssh-ed25519 "))

    say(f"packing the initramfs ({len(modules)} modules)")
    cpio = CpioWriter()
    cpio.add_tree(root)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3)
    out = work / "out"
    out.mkdir()
    # Uncompressed: unpacking a gzip initramfs under TCG costs more than reading the bigger file.
    (out / "initrd.img").write_bytes(cpio.finish())
    shutil.copy2(kroot / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    elf = pvh_kernel(out / "vmlinuz")
    if elf is not None:
        (out / "vmlinux").write_bytes(elf)
    (out / "host_key.pub").write_text(pub.strip() + "\n")
    (out / "manifest.json").write_text(json.dumps({
        "digest": digest, "kernel_package": kernel_pkg, "kernel_version": kver,
        "modules": modules, "initrd_bytes": (out / "initrd.img").stat().st_size,
    }, indent=2))
