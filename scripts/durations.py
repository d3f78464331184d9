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
from pytest_kvmcheck.spread import duration_key


def durations(records: list[dict]) -> dict:
    seconds: dict[str, list[float]] = defaultdict(list)  # by the name --kvm-durations looks tests up by
    schema = "kvmcheck-run/1"
    for document in records:
        schema = document["schema"]
        for test in document.get("tests", ()):
            if test.get("duration_s") is not None and test.get("verdict") not in ("SKIP", None):
                seconds[duration_key(test["feature"], test["test"])].append(test["duration_s"])
    return {"schema": schema, "note": "seconds per test for --kvm-durations (scripts/durations.py)",
            "tests": [{"feature": key.partition("::")[0], "test": key.partition("::")[2],
                       "duration_s": round(median(values), 1)} for key, values in sorted(seconds.items())]}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    document = durations([record.load(path) for path in sys.argv[1:]])
    tests = ",\n".join(json.dumps(test) for test in document.pop("tests"))
    print(json.dumps(document)[:-1] + f', "tests": [\n{tests}\n]}}')  # a test a line: diffs read well
