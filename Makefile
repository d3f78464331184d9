# The README's two commands: `make suite` (qualify this machine) and `make test` (our own tests).
PYTEST = .venv/bin/pytest
REPORTS = reports

.PHONY: setup suite lab-suite test lint bench clean

setup:
	bash scripts/setup.sh

suite: setup
	$(PYTEST) suites -n auto --dist loadscope \
	  --html=$(REPORTS)/report.html --self-contained-html \
	  --alluredir=$(REPORTS)/allure --junitxml=$(REPORTS)/junit.xml \
	  --kvm-artifacts=$(REPORTS)/artifacts $(PYTEST_ARGS); \
	status=$$?; \
	.tools/node_modules/.bin/allure generate $(REPORTS)/allure -o $(REPORTS)/allure-report --config allurerc.mjs >/dev/null; \
	echo "reports: $(REPORTS)/report.html (HTML), $(REPORTS)/allure-report (Allure), $(REPORTS)/junit.xml (JUnit), $(REPORTS)/run.json (for kvmcheck compare)"; \
	exit $$status

# The full lab run: the virtual KVM lab's hosts (booted if not up), every suite, reports under reports/lab.
# The lab's hosts are clones: --kvm-spread runs each host-local feature on one of them, weighed
# by the seconds of an earlier full lab run (fixtures/lab-durations.json).
lab-suite: setup
	.venv/bin/kvmcheck lab up
	$(PYTEST) suites --kvm-hosts=lab --kvm-spread --kvm-durations=fixtures/lab-durations.json -n 2 --dist loadscope \
	  --html=$(REPORTS)/lab/report.html --self-contained-html \
	  --alluredir=$(REPORTS)/lab/allure --junitxml=$(REPORTS)/lab/junit.xml --kvm-record=$(REPORTS)/lab/run.json $(PYTEST_ARGS)

# loadgroup: each test goes to whichever worker is free (the lab's tests stay together on one).
test: setup
	.venv/bin/ruff check pytest_kvmcheck suites tests benchmarks scripts
	$(PYTEST) tests -n auto --dist loadgroup $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check pytest_kvmcheck suites tests benchmarks scripts

bench: setup
	.venv/bin/python benchmarks/bench.py

clean:
	.venv/bin/kvmcheck cleanup || true
	rm -rf $(REPORTS)/report.html $(REPORTS)/allure $(REPORTS)/junit.xml $(REPORTS)/artifacts
