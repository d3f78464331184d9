"""The run's per-machine locks: measurements alone on their machine, the other tests together."""
import threading
import time

from pytest_kvmcheck.machines import MachineLocks


def hold_in_thread(locks, machines, exclusive, entered, release, log, tag):
    def body():
        with locks.hold(machines, exclusive):
            log.append(f"{tag} in")
            entered.set()
            release.wait(5)
            log.append(f"{tag} out")
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_shared_holders_run_together(tmp_path):
    locks, log = MachineLocks(tmp_path), []
    a_in, b_in, release = threading.Event(), threading.Event(), threading.Event()
    a = hold_in_thread(locks, ["m"], False, a_in, release, log, "a")
    b = hold_in_thread(locks, ["m"], False, b_in, release, log, "b")
    assert a_in.wait(2) and b_in.wait(2), "two tests holding a machine shared must not wait for each other"
    release.set()
    a.join(2), b.join(2)


def test_a_measurement_waits_for_the_running_tests_and_goes_before_later_ones(tmp_path):
    locks, log = MachineLocks(tmp_path), []
    running_in, running_out = threading.Event(), threading.Event()
    running = hold_in_thread(locks, ["m"], False, running_in, running_out, log, "running")
    assert running_in.wait(2)
    measure_in, measure_out = threading.Event(), threading.Event()
    measure = hold_in_thread(locks, ["m"], True, measure_in, measure_out, log, "measure")
    time.sleep(0.2)
    later_in, later_out = threading.Event(), threading.Event()
    later = hold_in_thread(locks, ["m"], False, later_in, later_out, log, "later")
    time.sleep(0.2)
    assert not measure_in.is_set() and not later_in.is_set(), log
    running_out.set()
    assert measure_in.wait(2), log
    time.sleep(0.2)
    assert not later_in.is_set(), f"a test started beside a measurement: {log}"
    measure_out.set()
    assert later_in.wait(2), log
    later_out.set()
    for t in (running, measure, later):
        t.join(2)
    assert log == ["running in", "running out", "measure in", "measure out", "later in", "later out"]


def test_other_machines_are_not_held_up(tmp_path):
    locks, log = MachineLocks(tmp_path), []
    measure_in, measure_out = threading.Event(), threading.Event()
    measure = hold_in_thread(locks, ["lab"], True, measure_in, measure_out, log, "measure")
    assert measure_in.wait(2)
    other_in, other_out = threading.Event(), threading.Event()
    other = hold_in_thread(locks, ["elsewhere"], False, other_in, other_out, log, "other")
    assert other_in.wait(2), "a host on another machine waited for a measurement it does not share a CPU with"
    measure_out.set(), other_out.set()
    measure.join(2), other.join(2)


def test_machines_taken_in_any_order_do_not_deadlock(tmp_path):
    locks, done = MachineLocks(tmp_path), []

    def worker(machines, exclusive):
        for _ in range(30):
            with locks.hold(machines, exclusive):
                pass
        done.append(machines)
    threads = [threading.Thread(target=worker, args=(m, x), daemon=True)
               for m, x in ((["a", "b"], True), (["b", "a"], True), (["b", "a"], False), (["a"], False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(done) == 4, "two tests holding two machines each waited on each other"
