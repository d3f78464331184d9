"""The guest vocabulary's parsers: what lspci, sysfs and /proc print, read into plain data."""
from pytest_kvmcheck.guests.shows import (BlockDevice, PciFunction, console_excerpt, crash_report, first_checksum, kernel_crashed,
                                          listening_ports, parse_cpu_list, parse_lspci, parse_meminfo)
from pytest_kvmcheck.hosts.transport import CommandResult

LSPCI = """\
0000:00:00.0 Host bridge [0600]: Intel Corporation 440FX - 82441FX PMC [Natoma] [8086:1237] (rev 02)
\tSubsystem: Red Hat, Inc. Qemu virtual machine [1af4:1100]
0000:00:01.1 IDE interface [0101]: Intel Corporation 82371SB PIIX3 IDE [Natoma/Triton II] [8086:7010] (prog-if 80 [ISA Compatibility mode-only controller, supports bus mastering])
\tSubsystem: Red Hat, Inc. Qemu virtual machine [1af4:1100]
\tKernel driver in use: ata_piix
0000:00:03.0 Ethernet controller [0200]: Red Hat, Inc. Virtio network device [1af4:1000]
\tSubsystem: Red Hat, Inc. Device [1af4:0001]
\tKernel driver in use: virtio-pci
0000:00:04.0 Unclassified device [00ff]: Red Hat, Inc. Virtio memory balloon [1af4:1002]
"""


def test_lspci_functions_with_names_ids_and_drivers():
    functions = parse_lspci(LSPCI)
    assert [f.address for f in functions] == ["0000:00:00.0", "0000:00:01.1", "0000:00:03.0", "0000:00:04.0"]
    assert functions[2] == PciFunction("0000:00:03.0", "Ethernet controller", "0200", "Red Hat, Inc. Virtio network device",
                                       "1af4:1000", "virtio-pci")
    assert functions[0].vendor_device == "8086:1237" and functions[0].driver == ""
    assert functions[1].driver == "ata_piix" and functions[1].name.endswith("PIIX3 IDE [Natoma/Triton II]")
    assert functions[3].driver == "" and "balloon" in str(functions[3])


def test_cpu_lists():
    assert parse_cpu_list("0\n") == {0}
    assert parse_cpu_list("0-2,4,6-7") == {0, 1, 2, 4, 6, 7}
    assert parse_cpu_list("") == set()


def test_meminfo_in_kib():
    info = parse_meminfo("MemTotal:         496456 kB\nMemFree:          455000 kB\nHugePages_Total:       0\n")
    assert info == {"MemTotal": 496456, "MemFree": 455000, "HugePages_Total": 0}


def test_checksum_of_sha256sum_output():
    assert first_checksum("ab12  -\n") == "ab12"
    assert first_checksum("") == ""


def test_direct_reads_runs_the_probe_and_reads_its_line():
    class Guest:
        name, calls = "g", []

        def run(self, command, timeout=30.0, check=False, input=None):
            self.calls.append(command)
            return CommandResult(tuple(command), 0, "ops 2000 bytes 8192000 seconds 2.000\n", "")

    guest = Guest()
    reads = BlockDevice(guest, "vdb").direct_reads("randread", 2.0)
    assert guest.calls == [["kvmcheck-io", "randread", "/dev/vdb", "2"]]
    assert (reads.iops, reads.mb_per_s) == (1000.0, 4.096)


OOPS = """\
KVMCHECK-READY 4.31 0.12
[    7.461870] BUG: unable to handle page fault for address: ffffea00003bdf08
[    7.461920] #PF: supervisor read access in kernel mode
[    7.461955] Oops: 0000 [#1] PREEMPT SMP NOPTI
[    7.462010] RIP: 0010:release_pages+0x1a5/0x4c0
[    7.462872] RDX: 0000000000000000 RSI: 00000000ffffefff RDI: 0000000000000001
[    7.463202] PKRU: 55555554
[    7.463230] note: dropbear[121] exited with irqs disabled
[    7.463363] note: dropbear[121] exited with preempt_count 1
"""


def test_console_excerpt_is_the_tail_or_the_kernels_crash_report():
    assert console_excerpt("a\nb\nc\n", 2) == "b\nc"
    assert console_excerpt("", 5) == ""
    shown = console_excerpt(OOPS, 3)
    assert shown.startswith("the guest's kernel reported a crash or a stall:\n[    7.461870] BUG: unable to handle page fault")
    assert "RIP: 0010:release_pages" in shown and shown.endswith("exited with preempt_count 1")
    assert "KVMCHECK-READY" not in shown
    long = "[    1.0] WARNING: CPU: 0 PID: 1 at x\n" + "".join(f"[    1.0] line {i}\n" for i in range(50))
    cut = console_excerpt(long, 3, report_lines=10).splitlines()
    assert cut[1].endswith("WARNING: CPU: 0 PID: 1 at x") and cut[-2] == "[... 40 more lines ...]" and \
        cut[-1].endswith("line 49")


def test_a_stalled_cpu_counts_as_a_crash_report():
    """A destination guest whose CPU stalled after a move (TCG, CI) answered no login for a
    minute: its console's RCU stall report is what says why."""
    stall = ("KVMCHECK-READY 4.2 0.1\n[   35.768846] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
             "[   35.771357] rcu: \t1-...0: (1 GPs behind) idle=54b4/1/0x4000000000000000 softirq=1083/1084\n")
    assert kernel_crashed(stall) and kernel_crashed("[ 61.2] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!")
    assert console_excerpt(stall, 1).startswith("the guest's kernel reported a crash or a stall:\n[   35.768846] rcu:")
    assert not kernel_crashed("KVMCHECK-READY 4.2 0.1\n[    1.0] virtio_net virtio1 eth1: renamed\n")


def test_listening_ports_come_from_the_kernels_tcp_tables():
    text = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 20 0
   1: 0F02000A:0016 0202000A:C2A4 01 00000000:00000000 02:000A7F1A 00000000     0        0 1240 4 0 20 4
   2: 0100007F:1E5B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1250 1 0 20 0
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:1E5C 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000000000000:1E5D 00000000000000000000000000000000:0000 06 00000000:00000000
"""
    assert listening_ports(text) == {22, 7771, 7772}  # 49828 is a connection, 7773 is TIME_WAIT


def test_a_crash_report_is_the_kernels_report_or_nothing():
    assert crash_report("[    1.0] Run /init as init process\nlogin:") == ""
    report = crash_report("booted\n[   15.0] kernel BUG at lib/list_debug.c:62!\n[   15.0] RIP: 0010:x\n")
    assert report.startswith("the guest's kernel reported a crash or a stall:\n[   15.0] kernel BUG at lib/list_debug.c:62!")
