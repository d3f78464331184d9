"""The virtual KVM lab, as CI runs it: up, the KVM-only suites pass there (not skip), down leaves nothing.

The smoke set is every feature that only a KVM host can show, once per lab host: kvm-clock,
vhost-net, nested virtualization, KSM, PCI passthrough, SR-IOV, and a live migration each
way between the two lab hosts over the private network with the shared storage. The full
lab run (every suite) is `make lab-suite`.
"""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import BACKPORTS_BIN, ROOT, SUITES, interruptible, qemu_processes, run_pytest, verdicts_of

KVMCHECK = str(Path(sys.executable).parent / "kvmcheck")
# One lab at a time on this machine: both tests on one xdist worker (make test uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("lab")
# The long measurements (the clock's 30 s drift, the NICs' speeds) are left to the full lab run;
# their mutants below still show each can fail.
SMOKE = ("(kvmclock and not keeps_pace) or nested or ksm or passthrough or sriov or (vhost and not efficiency) "
         "or (shared_storage and precopy) or (power_loss and lab-power) or across_qemu_versions")
SMOKE_SUITES = ("test_kvmclock", "test_virtio_net", "test_nested", "test_ksm", "test_passthrough", "test_sriov",
                "test_migration")
POWER_SUITE = "test_virtio_blk"  # its power-loss check, on lab-power alone
LAB_DURATIONS = ROOT / "fixtures/lab-durations.json"  # what the spread weighs tests by: a full lab run's seconds


def kvmcheck(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([KVMCHECK, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def lab_dir(monkeypatch):
    path = Path(f"/tmp/kc-lab-{secrets.token_hex(3)}")
    monkeypatch.setenv("KVMCHECK_LAB_DIR", str(path))  # the test's own lab, beside any lab of the user's
    yield path
    kvmcheck("lab", "down", timeout=120)


def lab_leftovers(lab_dir: Path) -> list[str]:
    from pytest_kvmcheck.lab.control import Lab
    lab = Lab(lab_dir)
    left = [f"QEMU {pid}" for pid in qemu_processes(str(lab_dir))]
    if lab.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        left.append(f"namespace {lab.netns}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [f"link {m}" for m in re.findall(rf"\d+: ({re.escape(lab.tap_prefix)}\S*?)[:@]", links)]
    if lab_dir.exists():
        left.append(f"dir {lab_dir}")
    return left


def test_lab_up_smoke_down(pytester, lab_dir):
    """The lab comes up with the backports QEMU as each host's second (version skew under KVM),
    passes the smoke selection and catches its mutants, and goes down leaving nothing."""
    up = kvmcheck("lab", "up", "--hosts", "2", "--other-qemu", str(BACKPORTS_BIN.parent))
    assert up.returncode == 0, up.stderr[-3000:]
    assert "the lab is up: 2 hosts" in up.stderr, up.stderr
    assert re.search(r"other QEMU \(QEMU emulator version 10\.", up.stderr), up.stderr
    status = kvmcheck("lab", "status", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("lab-1", "lab-2"):
        assert re.search(rf"name={name} .*alive=True .*kvm=True .*nested=1 .*shared=True", status.stdout), status.stdout
    doctor = kvmcheck("doctor", "--kvm-hosts=lab", timeout=600)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for name, peer in (("lab-1", "lab-2"), ("lab-2", "lab-1")):
        for check in ("connection", "privileges", "QEMU", "qemu-img", "QMP relay", "kvm", "nested", "iommu", "sriov",
                      "bridge", f"shared storage with {peer}"):
            assert re.search(rf"^{name}\s+{re.escape(check)}\s+ok\s", doctor.stdout, re.M), doctor.stdout
        assert f"host {name}: ready" in doctor.stdout, doctor.stdout
    again = kvmcheck("lab", "up", "--hosts", "2", timeout=120)
    assert again.returncode == 0 and "already up" in again.stderr, again.stderr
    assert lab_leftovers(lab_dir)  # (sanity: the leak check sees a running lab)

    result = run_pytest(pytester, *(f"{SUITES}/{suite}.py" for suite in (*SMOKE_SUITES, POWER_SUITE)), "-k", SMOKE,
                        "--kvm-hosts=lab", "--kvm-spread", f"--kvm-durations={LAB_DURATIONS}", "-n", "3",
                        "--dist", "loadscope", "--junitxml=junit.xml",
                        timeout=2400)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-5000:]
    assert outcomes.get("skipped", 0) == 0, "in the lab these must run, not skip:\n" + result.stdout.str()[-3000:]
    verdicts = "\n".join(result.outlines)
    for host in ("lab-1", "lab-2"):
        for feature in SMOKE_SUITES:
            assert re.search(rf"^{host}\s+{feature}\s+PASS", verdicts, re.M), verdicts[-2000:]
        assert re.search(rf"host {host}: QEMU [\d.]+ \(\S+\), accel kvm,", verdicts), verdicts[-2000:]
    assert re.search(rf"^lab-power\s+{POWER_SUITE}\s+PASS", verdicts, re.M), verdicts[-2000:]
    # The two clones share a fingerprint: each host-local feature ran on one of them (--kvm-spread).
    assert re.search(r"spread: host lab-\d \(same fingerprint\) was stood for by lab-\d in ", verdicts), verdicts[-2000:]
    others = [line for line in result.outlines if line.startswith("lab-power ") and line.split()[1] != POWER_SUITE]
    assert not others, f"lab-power took other tests: {others}"
    junit = (pytester.path / "junit.xml").read_text()
    # Spread: one lab host stands for the other in version skew, and each move runs once.
    skew = re.findall(r"QEMU 7\.2\.\d+ -&gt; 10\.\d+\.\d+ \(pc-i440fx-7\.2\): migrates", junit)
    assert len(skew) == 1, f"version skew under KVM: {len(skew)} lab hosts moved a guest to QEMU 10, not one"
    moves = [(source, dest) for source, dest, address in (("lab-1", "lab-2", "10.77.0.12"), ("lab-2", "lab-1", "10.77.0.11"))
             if re.search(rf"{source} -&gt; {dest} \(precopy\) over tcp:{re.escape(address)}:", junit)]
    assert len(moves) == 1, f"the precopy move ran {len(moves)} times over the private network, not once: {moves}"

    assert_lab_mutants_caught(pytester, lab_dir)
    assert_power_cycle_keeps_its_port(lab_dir)

    down = kvmcheck("lab", "down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert not lab_leftovers(lab_dir), lab_leftovers(lab_dir)


def assert_power_cycle_keeps_its_port(lab_dir: Path) -> None:
    """lab-power comes back from a power cycle on the SSH port the inventory names, also when
    another socket holds that port for a moment (a port of the kernel's ephemeral range went to
    one of a run's own connections while the host was down; the host came back elsewhere and
    the run waited 600 s for it)."""
    power = next(h for h in json.loads((lab_dir / "lab.json").read_text())["hosts"] if h["power"])
    os.kill(power["pid"], signal.SIGKILL)  # its power cut; the power cycle finds it off
    while Path(f"/proc/{power['pid']}").exists():
        time.sleep(0.05)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU's own listener
    holder.bind(("127.0.0.1", power["ssh_port"]))
    holder.listen()
    threading.Timer(3, holder.close).start()
    cycled = kvmcheck("lab", "power-cycle", "lab-power", timeout=300)
    assert cycled.returncode == 0, cycled.stderr[-2000:]
    after = next(h for h in json.loads((lab_dir / "lab.json").read_text())["hosts"] if h["power"])
    assert after["ssh_port"] == power["ssh_port"], f"lab-power came back on port {after['ssh_port']}, " \
                                                   f"not its inventory's {power['ssh_port']}"


# The lab's sensitivity companions (see test_sensitivity.py): properties only a KVM host shows,
# broken by a wrapper on the lab host (busybox sh) that rewrites the guest's command line.
CPU_WRAPPER = """#!/bin/sh
# kvmcheck sensitivity mutant: the guest's -cpu host becomes -cpu {cpu}
prev=
for a do
  shift
  if [ "$prev" = "-cpu" ] && [ "$a" = "host" ]; then a="{cpu}"; fi
  set -- "$@" "$a"
  prev=$a
done
exec qemu-system-x86_64 "$@"
"""
PAUSE_WRAPPER = """#!/bin/sh
# kvmcheck sensitivity mutant: the guest is paused about 0.5 s in every 2.5 (stop and cont on a
# QMP socket of the wrapper's own). A paused guest's kvm-clock stands still: its clock falls behind.
sock=/tmp/kc-pause-$$.sock
qemu-system-x86_64 -qmp unix:$sock,server=on,wait=off "$@"
status=$?
[ $status -eq 0 ] && [ -S $sock ] || exit $status  # -daemonize: a guest runs on; anything else has ended
( qmp() { printf '{"execute":"qmp_capabilities"}\\n{"execute":"%s"}\\n' "$1" | socat -t 0.2 - UNIX-CONNECT:$sock; }
  while sleep 2 && qmp stop; do sleep 0.3; qmp cont || break; done; rm -f $sock ) </dev/null >/dev/null 2>&1 &
"""
def rewriting(what: str, cases: str, options: str = "") -> str:
    """A wrapper (busybox sh) that rewrites the arguments ``cases`` match (case patterns and
    actions, one per line) and execs the real QEMU with ``options`` in front."""
    return f"""#!/bin/sh
# kvmcheck sensitivity mutant: {what}
for a do
  shift
  case $a in
{cases}
  esac
  set -- "$@" "$a"
done
exec qemu-system-x86_64 {options}"$@"
"""


THROTTLE_WRAPPER = rewriting(
    "the virtio disk of the virtio-blk/IDE comparison behind a throttle of 100 requests a second "
    "(the suite renders its node as perfvirtio)",
    '    driver=null-co,*,node-name=perfvirtio)\n'
    '      set -- "$@" "${a%node-name=perfvirtio}node-name=kcslow" -blockdev\n'
    '      a=driver=throttle,throttle-group=kcthrottle,file=kcslow,node-name=perfvirtio ;;',
    options="-object throttle-group,id=kcthrottle,x-iops-total=100 ")
VHOST_DROPPED_WRAPPER = rewriting(
    "vhost=on dropped from tap netdevs (QEMU's own backend moves the packets)",
    "    tap,*,vhost=on) a=${a%,vhost=on} ;;")
TX_TIMER_WRAPPER = rewriting(
    "the guest's second NIC (virtio-net on a tap) sends once per 5 ms",
    '    virtio-net-pci,netdev=net1,*) a="$a,tx=timer,x-txtimer=5000000" ;;')
E1000_UNDERNEATH_WRAPPER = rewriting(
    "the side-by-side guest's virtio NIC (its second, on a tap) is an e1000",
    '    virtio-net-pci,netdev=net1,*) a="e1000,${a#virtio-net-pci,}" ;;')
FLUSHES_DROPPED_WRAPPER = rewriting(
    "the lab host's QEMU ignores guests' flushes (cache.no-flush=on on every image node): what the "
    "guest fsync'd may still be in the host's page cache at a power loss",
    "    *cache.no-flush=on*) ;;\n"
    '    driver=file,*|driver=qcow2,*) a="$a,cache.no-flush=on" ;;')
MUTANT_HOSTS = {"flushes-dropped": "lab-power"}  # where a mutant must run; the rest go to lab-1, lab-2 in turns
LAB_MUTANTS = {  # name -> (the wrapper, suite, the check that must fail, what its FAIL names)
    "no-kvmclock": (CPU_WRAPPER.format(cpu="host,kvmclock=off"), "test_kvmclock",
                    "test_current_clocksource_is_kvm_clock", r"expected clocksource kvm-clock"),
    "no-svm": (CPU_WRAPPER.format(cpu="host,svm=off"), "test_nested",
               "test_guest_cpu_shows_virtualization_extensions and nested-on", r"should show the same extension"),
    "clock-paused": (PAUSE_WRAPPER, "test_kvmclock", "test_guest_clock_keeps_pace_with_the_host",
                     r"the guest's clock moved .* the bound is"),
    # Its peer is the next host here (the guest migrates there): one whose wrapper leaves it be.
    # No name may hold another (-k selects by substring). A pause that falls on the switch-over
    # brings the guest over paused (QEMU carries the run state): a FAIL of its own.
    "migrating-paused": (PAUSE_WRAPPER, "test_kvmclock", "test_clock_across_live_migration",
                         r"the guest's wall clock stepped .* across the migration|"
                         r"the guest that ran on the source when it began is paused on the destination"),
    "vhost-dropped": (VHOST_DROPPED_WRAPPER, "test_virtio_net", "test_vhost_net_raises_efficiency",
                      r"vhost-net does not beat QEMU's own virtio-net backend by the handbook's margin"),
    "virtio-nic-is-e1000": (E1000_UNDERNEATH_WRAPPER, "test_virtio_net", "test_virtio_net_outperforms_e1000_throughput",
                            r"virtio-net is not faster than e1000 by the handbook's margin"),
    "virtio-nic-slowed": (TX_TIMER_WRAPPER, "test_virtio_net", "test_virtio_net_outperforms_e1000_latency",
                          r"virtio-net's round trips are not shorter than e1000's"),
    "flushes-dropped": (FLUSHES_DROPPED_WRAPPER, "test_virtio_blk", "test_fsynced_writes_outlast_a_power_loss",
                        r"not on the disk after host mutant-flushes-dropped lost power, cache mode\(s\): writeback"),
    "virtio-disk-throttled": (THROTTLE_WRAPPER, "test_virtio_blk", "test_virtio_blk_outperforms_ide",
                              r"virtio-blk is not faster than IDE by the handbook's margin"),
}


def assert_lab_mutants_caught(pytester, lab_dir: Path) -> None:
    """Each lab mutant, as a host of its own on lab-1 or lab-2 in turns (one run, in parallel):
    its check FAILs. The wrappers sit on the lab's shared storage, seen by both."""
    import tomllib
    from pytest_kvmcheck.lab.control import SHARED_PATH, Lab
    lab = Lab(lab_dir)
    lab_1 = next(h for h in lab.hosts() if h.name == "lab-1")
    inventories = tomllib.loads((lab_dir / "inventory.toml").read_text())["hosts"]
    transport = lab.connect(lab_1)
    lines = []
    try:
        transport.makedirs(f"{SHARED_PATH}/mutants")
        for index, (name, (wrapper, *_rest)) in enumerate(LAB_MUTANTS.items()):
            path = f"{SHARED_PATH}/mutants/qemu-{name}"
            transport.write_bytes(path, wrapper.encode(), mode=0o755)
            lines.append(f"[hosts.mutant-{name}]")
            inventory = inventories[MUTANT_HOSTS.get(name, f"lab-{index % 2 + 1}")]
            lines += [f"{key} = {json.dumps(value)}" for key, value in {**inventory, "qemu": path}.items()]
            lines.append("")
        (pytester.path / "mutants.toml").write_text("\n".join(lines))
        suites = sorted({f"{SUITES}/{suite}.py" for _, suite, _, _ in LAB_MUTANTS.values()})
        # Each mutant host runs only the check its mutant breaks.
        selection = " or ".join(f"({test}) and mutant-{name}" for name, (*_, test, _) in LAB_MUTANTS.items())
        result = run_pytest(pytester, *suites, "-k", selection, f"--kvm-hosts=@{pytester.path / 'mutants.toml'}",
                            "-n", "3", "--junitxml=mutants.xml", timeout=1200)
        results = verdicts_of(pytester.path / "mutants.xml")
        for name, (_, suite, _test, expect) in LAB_MUTANTS.items():
            mine = {case: v for case, v in results.items() if f"mutant-{name}" in case}
            caught = [text for case, (verdict, text) in mine.items()
                      if verdict == "FAIL" and re.search(expect, text)]
            assert caught, f"lab mutant {name} ({suite}) was not caught: {mine}\n{result.stdout.str()[-3000:]}"
    finally:
        transport.run(["rm", "-rf", f"{SHARED_PATH}/mutants"])
        transport.close()


def test_lab_down_finds_a_qemu_its_state_does_not_name(lab_dir):
    """A host's QEMU started just as Ctrl-C came is in the lab's dir but not yet in its state
    (CI: 'QEMU 28310' left after an interrupted lab up): lab down finds it by its files."""
    from pytest_kvmcheck.lab.control import Lab
    (lab_dir / "lab-power").mkdir(parents=True)
    subprocess.run(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-daemonize",
                    "-pidfile", str(lab_dir / "lab-power" / "qemu.pid")], check=True, timeout=60)
    pid = int((lab_dir / "lab-power" / "qemu.pid").read_text())
    notes = Lab(lab_dir).down()
    assert f"lab-power: stopped (QEMU {pid})" in notes, notes
    assert not lab_leftovers(lab_dir), lab_leftovers(lab_dir)


def test_lab_up_interrupted_leaves_nothing(lab_dir):
    """Ctrl-C while the hosts boot: the lab takes itself down, and says so."""
    proc = subprocess.Popen([KVMCHECK, "lab", "up", "--hosts", "2"], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, preexec_fn=interruptible)
    watchdog = threading.Timer(900, proc.kill)  # the image may be built first
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if re.search(r"lab-2: QEMU \d+ started", line):
                break
        assert any("lab-2: QEMU" in line for line in seen), "".join(seen)
        assert lab_leftovers(lab_dir), "the lab had started nothing to leave"
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, rest
    finally:
        watchdog.cancel()
    assert "interrupted" in rest, rest
    assert not lab_leftovers(lab_dir), lab_leftovers(lab_dir)
