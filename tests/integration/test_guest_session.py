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
