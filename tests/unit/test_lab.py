"""The lab's QEMU command line and inventory: pure logic, no QEMU started."""
import os
import subprocess
import sys
from pathlib import Path

from pytest_kvmcheck.hosts.spec import load_inventory
from pytest_kvmcheck.lab.control import Lab, LabHost, _ephemeral_ports, _free_port, _threads_running
from pytest_kvmcheck.lab.image import LabImage


def lab_and_host(tmp_path):
    lab = Lab(tmp_path / "lab")
    host = LabHost(name="lab-2", index=2, directory=str(tmp_path / "lab/lab-2"), ssh_port=40022,
                   private_ip="10.77.0.12/24", tap=f"{lab.tap_prefix}2", assignable=("0000:00:03.0",),
                   sriov_pf="0000:00:04.0")
    image = LabImage(Path("/img"), "d1g3st", "6.1.0-1-amd64", "console=ttyS0 intel_iommu=on")
    return lab, host, image


def test_lab_host_argv_keeps_everything_on_this_machine(tmp_path):
    lab, host, image = lab_and_host(tmp_path)
    argv = lab._argv(host, image, "ssh-ed25519 AAAA lab", "10.77.0.11")
    joined = " ".join(argv)
    assert "user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22" in joined  # SSH on loopback only
    assert f"tap,id=lan,ifname={lab.tap_prefix}2,script=no,downscript=no" in joined
    assert argv[argv.index("-cpu") + 1] == "max" and "tcg,thread=multi" in argv
    assert "intel-iommu,intremap=on" in argv and "q35,kernel-irqchip=split" in argv
    assert any(a.startswith("nvme,") and "sriov_max_vfs=2" in a for a in argv)
    assert any(a.startswith("e1000e,") for a in argv)
    append = argv[argv.index("-append") + 1]
    assert "kvmcheck.ip=10.77.0.12/24" in append and "kvmcheck.nfs=10.77.0.11" in append
    assert "intel_iommu=on" in append
    assert len(lab.tap_prefix) + 2 <= 15  # IFNAMSIZ
    assert "kvmcheck-local" not in joined  # a disk of its own is the power host's alone


def test_power_host_has_its_own_disk_and_a_power_cycle_command(tmp_path):
    lab, host, image = lab_and_host(tmp_path)
    power = LabHost(name="lab-power", index=3, directory=str(tmp_path / "lab/lab-power"), ssh_port=40023,
                    private_ip="10.77.0.13/24", tap=f"{lab.tap_prefix}3", memory_mib=2048, power=True)
    argv = lab._argv(power, image, "ssh-ed25519 AAAA lab", "10.77.0.11")
    assert f"file={power.directory}/local.img,if=none,id=local0,format=raw" in argv
    assert "virtio-blk-pci,drive=local0,serial=kvmcheck-local" in argv
    assert "kvmcheck.local=/var/lib/kvmcheck-local" in argv[argv.index("-append") + 1]
    assert argv[argv.index("-m") + 1] == "2048"
    lab.dir.mkdir(parents=True)
    lab._write_inventory([host, power])
    regular, kept = load_inventory(lab.dir / "inventory.toml")
    assert not regular.only and not regular.power_cycle and regular.local_dir is None
    assert kept.only == ("power-cycle",) and kept.local_dir == "/var/lib/kvmcheck-local"
    assert kept.power_cycle[0] == "env" and kept.power_cycle[1] == f"KVMCHECK_LAB_DIR={lab.dir}"
    assert kept.power_cycle[-3:] == ("lab", "power-cycle", "lab-power")
    assert regular.scratch == "/var/tmp/kvmcheck" and kept.scratch is None  # the power host's RAM dies with it


def test_inventory_lists_private_address_shared_workdir_and_assignable(tmp_path):
    lab, host, _ = lab_and_host(tmp_path)
    lab.dir.mkdir(parents=True)
    lab._write_inventory([host])
    (spec,) = load_inventory(lab.dir / "inventory.toml")
    assert spec.name == "lab-2" and spec.port == 40022 and spec.hostname == "127.0.0.1"
    assert spec.migrate_address == "10.77.0.12" and spec.bridge == "br0"
    assert spec.workdir == "/srv/kvmcheck" and spec.boot_timeout == 300
    assert spec.assignable == ("0000:00:03.0", "0000:00:04.0")
    assert spec.known_hosts == str(lab.dir / "known_hosts") and not spec.accept_new_host_key


def test_two_lab_dirs_get_separate_namespaces(tmp_path):
    assert Lab(tmp_path / "a").netns != Lab(tmp_path / "b").netns


def test_a_lab_hosts_ssh_port_is_below_the_ephemeral_range():
    """The kernel never hands such a port to an outgoing connection, so a power-cycled host
    finds its port free again (one from the range went to the run's own connection once)."""
    ephemeral = _ephemeral_ports()
    ports = {_free_port() for _ in range(20)}
    assert all(1024 <= port < ephemeral.start for port in ports), (ports, ephemeral)
    assert len(ports) > 1  # chosen at random: two labs' hosts do not try the same one first


def test_the_ephemeral_range_is_the_kernels_or_linuxs_default(tmp_path):
    custom = tmp_path / "range"
    custom.write_text("40000\t50000\n")
    assert _ephemeral_ports(str(custom)) == range(40000, 50001)
    assert _ephemeral_ports(str(tmp_path / "missing")) == range(32768, 61000)
    assert _free_port(range(1024, 2000)) in _ephemeral_ports()  # no room below the range: any free port


def test_a_lab_hosts_qemu_counts_as_alive_by_its_pidfile_until_it_has_ended(tmp_path):
    """A process whose argv names the host's pidfile is its QEMU; another is a recycled pid."""
    _, host, _ = lab_and_host(tmp_path)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", host.pidfile])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/elsewhere/qemu.pid"])
    try:
        for proc in (ours, other):  # until each runs its own argv, not a fork of this one
            while b"time.sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                pass
        assert LabHost(**{**host.__dict__, "pid": ours.pid}).alive()
        assert not LabHost(**{**host.__dict__, "pid": other.pid}).alive()
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
    assert not LabHost(**{**host.__dict__, "pid": ours.pid}).alive()


def test_a_process_with_a_running_thread_is_not_over():
    """What alive() asks of a QEMU whose main thread let go of its argv while others still end."""
    assert _threads_running(os.getpid())
    zombie = subprocess.Popen(["true"])
    while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
        pass  # ended, not yet reaped: no thread of it runs
    try:
        assert not _threads_running(zombie.pid)
    finally:
        zombie.wait()
