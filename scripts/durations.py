"""Keep of run records only what ``--kvm-durations`` reads: each test's feature, id and seconds.

    python scripts/durations.py reports/lab/run.json [more runs...] > fixtures/lab-durations.json

A test found in several records (or on several hosts) keeps the median of its seconds; tests
that did not run (skipped, deselected) are left out. The output is itself a run record, small
enough to keep in the repository.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from statistics import median

from pytest_kvmcheck import record


def durations(records: list[dict]) -> dict:
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    schema = "kvmcheck-run/1"
    for document in records:
        schema = document["schema"]
        for test in document.get("tests", ()):
            if test.get("duration_s") is not None and test.get("verdict") not in ("SKIP", None):
                seconds[(test["feature"], test["test"].rsplit("::", 1)[-1])].append(test["duration_s"])
    return {"schema": schema, "note": "seconds per test for --kvm-durations (scripts/durations.py)",
            "tests": [{"feature": feature, "test": test, "duration_s": round(median(values), 1)}
                      for (feature, test), values in sorted(seconds.items())]}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    document = durations([record.load(path) for path in sys.argv[1:]])
    tests = ",\n".join(json.dumps(test) for test in document.pop("tests"))
    print(json.dumps(document)[:-1] + f', "tests": [\n{tests}\n]}}')  # a test a line: diffs read well
