"""Bad input gets one clear message and loses nothing: no QEMU, run dir or state dir left."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pytest_kvmcheck import verdicts
from pytest_kvmcheck.errors import GuestBootError, QemuExited, QMPLost, QMPTimeout, VMError
from pytest_kvmcheck.hosts.spec import parse_host
from pytest_kvmcheck.run import KvmRun
from pytest_kvmcheck.qemu.spec import VMSpec
from pytest_kvmcheck.waiting import poll

from .conftest import SUITES, assert_nothing_left, interruptible, qemu_processes, run_pytest

ONE_TEST = f"{SUITES}/test_virtio_blk.py::test_disk_shows_as_vd"


@pytest.mark.parametrize("option, message", [
    ("--kvm-hosts=ftp://x", "ERROR: --kvm-hosts: host 'ftp://x': unsupported scheme 'ftp'"),
    ("--kvm-hosts=ssh://h?colour=blue", "ERROR: --kvm-hosts: host 'ssh://h': unknown option 'colour'"),
    ("--kvm-accel=xen", "ERROR: --kvm-accel: 'xen' is not one of auto, kvm, tcg"),
    ("--kvm-guest=windows", "ERROR: --kvm-guest: windows: no such file (give 'tiny' or the path of a qcow2"),
    (f"--kvm-guest={__file__}", "not a qcow2 image (convert it: qemu-img convert -O qcow2"),
])
def test_bad_option_is_one_usage_line(pytester, option, message):
    result = run_pytest(pytester, ONE_TEST, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def assert_one_clear_failure(result, message: str) -> None:
    text = result.stdout.str()
    assert result.parseoutcomes().get("failed", 0) + result.parseoutcomes().get("errors", 0) >= 1
    assert message in text, text[-3000:]
    assert "Traceback" not in text and "paramiko/" not in text, "a traceback instead of a message"


def test_unreachable_host(pytester):
    result = run_pytest(pytester, ONE_TEST, "--kvm-hosts=ssh://root@127.0.0.1:1")
    assert_one_clear_failure(result, "host 127.0.0.1-1 (root@127.0.0.1:1): cannot connect")


def test_a_host_that_cannot_be_prepared_is_explained_once(pytester):
    """A suite's tests on an unreachable host: each an ERROR, the cause once with the first and once in the summary."""
    result = run_pytest(pytester, f"{SUITES}/test_virtio_blk.py", "--kvm-hosts=ssh://root@127.0.0.1:1")
    text = result.stdout.str()
    tests = int(re.search(r"collected (\d+) items", text).group(1))
    assert tests >= 9 and result.parseoutcomes().get("errors") == tests, text[-3000:]
    told = text.split("short test summary info")[0]  # pytest's own summary repeats every ERROR's line
    assert told.count("Unable to connect to port 1 on 127.0.0.1") == 2, text[-3000:]
    assert "kvmcheck: host 127.0.0.1-1: could not be prepared, so its tests ended as ERROR" in told
    assert told.count("could not be prepared: the first test on it, and the run's summary, say why") == tests - 1


def test_unknown_host_key_says_how_to_accept_it(pytester, sshd, tmp_path):
    address, key = sshd.address, sshd.key
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = run_pytest(pytester, ONE_TEST, f"--kvm-hosts=ssh://root@{address}?key={key}&known_hosts={empty}")
    assert_one_clear_failure(result, "its host key is not in")
    assert "ssh-keyscan" in result.stdout.str() and "accept_new_host_key=1" in result.stdout.str()


def test_a_sudo_that_asks_for_a_password_is_one_clear_error(pytester, ssh_hosts, workdir):
    b = ssh_hosts[1]  # kcpw there may use sudo, with a password
    url = b.url(workdir).replace(f"ssh://{b.user}@", "ssh://kcpw@")
    (workdir).chmod(0o777)
    result = run_pytest(pytester, ONE_TEST, f"--kvm-hosts={url}")
    assert_one_clear_failure(result, "sudo=1, but 'sudo -n id -u' failed (sudo: a password is required)")
    assert "NOPASSWD" in result.stdout.str()


def test_missing_qemu(pytester, workdir):
    result = run_pytest(pytester, ONE_TEST, f"--kvm-hosts=local?qemu=/nonexistent/qemu&workdir={workdir}")
    assert_one_clear_failure(result, "QEMU binary '/nonexistent/qemu' not found")
    assert "apt-get install qemu-system-x86" in result.stdout.str()
    assert_nothing_left(workdir, result.stdout.str())


@pytest.fixture
def local_run(workdir):
    run = KvmRun.create([parse_host(f"local?workdir={workdir}")], accel="tcg")
    yield run
    run.finish()
    assert_nothing_left(workdir)


def test_guest_that_never_boots(local_run, workdir):
    """A guest whose init never comes up: the error carries the console tail, QEMU is gone."""
    # A shell as init waits on the serial console for ever: no ready marker, no exit.
    vm = local_run.new_vm("local", VMSpec(kernel_args=("rdinit=/bin/sh",)))
    started = time.monotonic()
    with pytest.raises(GuestBootError) as info:
        vm.boot(timeout=8)
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "did not boot: no ready marker within 8 s" in message and "serial console (last lines)" in message
    assert "Reproduce with: qemu-system-x86_64" in message
    assert not qemu_processes(str(workdir))


def test_guest_whose_kernel_panics(local_run, workdir):
    vm = local_run.new_vm("local", VMSpec(kernel_args=("rdinit=/nonexistent", "init=/nonexistent")))
    with pytest.raises(GuestBootError, match="did not boot: QEMU exited") as info:
        vm.boot(timeout=30)
    assert "Kernel panic" in str(info.value), "the console tail should show why"
    assert not qemu_processes(str(workdir))


def test_qemu_that_refuses_its_command_line(local_run, workdir):
    """QEMU's own words (written to its -D log, not stderr) and the command line, nothing left."""
    vm = local_run.new_vm("local", VMSpec(extra_args=("-global", "migration.no-such-property=1")))
    with pytest.raises(VMError) as info:
        vm.boot(timeout=30)
    message = str(info.value)
    assert "QEMU refused to start (exit 1)" in message
    assert "Property 'migration.no-such-property' not found" in message, message
    assert "Reproduce with: qemu-system-x86_64" in message
    assert not qemu_processes(str(workdir))


def test_lost_qmp_connection(local_run, workdir):
    vm = local_run.new_vm("local", VMSpec()).boot()
    assert vm.qmp.cmd("query-status")["status"] == "running"
    os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(QMPLost, match=rf"QMP connection lost during query-status .*; QEMU {vm.pid} has exited"):
        for _ in range(50):  # the kill lands asynchronously
            vm.qmp.cmd("query-status")
            time.sleep(0.05)
    vm.stop()  # must not raise for a dead VM
    vm.destroy()


def test_qemu_gone_before_the_guest_login(local_run, workdir):
    """A QEMU that dies before a guest session is opened (a destination after its move, in
    CI) is QEMU's exit, with its stderr and console: not the refused port forward it leaves."""
    vm = local_run.new_vm("local", VMSpec()).boot()
    assert vm.ssh_port  # the forward was there while QEMU ran
    os.kill(vm.pid, signal.SIGKILL)
    assert poll(lambda: not vm.alive(), 10)
    with pytest.raises(QemuExited) as info:
        vm.run("true")
    message = str(info.value)
    assert f"QEMU {vm.pid} exited before its guest took an SSH session" in message, message
    assert "--- serial console (last lines) ---" in message and "--- QEMU stderr ---" in message, message
    assert verdicts.classify(info) == "FAIL"
    vm.destroy()
    assert not qemu_processes(str(workdir))


def test_a_guest_whose_kernel_crashes_after_it_booted(local_run, workdir):
    """A guest kernel that crashes after boot (a destination's, corrupted in its move: CI)
    ends its QEMU (panic=-1, -no-reboot): the next login is the host's FAIL with the crash
    report from the console, not a login timeout; so is a QMP command's."""
    vm = local_run.new_vm("local", VMSpec()).boot()
    vm.guest.start("sleep 1; echo c > /proc/sysrq-trigger")
    assert poll(lambda: not vm.alive(), 30), "the guest's crash did not end its QEMU"
    with pytest.raises(QemuExited) as info:
        vm.reconnect_guest()
    message = str(info.value)
    assert "the guest's kernel reported a crash or a stall:" in message and "sysrq" in message.lower(), message
    assert verdicts.classify(info) == "FAIL"
    with pytest.raises(QMPLost, match=rf"QEMU {vm.pid} has exited: (.|\n)*the guest's kernel reported a crash"):
        vm.qmp.cmd("query-status")  # a QMP command's error names the crash too
    vm.destroy()
    assert not qemu_processes(str(workdir))


def test_qemu_that_stops_answering_qmp(local_run, workdir):
    """A QEMU hung in a command (here: stopped by SIGSTOP) is told from one that died: the
    error says it still runs and where its main thread waits."""
    vm = local_run.new_vm("local", VMSpec()).boot()
    vm.qmp.timeout = 2
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QMPTimeout, match=rf"QEMU did not answer QMP query-status within 2 s; QEMU {vm.pid} "
                                             r"still runs \(main thread in do_signal_stop\)"):
            vm.qmp.cmd("query-status")
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    vm.destroy()
    assert not qemu_processes(str(workdir))


def _wait_for_qemu(workdir, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not qemu_processes(str(workdir)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no QEMU started"
        time.sleep(0.1)


def _inner_pytest(workdir, *args):
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"{SUITES}/test_virtio_blk.py",
                             f"--kvm-hosts=local?workdir={workdir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=interruptible)


def test_ctrl_c_leaves_nothing(workdir):
    proc = _inner_pytest(workdir)
    _wait_for_qemu(workdir, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-2000:]
    assert_nothing_left(workdir, out)


def test_next_run_removes_what_a_killed_run_left(workdir):
    proc = _inner_pytest(workdir)
    _wait_for_qemu(workdir, proc)
    proc.kill()  # SIGKILL: no cleanup at all; the daemonized QEMU survives it
    killed_output, _ = proc.communicate()
    time.sleep(0.5)
    assert qemu_processes(str(workdir)), "the killed run should have left its QEMU behind"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", ONE_TEST,
                             f"--kvm-hosts=local?workdir={workdir}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "removed stale run" in result.stdout
    assert_nothing_left(workdir, killed_output)  # its local state dir is gone too


def test_a_file_the_host_never_answers_for_is_one_clear_error(sshd, workdir):
    """A read over SFTP that the host leaves unanswered (a hung filesystem there: the lab's NFS
    server once lost its network, and every read of a console waited for ever) ends as a
    HostError naming the file, and the next file operation gets a session that answers.
    A FIFO with no writer holds the host's sftp-server in its open() as such a filesystem would."""
    from pytest_kvmcheck.errors import HostError
    from pytest_kvmcheck.hosts.connect import connect

    fifo, plain = workdir / "never-written", workdir / "plain"
    os.mkfifo(fifo)
    plain.write_text("answered")
    host = connect(parse_host(sshd.url(workdir)))
    host.file_timeout = 2.0
    try:
        started = time.monotonic()
        with pytest.raises(HostError, match=rf"reading {fifo} got no answer within 2 s"):
            host.read_bytes(str(fifo))
        assert time.monotonic() - started < 10
        assert host.read_bytes(str(plain)) == b"answered"
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the host's sftp-server go
        host.close()
