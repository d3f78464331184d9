"""The reports as a reviewer sees them, in a real browser (Debian's chromium, headless):
report.html opens on the verdict matrix, whose cells agree with run.json; the run-history
matrix page too; the Allure 3 report (npm package ``allure``) groups by host and feature.
Screenshots go to reports/ for a person to look at."""
import json
import re
import shutil
import subprocess
import sys

from pytest_kvmcheck import verdicts
from pytest_kvmcheck.matrix import cells

from .conftest import ROOT, assert_nothing_left, run_pytest

SCREEN = (1280, 900)
SUITE = '''"""Handbook 9.9, a demo chapter: one of each verdict."""
import pytest

def test_passes(kvm_host, kvm_note, kvm_metric):
    """Handbook 9.9: a check that passes."""
    kvm_note("handbook 9.9", "what the command means today")
    kvm_metric("demo_latency", 1.5, "ms")

def test_fails(kvm_host):
    """Handbook 9.9: a check that fails."""
    assert False, "the host said no"

@pytest.mark.kvm_requires("libvirt")
def test_skips(kvm_host):
    """Handbook 9.9: a check that skips."""
'''
OTHER = '''"""Handbook 9.8, another chapter."""

def test_passes_too(kvm_host):
    """Handbook 9.8: a check that passes."""
'''
# Once loaded, the page reports where the matrix landed (its top, in CSS pixels) in its title.
WHERE = ("<script>window.addEventListener('load', () => setTimeout(() => {const r = document.getElementById("
         "'kvm-matrix').getBoundingClientRect(); document.title = 'kvm-matrix-top:' + Math.round(r.top);}, 500));"
         "</script>")


def chromium(*args: str) -> str:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is not installed (make setup installs it)"
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--window-size={SCREEN[0]},{SCREEN[1]}", "--virtual-time-budget=8000",
                             "--allow-file-access-from-files", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def shown_cells(dom: str) -> dict[str, tuple[str, str]]:
    """data-verdict and data-counts of each matrix cell, in document order (feature-major)."""
    return [m for m in re.findall(r'class="kvm-cell kvm-(\w+)" data-verdict="(\w+)" data-counts="([^"]*)"', dom)]


def expected_cells(tests: list[dict]) -> list[tuple[str, str, str]]:
    grid = cells(tests)
    out = []
    for feature in sorted({f for _, f in grid}):
        for host in sorted({h for h, _ in grid}):
            counts = grid[(host, feature)]
            verdict = verdicts.cell_verdict(counts)
            out.append((verdict, verdict, ", ".join(f"{counts[v]} {v}" for v in verdicts.ORDER if counts[v])))
    return out


def test_reports_in_a_real_browser(pytester, workdir):
    pytester.makepyfile(test_demo=SUITE, test_other=OTHER)
    out = pytester.path
    result = run_pytest(pytester, f"--kvm-hosts=local?workdir={workdir}", f"--html={out}/report.html",
                        "--self-contained-html", f"--alluredir={out}/allure", f"--kvm-record={out}/run.json")
    assert result.ret == 1, result.stdout.str()[-3000:]
    record = json.loads((out / "run.json").read_text())
    shots = ROOT / "reports"
    shots.mkdir(exist_ok=True)

    # report.html: the matrix's cells and counts are run.json's, and it is on the first screen.
    dom = chromium("--dump-dom", (out / "report.html").as_uri())
    assert shown_cells(dom) == expected_cells(record["tests"]), shown_cells(dom)
    assert shown_cells(dom)[0][1] == "FAIL" and "1 PASS, 1 FAIL, 1 SKIP" in dom
    # A note reaches the reviewer as an extra; a metric is recorded in run.json, not attached as a note.
    extras = re.findall(r'&#34;name&#34;: &#34;([^&]*)&#34;, &#34;format_type&#34;',
                        (out / "report.html").read_text())
    assert "handbook 9.9" in extras and "kvm_metric" not in extras, extras
    (passes,) = [t for t in record["tests"] if t["nodeid"].startswith("test_demo.py::test_passes[")]
    assert passes["metrics"]["demo_latency"]["samples"] == [1.5], passes
    probe = out / "report-where.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", WHERE + "</body>"))
    top = int(re.search(r"<title[^>]*>kvm-matrix-top:(-?\d+)</title>", chromium("--dump-dom", probe.as_uri())).group(1))
    assert 0 <= top < SCREEN[1] - 150, f"the matrix starts at {top} px: not on the first screen"
    chromium(f"--screenshot={shots / 'report-first-screen.png'}", (out / "report.html").as_uri())
    assert (shots / "report-first-screen.png").stat().st_size > 10_000

    # kvmcheck matrix: two runs side by side, the same cells in each column.
    subprocess.run([sys.executable, "-m", "pytest_kvmcheck.cli", "matrix", str(out / "run.json"),
                    str(out / "run.json"), "-o", str(out / "matrix.html")], check=True, timeout=60)
    history = chromium("--dump-dom", (out / "matrix.html").as_uri())
    assert sorted(shown_cells(history)) == sorted(expected_cells(record["tests"]) * 2)
    chromium(f"--screenshot={shots / 'matrix.png'}", (out / "matrix.html").as_uri())

    # Allure 3: generated with the project's config, grouped by host, then feature.
    allure = ROOT / ".tools" / "node_modules" / ".bin" / "allure"
    assert allure.exists(), "the Allure 3 command line is not installed (make setup installs the npm package)"
    subprocess.run([str(allure), "generate", str(out / "allure"), "-o", str(out / "allure-report"),
                    "--config", str(ROOT / "allurerc.mjs")], check=True, capture_output=True, timeout=300)
    tree = json.loads((out / "allure-report" / "widgets" / "tree.json").read_text())
    groups = tree["groupsById"]
    (host,) = [groups[g] for g in tree["root"]["groups"]]
    assert host["name"] == "local" and sorted(groups[g]["name"] for g in host["groups"]) == ["test_demo", "test_other"]
    statuses = {leaf["name"]: leaf["status"] for leaf in tree["leavesById"].values()}
    assert statuses == {"test_passes[local]": "passed", "test_fails[local]": "failed",
                        "test_skips[local]": "skipped", "test_passes_too[local]": "passed"}, statuses
    page = chromium("--dump-dom", (out / "allure-report" / "index.html").as_uri())
    assert "test_demo" in page and "local" in page, page[-2000:]
    chromium(f"--screenshot={shots / 'allure.png'}", (out / "allure-report" / "index.html").as_uri())
    assert_nothing_left(workdir, result.stdout.str())
