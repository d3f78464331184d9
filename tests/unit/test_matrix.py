"""The verdict matrix and the run record's pieces: cells, counts, links, history columns."""
import re

from pytest_kvmcheck.matrix import history_page, matrix_table, report_head
from pytest_kvmcheck.run import Unmet

TESTS = [{"host": h, "feature": f, "verdict": v, "notes": {"handbook": n} if n else {}}
         for h, f, v, n in [("lab-1", "test_virtio_blk", "PASS", ""), ("lab-1", "test_virtio_blk", "FAIL", ""),
                            ("lab-2", "test_virtio_blk", "PASS", "handbook: -drive if=virtio"),
                            ("lab-1", "test_ksm", "SKIP", ""), ("lab-2", "test_ksm", "ERROR", "")]]


def cells_of(page: str):
    return re.findall(r'data-verdict="(\w+)" data-counts="([^"]*)"', page)


def test_matrix_cells_say_the_verdict_and_counts_and_link_to_rows():
    table = matrix_table(TESTS)
    assert cells_of(table) == [("SKIP", "1 SKIP"), ("ERROR", "1 ERROR"), ("FAIL", "1 PASS, 1 FAIL"), ("PASS", "1 PASS")]
    assert 'href="#kvm-lab-1-test-virtio-blk"' in table


def test_report_head_has_the_totals_fingerprints_and_notes():
    head = report_head(TESTS, {"lab-1": {"fingerprint": {"qemu_version": "7.2.22"}}, "lab-2": {"fingerprint": {}}})
    assert "2 PASS, 1 FAIL, 1 ERROR, 0 BROKEN, 1 SKIP" in head
    assert "<td>7.2.22</td>" in head and "handbook: -drive if=virtio" in head
    assert ".summary{order:-1}" in head  # above pytest-html's environment table


def test_history_columns_per_run():
    page = history_page([("a/run.json", {"run_id": "r1", "tests": TESTS}),
                         ("b/run.json", {"run_id": "r2", "tests": TESTS[:2]})])
    assert page.count("<th>r1<br>") == 1 and "<th>r2<br>" in page
    assert cells_of(page)[:2] == [("SKIP", "1 SKIP"), ("FAIL", "1 PASS, 1 FAIL")]  # lab-1's rows, both runs
    assert 'kvm-none">-</td>' in page  # lab-2 did not run in r2


def test_an_expected_need_reads_as_a_broken_promise():
    assert str(Unmet("prod-1", "vhost-net", "/dev/vhost-net is missing", expected=True)) == \
        "host prod-1: expected vhost-net (its inventory's expect), but /dev/vhost-net is missing"
    assert str(Unmet("prod-1", "ksm", "no /sys/kernel/mm/ksm")) == "host prod-1: needs ksm: no /sys/kernel/mm/ksm"
