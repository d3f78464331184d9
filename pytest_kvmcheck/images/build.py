"""What every image build shares: recipes, Debian packages, initramfs archives, the image cache.

Images are made only from the system's configured Debian package sources (``apt-get
download``, installed packages and the shared libraries they link), cached by content hash
under the user's cache dir: built once, then reused by every run and xdist worker.
"""
from __future__ import annotations

import fcntl
import glob
import lzma
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageBuildError
from ..paths import cache_dir, fixtures_dir

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

READY_MARKER = "KVMCHECK-READY"


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


# --------------------------------------------------------------------------- helpers

def run_tool(argv: list[str], cwd: str | Path | None = None, timeout: float = 600) -> str:
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
    out = run_tool(["apt-cache", "depends", metapackage])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    raise ImageBuildError(
        f"apt-cache knows no kernel behind {metapackage!r}: run 'apt-get update' first")


def package_version(package: str) -> str:
    try:
        return run_tool(["dpkg-query", "-W", "-f=${Version}", package]).strip()
    except ImageBuildError:
        raise ImageBuildError(
            f"the Debian package {package!r} is not installed; the tiny guest takes its "
            f"programs from it: apt-get install {package}") from None


def shared_libraries(binary: str, stubbed: Collection[str] = ()) -> list[str]:
    """The shared objects (with the loader) that ``binary`` links, as ldd resolves them. A
    library named in ``stubbed`` is left out, and with it what only it needed (the image has a
    stand-in of its own there): followed through each object's DT_NEEDED (readelf)."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs, path_of, loader = [], {}, None
    for line in proc.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
            path_of[parts[0]] = parts[2]
        elif parts and parts[0].startswith("/"):
            libs.append(loader := parts[0])  # the dynamic loader
    if not stubbed:
        return libs
    keep, todo = {loader}, [binary]
    while todo:
        for name in _needed(todo.pop()):
            path = path_of.get(name)
            if name not in stubbed and path and path not in keep:
                keep.add(path)
                todo.append(path)
    return [lib for lib in libs if lib in keep]


def _needed(path: str) -> list[str]:
    """An ELF object's DT_NEEDED names."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run_tool(["readelf", "-d", path]))


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

    def add_tree(self, root: Path, empty_dirs: tuple[str, ...] = ("dev",)) -> None:
        """Every directory, regular file and symlink under ``root``, in a reproducible order.

        ``empty_dirs`` are added without their contents (device nodes are added by hand).
        """
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir in empty_dirs:
                dirnames[:] = []
                filenames = []
            dirnames.sort()
            if rel_dir != ".":
                self.add_dir(rel_dir)
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                full = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(full))
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(rel, Path(full).read_bytes(), st.st_mode & 0o7777)

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


def apt_source_files() -> list[str]:
    """The system's apt source files: images are built from these and nothing else."""
    candidates = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.sources") +
                                                     glob.glob("/etc/apt/sources.list.d/*.list"))
    files = [f for f in candidates if os.path.isfile(f) and os.path.getsize(f) > 0]
    if not files:
        raise ImageBuildError("no apt sources configured (/etc/apt/sources.list*): cannot build from packages")
    return files
