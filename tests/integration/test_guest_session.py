"""The guest's persistent shell going away mid-command is our session breaking, not the host
failing: CI once read a multifd move as FAIL, 'exited 255' with no output, when the shell ended."""
from .conftest import run_pytest, verdicts_of

SHELL_DIES = '''
from pytest_kvmcheck import VMSpec

def test_shell_dies(boot_vm):
    vm = boot_vm(VMSpec())
    try:
        vm.run("kill -9 $$", check=True)  # in the command's subshell, $$ is the persistent shell
    finally:
        assert vm.run(["echo", "again"], check=True).stdout.strip() == "again"  # a fresh shell
'''


def test_a_shell_that_ends_mid_command_is_an_error_not_a_fail(pytester, workdir, tmp_path):
    pytester.makepyfile(test_shell=SHELL_DIES)
    junit = tmp_path / "junit.xml"
    run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--junitxml={junit}")
    verdict, text = verdicts_of(junit)["test_shell_dies[local]"]
    assert verdict == "ERROR" and "the SSH channel ended before 'kill -9 $$' finished" in text, (verdict, text)


LOGIN_DROPS = '''
import socket
import threading

import pytest

from pytest_kvmcheck import VMSpec
from pytest_kvmcheck.qemu import vm as vm_module


@pytest.fixture
def dropper():
    """A loopback listener that takes each connection and closes it before the SSH banner."""
    listener = socket.create_server(("127.0.0.1", 0))
    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()
    listener.close()


def test_first_login_dropped(boot_vm, dropper, monkeypatch):
    vm = boot_vm(VMSpec())
    real, tries = vm.host.connect_tcp, []
    def connect(address, port):
        tries.append(port)
        return real(*dropper) if len(tries) == 1 else real(address, port)
    monkeypatch.setattr(vm.host, "connect_tcp", connect)
    assert vm.reconnect_guest().run(["echo", "in"], check=True).stdout.strip() == "in"
    assert len(tries) == 2


def test_every_login_dropped(boot_vm, dropper, monkeypatch):
    vm = boot_vm(VMSpec())
    real = vm.host.connect_tcp
    monkeypatch.setattr(vm.host, "connect_tcp", lambda address, port: real(*dropper))
    monkeypatch.setattr(vm_module, "LOGIN_RETRY_S", 3.0)
    vm.reconnect_guest()
'''


def test_a_dropped_first_login_is_tried_again_and_a_guest_that_never_answers_is_an_error(pytester, workdir, tmp_path):
    """CI once read a guest restored from a file as ERROR, 'SSH login failed: No existing
    session': its first connection closed before the banner. A login is tried again while
    QEMU lives, and one that never succeeds is one ERROR naming the wait."""
    pytester.makepyfile(test_login=LOGIN_DROPS)
    junit = tmp_path / "junit.xml"
    run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--junitxml={junit}")
    verdicts = verdicts_of(junit)
    assert verdicts["test_first_login_dropped[local]"][0] == "PASS", verdicts
    verdict, text = verdicts["test_every_login_dropped[local]"]
    assert verdict == "ERROR" and "no SSH session to the guest within 3 s" in text and "SSH login failed" in text, \
        (verdict, text)
    assert "QEMU running; serial console (last lines):" in text and "KVMCHECK-READY" in text, text  # the guest's side
