"""A run prepares several hosts at once: a fleet is ready in about the time of its slowest host."""
import threading
import time

import pytest

from pytest_kvmcheck.errors import KvmCheckError
from pytest_kvmcheck.hosts.capabilities import Capabilities
from pytest_kvmcheck.hosts.footprint import HostRun
from pytest_kvmcheck.hosts.spec import parse_hosts
from pytest_kvmcheck.run import KvmRun

PREPARE_S = 0.5


class SlowRun(KvmRun):
    """A run whose preparation of a host only waits (as copying the image and probing would)
    and fails for hosts named bad-*; it counts how many preparations run at the same time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running = self.most = 0
        self.counting = threading.Lock()
        self.announced = []
        self.on_host_prepared = lambda prepared: self.announced.append((prepared.name, threading.current_thread()))

    def _ensure_state(self):
        self.state_dir.mkdir(exist_ok=True)  # no run key: unit tests make none (test_plugin_is_light)

    def _prepare(self, spec, transport):
        with self.counting:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(PREPARE_S)
        with self.counting:
            self.running -= 1
        if spec.name.startswith("bad-"):
            return {"error": f"host {spec.name}: unreachable"}
        return {"caps": Capabilities(host=spec.name).to_dict(),
                "host_run": HostRun(f"/nonexistent/{spec.name}", "", "", "ssh-ed25519 AAAA").to_dict()}


@pytest.fixture
def run(tmp_path):
    specs = parse_hosts(",".join(f"local?name={n}" for n in ("one", "two", "three", "bad-four")))
    made = SlowRun(specs, tmp_path / "state", "12050000-abcdef")
    yield made
    made.close()


def test_hosts_are_prepared_at_once_and_each_once(run):
    started = time.monotonic()
    run.prepare_all(["one", "two", "three", "bad-four", "two"])
    took = time.monotonic() - started
    assert run.most == 4, f"at most {run.most} preparations ran at once"
    assert took < 3 * PREPARE_S, f"four hosts took {took:.2f} s: prepared one after another"
    assert run.host("one").name == "one" and run.host("two").caps.host == "two"
    # The cause goes to the first asker (a test, doctor's row), not to the pool that prepared it.
    with pytest.raises(KvmCheckError, match="host bad-four: unreachable"):
        run.host("bad-four")
    with pytest.raises(KvmCheckError, match="host bad-four could not be prepared: the first test on it"):
        run.host("bad-four")
    run.prepare_all(["one", "three"])  # already prepared: nothing again
    assert time.monotonic() - started - took < PREPARE_S / 2
    # The hook is called once per host, from the thread that asked for it, not from the pool.
    assert [name for name, _ in run.announced] == ["one", "two"]
    assert {thread for _, thread in run.announced} == {threading.current_thread()}
