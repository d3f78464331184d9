"""Integration fixtures: real QEMU guests, a real sshd in a network namespace, leak checks."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_kvmcheck.hosts.local import LocalHost
from pytest_kvmcheck.hosts.settings import HostLock
from pytest_kvmcheck.hosts.spec import HostSpec

ROOT = Path(__file__).resolve().parents[2]
SUITES = str(ROOT / "suites")
BACKPORTS_BIN = ROOT / ".tools" / "qemu-backports" / "bin"  # the second QEMU (make setup unpacks it)
BACKPORTS_QEMU = BACKPORTS_BIN / "qemu-system-x86_64"
# pytester points HOME at each test's own dir; the runs it starts keep using the real image cache.
IMAGE_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")


@pytest.fixture(autouse=True)
def shared_image_cache(monkeypatch):
    """Inner runs reuse the built guest images instead of building them again per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", IMAGE_CACHE)


def processes() -> dict[int, tuple[int, list[bytes]]]:
    """Every process now: pid -> (its parent's pid, its argv)."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            out[int(entry)] = (parent, Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"))
        except (OSError, IndexError, ValueError):
            continue
    return out


def qemu_processes(marker: str) -> list[int]:
    """PIDs of QEMU processes whose argv mentions ``marker`` (a run's work dir)."""
    return [pid for pid, (_, argv) in processes().items()
            if argv and b"qemu-system" in argv[0] and any(marker.encode() in a for a in argv)]


def assert_nothing_left(workdir: Path, output: str = "") -> None:
    """No QEMU of the run, no run dir on the host, no local state dir."""
    left = qemu_processes(str(workdir))
    assert not left, f"QEMU processes left running: {left}"
    runs = list((workdir / "runs").iterdir()) if (workdir / "runs").exists() else []
    assert not runs, f"run dirs left on the host: {runs}"
    for line in output.splitlines():
        if line.startswith("kvmcheck: run "):
            run_id = line.split()[2].rstrip(",")
            state = list(Path(tempfile.gettempdir()).glob(f"kvmcheck-run-{run_id}-*"))
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


def skip_reasons(result) -> list[str]:
    return [line for line in result.outlines if line.startswith("SKIPPED")]


LOCAL_FEATURES = ("test_emulated_io", "test_virtio_net", "test_virtio_blk", "test_virtio_balloon", "test_hotplug",
                  "test_migration", "test_monitor", "test_v2v", "test_cmdline", "test_security", "test_ksm")


def assert_suites_passed(result, host: str, features: tuple[str, ...] = LOCAL_FEATURES, least: int = 30) -> None:
    """No FAIL, ERROR or BROKEN; every skip names host and need; each feature has a PASS cell."""
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-4000:]
    assert outcomes.get("passed", 0) >= least, outcomes
    for line in skip_reasons(result):
        assert f"host {host}: needs " in line, f"a skip without host and capability: {line}"
    verdicts = "\n".join(result.outlines)
    assert re.search(r"^kvmcheck verdicts: \d+ PASS, 0 FAIL, 0 ERROR, 0 BROKEN", verdicts, re.M), verdicts[-2000:]
    for feature in features:
        assert re.search(rf"^{re.escape(host)}\s+{feature}\s+PASS", verdicts, re.M), f"no PASS verdict for {feature}"


def verdicts_of(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (kvm_verdict, failure, error or skip text) from a JUnit file."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        text = " ".join(f"{e.get('message', '')} {e.text or ''}" for e in case if e.tag in ("failure", "error", "skipped"))
        out[case.get("name")] = (props.get("kvm_verdict", "?"), text)
    return out


def interruptible() -> None:
    """Popen's preexec_fn: let the child take Ctrl-C even if this run was started with SIGINT
    ignored (a background job of a shell without job control passes SIG_IGN down, and Python
    then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INNER_TEST_TIMEOUT_S = 600  # 2.5x the slowest inner test seen: a lab perf mutant that waited its turn to measure alone, 234 s
STACKS_BEFORE_S = 20  # a run this close to its timeout prints its stacks, then ends


def run_pytest(pytester: pytest.Pytester, *args: str, timeout: float = 900,
               test_timeout: float | None = INNER_TEST_TIMEOUT_S) -> pytest.RunResult:
    """An inner pytest run. A test of it that hangs fails after ``test_timeout`` with its stack
    (pytest-timeout), long before the whole run's ``timeout`` (None: the plugin's own default
    limit, for the test that checks it). A run that is late even so
    (a hang outside any test: collection, the scheduler, a session's end) is made to print the
    stack of each of its Python processes, controller and workers (SIGABRT, which pytest's
    faulthandler answers), and the error carries that and what the run printed until then."""
    if test_timeout is not None and not any(arg.startswith("--timeout") for arg in args):
        args = (f"--timeout={min(test_timeout, timeout / 2):g}", *args)
    aborted = []
    late = threading.Timer(max(timeout - STACKS_BEFORE_S, timeout / 2), lambda: aborted.extend(abort_run(pytester.path)))
    late.start()
    try:
        # Skips, then failures and errors, last: an assertion that shows the output's tail shows why.
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rsfE", *args, timeout=timeout)
    except pytester.TimeoutExpired as exc:
        raise pytester.TimeoutExpired(f"{exc}\n{_printed(pytester.path)}") from None
    finally:
        late.cancel()
        late.join()  # an abort under way has ended, and said whom it aborted
    if aborted:
        raise pytester.TimeoutExpired(f"the run was still going after {timeout - STACKS_BEFORE_S:g} s (timeout "
                                      f"{timeout:g} s): its Python processes {aborted} were made to print their "
                                      f"stacks (SIGABRT)\n{_printed(pytester.path)}")
    internal = [line for line in result.outlines + result.errlines
                if line.startswith("INTERNALERROR>") and not re.fullmatch(r"INTERNALERROR>[\sE]*[\^~]+\s*", line)]
    # A worker's crash costs the run every test it still held; the assertions on what the run
    # printed would show only its end, not the worker's traceback, which says why.
    assert not internal, "the inner run had an INTERNALERROR:\n" + "\n".join(internal)[-15000:]
    return result


def abort_run(path: Path) -> list[int]:
    """SIGABRT to the inner run started in ``path`` (its ``--basetemp`` names it) and to its
    Python descendants (xdist's workers), not to its QEMUs. Their pids."""
    running = processes()
    parents = {pid: parent for pid, (parent, _) in running.items()}
    argvs = {pid: argv for pid, (_, argv) in running.items()}
    mark = f"--basetemp={path}/".encode()
    tree = {pid for pid, argv in argvs.items() if any(arg.startswith(mark) for arg in argv)}
    while True:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        if not more:
            break
        tree |= more
    python = os.fsencode(sys.executable)
    aimed = [pid for pid in tree if argvs[pid][:1] == [python]]
    aimed.sort(key=lambda pid: argvs[pid][1:2] == [b"-mpytest"])  # the workers first: the controller's end would end them unheard
    for pid in aimed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    return aimed


def _printed(path: Path) -> str:
    """The end of what an inner run printed: its stdout, and its stderr (where the stacks go)."""
    return "\n".join(f"--- its {name}, last {size} characters ---\n"
                     f"{(path / name).read_text(errors='replace')[-size:] if (path / name).exists() else '(none)'}"
                     for name, size in (("stdout", 6000), ("stderr", 30000)))


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass(frozen=True)
class SshHost:
    """One test host: a network namespace with its own address and a real OpenSSH server,
    reached as ``user`` (root, or a user with sudo)."""

    name: str
    address: str
    key: str
    known_hosts: str
    user: str = "root"
    uid: int = 0
    options: str = ""  # host options of its spec beyond the connection's

    def url(self, workdir: Path) -> str:
        if self.uid:  # the user's work dir: made here, the user's own
            workdir.mkdir(exist_ok=True)
            os.chown(workdir, self.uid, self.uid)
        return (f"ssh://{self.user}@{self.address}?key={self.key}&known_hosts={self.known_hosts}&workdir={workdir}"
                f"&bridge=br0{self.options}")


# Run by host b's sshd, in a mount namespace of its own (gone with its processes): QEMU is
# /usr/libexec/qemu-kvm there (an overlay adds it), and qemu-system-x86_64 is no executable.
# It has two users who are not root: kcqa, whose sudo needs no password (NOPASSWD), and
# kcpw, whose sudo would ask for one (its accounts and sudoers rules exist only in there).
RHEL_LAYOUT = """set -e
mkdir -p "$1" && mount -t tmpfs kc-rhel "$1" && mkdir "$1/upper" "$1/work" "$1/etc" "$1/sudoers.d"
cp /usr/bin/qemu-system-x86_64 "$1/upper/qemu-kvm"
mount -t overlay overlay -o "lowerdir=/usr/libexec,upperdir=$1/upper,workdir=$1/work" /usr/libexec
mount --bind /dev/null /usr/bin/qemu-system-x86_64
for user in kcqa:4242 kcpw:4243; do
  name=${user%%:*} uid=${user#*:}
  mkdir -p "$1/home-$name" && chown "$uid:$uid" "$1/home-$name"
  echo "$name:x:$uid:$uid::$1/home-$name:/bin/sh" >> "$1/etc/passwd.add"
  echo "$name:x:$uid:" >> "$1/etc/group.add"
  echo "$name:*:19000:0:99999:7:::" >> "$1/etc/shadow.add"
done
for f in passwd group shadow; do
  cat "/etc/$f" "$1/etc/$f.add" > "$1/etc/$f" && chmod --reference="/etc/$f" "$1/etc/$f"
  mount --bind "$1/etc/$f" "/etc/$f"
done
echo "kcqa ALL=(ALL) NOPASSWD: ALL" > "$1/sudoers.d/kcqa"
echo "kcpw ALL=(ALL) ALL" > "$1/sudoers.d/kcpw"
chmod 0440 "$1"/sudoers.d/*
mount --bind "$1/sudoers.d" /etc/sudoers.d
shift
exec "$@"
"""


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    """Two SSH hosts on this machine: namespaces on a bridge this session creates (and removes).
    Host a is laid out as Debian is; host b as RHEL-family hosts are (see RHEL_LAYOUT).

    Migration between them crosses a real network path (veth, bridge, veth) between two
    network stacks. Traffic stays on this machine: the bridge and namespaces exist only for
    this session, and each sshd listens only on its namespace's address.
    """
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        pytest.skip("host local: the SSH transport tests need root (network namespaces) and /usr/sbin/sshd")
    tag = secrets.token_hex(2)
    bridge, subnet = f"kcbr{tag}", f"10.202.{int(tag, 16) % 250 + 1}"
    d = tmp_path_factory.mktemp("sshd")
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"))
    # What the users who are not root must reach (sshd reads their keys as them): not under pytest's 0700 dir.
    public = Path(f"/tmp/kc-ssh-{tag}")
    public.mkdir(mode=0o755)
    shutil.copy(d / "client_key.pub", public / "authorized_keys")
    (public / "authorized_keys").chmod(0o644)
    Path("/run/sshd").mkdir(exist_ok=True)
    hosts, procs, namespaces = [], [], []
    try:
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        for index, name in enumerate(("a", "b"), start=2):
            ns, address = f"kcssh{tag}{name}", f"{subnet}.{index}"
            namespaces.append(ns)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", f"kch{tag}{name}", "master", bridge, "type", "veth", "peer", "name", f"kcg{tag}{name}",
                "netns", ns)
            _sh("ip", "link", "set", f"kch{tag}{name}", "up")
            # Inside, a bridge holds the uplink and the address; guests' bridged NICs join it.
            for argv in (["link", "add", "br0", "type", "bridge"], ["link", "set", f"kcg{tag}{name}", "master", "br0"],
                         ["addr", "add", f"{address}/24", "dev", "br0"], ["link", "set", f"kcg{tag}{name}", "up"],
                         ["link", "set", "br0", "up"]):
                _sh("ip", "netns", "exec", ns, "ip", *argv)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / f"host_key_{name}"))
            config = d / f"sshd_config_{name}"
            config.write_text(
                f"ListenAddress {address}\nPort 22\nHostKey {d}/host_key_{name}\n"
                f"AuthorizedKeysFile {public}/authorized_keys\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                f"StrictModes no\nUsePAM no\nPidFile {d}/sshd_{name}.pid\nAllowTcpForwarding yes\n"
                "AllowStreamLocalForwarding yes\nMaxSessions 100\nMaxStartups 100\n"
                "Subsystem sftp /usr/lib/openssh/sftp-server\n")
            pub = (d / f"host_key_{name}.pub").read_text().split()
            with open(d / "known_hosts", "a") as known:
                known.write(f"{address} {pub[0]} {pub[1]}\n")
            sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]
            if name == "b":  # laid out as RHEL-family hosts are: QEMU only as /usr/libexec/qemu-kvm
                sshd = ["unshare", "-m", "--propagation", "private", "sh", "-c", RHEL_LAYOUT, "sh", str(public / "rhel"), *sshd]
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *sshd], stderr=open(d / f"sshd_{name}.log", "w")))
            deadline = time.monotonic() + 10
            while "LISTEN" not in subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltn", "sport = :22"],
                                                 capture_output=True, text=True).stdout:
                assert time.monotonic() < deadline, "sshd did not listen: " + (d / f"sshd_{name}.log").read_text()
                time.sleep(0.05)
            if name == "b":  # the sudo user; KSM, VFs and bindings stay off-limits, as on any SSH host by default
                hosts.append(SshHost(name, address, str(d / "client_key"), str(d / "known_hosts"), "kcqa", 4242,
                                     "&sudo=1"))
            else:  # root, and the tests' own machine: host changes allowed
                hosts.append(SshHost(name, address, str(d / "client_key"), str(d / "known_hosts"),
                                     options="&allow_host_changes=1"))
        yield hosts
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for ns in namespaces:
            # Every process still in the namespace (an SSH session's sshd outlives its listener):
            # one left there keeps the namespace, and its veth, after "ip netns del".
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd(ssh_hosts) -> SshHost:
    """One SSH host, for tests that need just one."""
    return ssh_hosts[0]


KSM = "/sys/kernel/mm/ksm"
HUGEPAGES = "/proc/sys/vm/nr_hugepages"
# What the suites could turn, host-wide: KSM, module parameters, VF counts, driver bindings, hugepages.
KNOB_GLOBS = (f"{KSM}/*", "/sys/module/kvm*/parameters/*", "/sys/bus/pci/devices/*/sriov_numvfs",
              "/sys/bus/pci/devices/*/sriov_drivers_autoprobe", "/sys/bus/pci/devices/*/driver_override",
              HUGEPAGES)


def knobs(but: tuple[str, ...] = ()) -> dict[str, str]:
    """Every knob of KNOB_GLOBS (files with a write bit: not KSM's counters), and each PCI
    device's driver; ``but`` leaves out the knobs under those paths."""
    out = {}
    for pattern in KNOB_GLOBS:
        if pattern.startswith(but):
            continue
        for path in glob.glob(pattern):
            if not os.stat(path).st_mode & 0o200:
                continue
            try:
                out[path] = Path(path).read_text().strip()
            except OSError:
                pass
    for dev in glob.glob("/sys/bus/pci/devices/*"):
        out[f"{dev}/driver"] = os.path.basename(os.readlink(f"{dev}/driver")) if os.path.exists(f"{dev}/driver") else ""
    return out


@pytest.fixture
def ksm_held():
    """KSM to this test alone: the suites' KSM tests on another worker wait, as for each other."""
    if not os.path.isdir(KSM) or os.geteuid() != 0:
        pytest.skip("host local: needs ksm and root: the knobs compared are KSM's")
    with HostLock(LocalHost(HostSpec(name="local")), "ksm"):
        yield
