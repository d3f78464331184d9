"""The plugin does nothing heavy unless a test needs a host: no state dir, no key, no probe."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def leftovers(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if "kvmcheck" in p.name or p.name.startswith("id_"))


@pytest.mark.parametrize("args", [["--help"], ["tests/unit", "--collect-only", "-q"], ["tests/unit", "-q", "-n", "2"],
                                  ["suites", "--collect-only", "-q"]],
                         ids=["help", "collect-unit", "run-unit-xdist", "collect-suites"])
def test_no_state_dir_and_no_key(tmp_path, args):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "KVMCHECK_CACHE": str(tmp_path / "cache")}
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert leftovers(tmp_path) == [], f"pytest {' '.join(args)} made {leftovers(tmp_path)}"
