"""Integration fixtures: real QEMU guests, a real sshd in a network namespace, leak checks."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITES = str(ROOT / "suites")


def qemu_processes(marker: str) -> list[int]:
    """PIDs of QEMU processes whose argv mentions ``marker`` (a run's work dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(marker.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def assert_nothing_left(workdir: Path, output: str = "") -> None:
    """No QEMU of the run, no run dir on the host, no local state dir."""
    left = qemu_processes(str(workdir))
    assert not left, f"QEMU processes left running: {left}"
    runs = list((workdir / "runs").iterdir()) if (workdir / "runs").exists() else []
    assert not runs, f"run dirs left on the host: {runs}"
    for line in output.splitlines():
        if line.startswith("kvmcheck: run "):
            run_id = line.split()[2].rstrip(",")
            state = list(Path("/tmp").glob(f"kvmcheck-run-{run_id}-*"))
            assert not state, f"local state dir left: {state}"


@pytest.fixture
def workdir(tmp_path_factory) -> Path:
    """A host work dir of the test's own, so leak checks see only this test's run."""
    path = Path(f"/tmp/kc-it-{secrets.token_hex(3)}")
    path.mkdir()
    yield path
    for pid in qemu_processes(str(path)):
        os.kill(pid, 9)
    shutil.rmtree(path, ignore_errors=True)


def run_pytest(pytester: pytest.Pytester, *args: str, timeout: float = 900) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", *args, timeout=timeout)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server in a network namespace this session creates (and removes).

    Yields (address, client key path, known_hosts path). Traffic stays on this machine:
    the namespace and its veth link exist only for this session.
    """
    if os.geteuid() != 0 or not shutil.which("/usr/sbin/sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.skip("host local: the SSH transport test needs root (network namespaces) and /usr/sbin/sshd")
    tag = secrets.token_hex(2)
    ns, veth_host, veth_ns = f"kcssh{tag}", f"kch{tag}", f"kcg{tag}"
    octet = int(tag, 16) % 250 + 1
    host_ip, ns_ip = f"10.202.{octet}.1", f"10.202.{octet}.2"
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"ListenAddress {ns_ip}\nPort 22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\nAllowTcpForwarding yes\nAllowStreamLocalForwarding yes\n"
        "MaxSessions 100\nMaxStartups 100\nSubsystem sftp /usr/lib/openssh/sftp-server\n")
    pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"{ns_ip} {pub[0]} {pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = None
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", veth_host)
        _sh("ip", "link", "set", veth_host, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", veth_ns)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", veth_ns, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                stderr=open(d / "sshd.log", "w"))
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltn", "sport = :22"],
                             capture_output=True, text=True).stdout.count("LISTEN") == 0:
            assert time.monotonic() < deadline, "sshd did not listen: " + (d / "sshd.log").read_text()
            time.sleep(0.05)
        yield ns_ip, str(d / "client_key"), str(d / "known_hosts")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True)
