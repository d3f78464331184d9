"""Host specs and inventories: every accepted form, and a clear error for every bad one."""
import pytest

from pytest_kvmcheck.errors import HostSpecError
from pytest_kvmcheck.hosts.spec import load_inventory, parse_host, parse_hosts


def test_default_is_local():
    (spec,) = parse_hosts(None)
    assert (spec.name, spec.transport, spec.url) == ("local", "local", "local")


def test_ssh_url_with_options():
    spec = parse_host("ssh://qa@node3:2222?key=/k/id&qemu=/usr/libexec/qemu-kvm&workdir=/var/tmp/kc&accel=tcg"
                      "&tags=a+b&accept_new_host_key=yes")
    assert (spec.transport, spec.user, spec.hostname, spec.port) == ("ssh", "qa", "node3", 2222)
    assert (spec.key, spec.qemu, spec.workdir, spec.accel) == ("/k/id", "/usr/libexec/qemu-kvm", "/var/tmp/kc", "tcg")
    assert spec.tags == ("a", "b") and spec.accept_new_host_key
    assert spec.name == "node3-2222" and spec.url == "ssh://qa@node3:2222"


def test_host_changes_are_allowed_on_this_machine_and_not_over_ssh_unless_said():
    assert parse_host("local").host_changes_allowed
    assert not parse_host("local?allow_host_changes=0").host_changes_allowed
    assert not parse_host("ssh://qa@node3").host_changes_allowed
    assert parse_host("ssh://qa@node3?allow_host_changes=yes").host_changes_allowed


def test_root_work_goes_through_sudo_only_where_the_spec_says():
    from pytest_kvmcheck.hosts.ssh import SSHHost
    assert SSHHost(parse_host("ssh://qa@node3?sudo=1")).privileged(["tee", "/sys/x"]) == ["sudo", "-n", "--", "tee", "/sys/x"]
    assert SSHHost(parse_host("ssh://root@node3")).privileged(["tee", "/sys/x"]) == ["tee", "/sys/x"]


def test_a_slow_host_sets_its_own_downtime_bound():
    assert parse_host("local?max_downtime_ms=10000").max_downtime_ms == 10000
    assert parse_host("local").max_downtime_ms is None  # the ini's kvm_max_downtime_ms applies


@pytest.mark.parametrize("entry, fragment", [
    ("ftp://host", "unsupported scheme 'ftp'"),
    ("ssh://", "no host name"),
    ("ssh://h:99999", "port is not a number"),
    ("ssh://h/path", "unexpected path"),
    ("ssh://u:secret@h", "passwords in host specs are refused"),
    ("ssh://h?colour=blue", "unknown option 'colour'"),
    ("ssh://h?accel=xen", "must be one of auto, kvm, tcg"),
    ("ssh://h?memory_budget_mib=lots", "expected a whole number"),
    ("local?max_downtime_ms=0", "max_downtime_ms: must be positive"),
    ("local?sudo=1", "sudo is for hosts reached over SSH"),
    ("local?power_cycle=reboot", "power_cycle is for hosts reached over SSH"),
    ("ssh://h?power_cycle=", "power_cycle: an empty command"),
    ("ssh://h?accept_new_host_key=maybe", "expected a yes/no value"),
    ("myhost", "not understood"),
    ("local,,local", "empty host entry"),
    ("local,local", "given twice"),
    ("lab", "lab is not up"),
])
def test_bad_entries_name_the_bad_part(entry, fragment, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMCHECK_LAB_DIR", str(tmp_path / "no-lab"))  # a lab the user has up does not count
    with pytest.raises(HostSpecError, match=fragment.replace("(", r"\(")):
        parse_hosts(entry)


def test_lab_reads_the_inventory_lab_up_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMCHECK_LAB_DIR", str(tmp_path))
    (tmp_path / "inventory.toml").write_text('[hosts.lab-1]\nurl = "ssh://root@127.0.0.1:2222"\n')
    (spec,) = parse_hosts("lab")
    assert spec.name == "lab-1" and spec.port == 2222


def test_secret_never_echoed():
    with pytest.raises(HostSpecError) as info:
        parse_host("ssh://u:hunter2@h")
    assert "hunter2" not in str(info.value)


def test_inventory(tmp_path):
    inv = tmp_path / "inv.toml"
    inv.write_text('[hosts.a]\nurl = "local"\n[hosts.b]\nurl = "ssh://qa@b"\nkey = "keys/b"\n'
                   'memory_budget_mib = 4096\nassignable = ["0000:01:00.0"]\n')
    a, b = parse_hosts(f"@{inv}")
    assert (a.name, a.transport) == ("a", "local")
    assert (b.name, b.key, b.memory_budget_mib, b.assignable) == ("b", str(tmp_path / "keys/b"), 4096, ("0000:01:00.0",))


@pytest.mark.parametrize("text, fragment", [
    ("not toml [", "not valid TOML"),
    ("[other]\n", "no [hosts.NAME] tables"),
    ("[hosts.a]\nurl='local'\ncolour='x'\n", "unknown keys colour"),
])
def test_bad_inventory(tmp_path, text, fragment):
    inv = tmp_path / "inv.toml"
    inv.write_text(text)
    with pytest.raises(HostSpecError, match=fragment.replace("[", r"\[")):
        load_inventory(inv)


def test_missing_inventory(tmp_path):
    with pytest.raises(HostSpecError, match="does not exist"):
        parse_hosts(f"@{tmp_path}/nope.toml")


def test_example_inventory_parses():
    from pytest_kvmcheck.paths import fixtures_dir
    specs = load_inventory(fixtures_dir() / "inventory.example.toml")
    assert [s.name for s in specs] == ["this-machine", "rack12-node3", "rack12-node9"]
    assert specs[2].power_cycle[-3:] == ("chassis", "power", "cycle") and specs[2].only == ("power-cycle",)


def test_migration_address_defaults_to_where_the_host_is_reached():
    assert parse_host("local").migration_address == "127.0.0.1"
    assert parse_host("ssh://qa@node3").migration_address == "node3"
    assert parse_host("ssh://qa@node3?migrate_address=10.20.0.3").migration_address == "10.20.0.3"


def test_expect_lists_capabilities(tmp_path):
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('[hosts.prod-1]\nurl = "ssh://qa@node1"\nexpect = ["kvm", "vhost-net", "sriov"]\n')
    (spec,) = load_inventory(inventory)
    assert spec.expect == ("kvm", "vhost-net", "sriov")
    assert parse_hosts("local?expect=kvm+ksm")[0].expect == ("kvm", "ksm")


def test_an_unknown_expected_capability_is_named():
    from pytest_kvmcheck.hosts.capabilities import check_need_names
    check_need_names(("kvm", "device:e1000", "shared-storage"))
    with pytest.raises(ValueError, match="unknown capability 'warp'"):
        check_need_names(("kvm", "warp"))


def test_a_host_kept_for_power_cycles():
    spec = parse_host("ssh://root@node9?power_cycle=ipmitool+-I+lanplus+-H+bmc9+-E+chassis+power+cycle"
                      "&local_dir=/var/lib/kc&only=power-cycle")
    assert spec.power_cycle == ("ipmitool", "-I", "lanplus", "-H", "bmc9", "-E", "chassis", "power", "cycle")
    assert spec.local_dir == "/var/lib/kc" and spec.only == ("power-cycle",)


def test_a_host_offering_a_second_qemu():
    spec = parse_host("local?other_qemu=/opt/qemu-10/bin/qemu-system-x86_64")
    assert spec.other_qemu == "/opt/qemu-10/bin/qemu-system-x86_64" and spec.qemu is None


def test_the_inventory_takes_power_cycle_as_a_list(tmp_path):
    path = tmp_path / "inv.toml"
    path.write_text('[hosts.p]\nurl = "ssh://root@p"\npower_cycle = ["env", "A=b c", "kvmcheck", "lab", "power-cycle", "p"]\n')
    (spec,) = load_inventory(path)
    assert spec.power_cycle == ("env", "A=b c", "kvmcheck", "lab", "power-cycle", "p")


def test_machine_is_this_one_for_local_and_loopback_hosts_else_the_address_unless_said():
    import socket
    here = socket.gethostname()
    assert parse_host("local").machine_name == here
    assert parse_host("ssh://root@127.0.0.1:2201").machine_name == here  # a VM forwarded here (the lab)
    assert parse_host("ssh://qa@node3").machine_name == "node3"
    assert parse_host("ssh://qa@10.0.0.5?machine=rack1-blade4").machine_name == "rack1-blade4"
