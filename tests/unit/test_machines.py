"""The run's per-machine locks: a measurement alone on its machine, the other tests together."""
import contextlib
import threading
import time

from pytest_kvmcheck.machines import MachineHold


class Holder:
    """A test in a thread holding ``machines`` (with ``alone``: its measurement): ``entered``
    is set once it is in, :meth:`end` lets it go."""

    def __init__(self, directory, machines, alone, log, tag):
        self.entered, self._release = threading.Event(), threading.Event()

        def body():
            with MachineHold(directory, machines) as held:
                with held.alone() if alone else contextlib.nullcontext():
                    log.append(f"{tag} in")
                    self.entered.set()
                    self._release.wait(5)
                    log.append(f"{tag} out")
        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def end(self):
        self._release.set()
        self._thread.join(2)


def test_tests_hold_a_machine_together(tmp_path):
    log = []
    a, b = Holder(tmp_path, ["m"], False, log, "a"), Holder(tmp_path, ["m"], False, log, "b")
    assert a.entered.wait(2) and b.entered.wait(2), "two tests holding a machine shared must not wait for each other"
    a.end(), b.end()


def test_a_measurement_waits_for_the_running_tests_and_goes_before_later_ones(tmp_path):
    log = []
    running = Holder(tmp_path, ["m"], False, log, "running")
    assert running.entered.wait(2)
    measure = Holder(tmp_path, ["m"], True, log, "measure")
    time.sleep(0.2)
    later = Holder(tmp_path, ["m"], False, log, "later")
    time.sleep(0.2)
    assert not measure.entered.is_set() and not later.entered.is_set(), log
    running.end()
    assert measure.entered.wait(2), log
    time.sleep(0.2)
    assert not later.entered.is_set(), f"a test started beside a measurement: {log}"
    measure.end()
    assert later.entered.wait(2), log
    later.end()
    assert log == ["running in", "running out", "measure in", "measure out", "later in", "later out"]


def test_two_measurements_in_running_tests_take_turns(tmp_path):
    """Both tests hold the machine shared when both want it alone: each lets go first."""
    log, done = [], []

    def body(tag):
        with MachineHold(tmp_path, ["m"]) as held:
            time.sleep(0.1)
            with held.alone():
                log.append(f"{tag} in")
                time.sleep(0.2)
                log.append(f"{tag} out")
        done.append(tag)
    threads = [threading.Thread(target=body, args=(t,), daemon=True) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(done) == ["a", "b"], f"two measurements waited on each other: {log}"
    assert log[0][0] == log[1][0] and log[2][0] == log[3][0], f"two measurements overlapped: {log}"


def test_other_machines_are_not_held_up(tmp_path):
    log = []
    measure = Holder(tmp_path, ["lab"], True, log, "measure")
    assert measure.entered.wait(2)
    other = Holder(tmp_path, ["elsewhere"], False, log, "other")
    assert other.entered.wait(2), "a host on another machine waited for a measurement it does not share a CPU with"
    measure.end(), other.end()


def test_machines_taken_in_any_order_do_not_deadlock(tmp_path):
    done = []

    def worker(machines, alone):
        for _ in range(30):
            with MachineHold(tmp_path, machines) as held:
                if alone:
                    with held.alone():
                        pass
        done.append(machines)
    threads = [threading.Thread(target=worker, args=(m, x), daemon=True)
               for m, x in ((["a", "b"], True), (["b", "a"], True), (["b", "a"], False), (["a"], False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(done) == 4, "two tests holding two machines each waited on each other"
