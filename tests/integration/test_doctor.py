"""kvmcheck doctor: one row per prerequisite and host, what to do where one is missing, exit 1
when a host cannot run the suites; a wrong host key is one line with its fix; nothing left."""
import re
import subprocess
import sys
from pathlib import Path

from .conftest import assert_nothing_left

KVMCHECK = str(Path(sys.executable).parent / "kvmcheck")


def doctor(hosts: str) -> subprocess.CompletedProcess:
    return subprocess.run([KVMCHECK, "doctor", f"--kvm-hosts={hosts}"], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def rows(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    out = {}
    for line in stdout.splitlines()[1:]:
        m = re.match(r"^(\S+)\s+(.+?)\s+(ok|warn|FAIL)\s+(.*)$", line)
        if m:
            out[(m.group(1), m.group(2))] = (m.group(3), m.group(4))
    return out


def test_doctor_through_sudo(ssh_hosts, workdir):
    b = ssh_hosts[1]  # kcqa with sudo=1; kcpw's sudo asks for a password
    (workdir / "pw").mkdir(mode=0o777)
    kcpw = b.url(workdir / "pw").replace(f"ssh://{b.user}@", "ssh://kcpw@") + "&name=kcpw"
    result = doctor(f"{b.url(workdir / b.name)},{kcpw}")
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table[(b.address, "privileges")] == ("ok", "uid 4242, root through sudo -n"), table
    assert table[(b.address, "QEMU")][1].endswith("(/usr/libexec/qemu-kvm)"), table[(b.address, "QEMU")]
    assert table[(b.address, "preparation")][0] == "ok"
    status, detail = table[("kcpw", "privileges")]
    assert status == "FAIL" and "a password is required" in detail and "NOPASSWD" in detail, detail
    assert_nothing_left(workdir / b.name, result.stdout)


def test_doctor_on_a_good_host_and_broken_ones(sshd, workdir, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    hosts = ",".join([
        f"local?workdir={workdir}",
        f"ssh://root@{sshd.address}?key={sshd.key}&known_hosts={empty}&name=unknown-key",
        "ssh://root@127.0.0.1:1?name=unreachable",
        f"local?name=no-qemu&workdir={workdir}&qemu=/nonexistent/qemu-kvm",
    ])
    result = doctor(hosts)
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    for check in ("connection", "QEMU", "qemu-img", "work dir space", "preparation", "tap", "ksm"):
        assert table[("local", check)][0] == "ok", (check, table[("local", check)])
    assert table[("local", "vhost-net")] == ("warn", table[("local", "vhost-net")][1])  # this machine has none
    assert "modprobe vhost_net" in table[("local", "vhost-net")][1]
    assert table[("local", "shared storage with unknown-key")][0] == "warn"
    status, detail = table[("unknown-key", "connection")]
    assert status == "FAIL" and "its host key is not in" in detail and "ssh-keyscan" in detail, detail
    assert result.stdout.count("its host key is not in") == 1, "the wrong host key is told once"
    assert table[("unreachable", "connection")][0] == "FAIL"
    assert table[("no-qemu", "QEMU")][0] == "FAIL"
    assert not [k for k in table if k[0] in ("unknown-key", "unreachable") and k[1] != "connection"]
    verdicts = result.stdout.strip().splitlines()[-4:]
    assert verdicts[0].startswith("host local: ready, with warnings:"), verdicts
    assert verdicts[1:] == ["host unknown-key: cannot run the suites (connection)",
                            "host unreachable: cannot run the suites (connection)",
                            "host no-qemu: cannot run the suites (QEMU)"], verdicts
    assert "Traceback" not in result.stdout + result.stderr
    assert_nothing_left(workdir, result.stdout)
