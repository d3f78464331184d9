"""The run's per-machine locks: a measurement alone on its machine, the other tests together."""
import threading
import time

from pytest_kvmcheck.machines import MachineHold


def in_thread(directory, machines, alone, entered, release, log, tag):
    """A test holding ``machines``; with ``alone``, its measurement; ``release`` ends it."""
    def body():
        with MachineHold(directory, machines) as held:
            if alone:
                with held.alone():
                    log.append(f"{tag} in")
                    entered.set()
                    release.wait(5)
                    log.append(f"{tag} out")
            else:
                log.append(f"{tag} in")
                entered.set()
                release.wait(5)
                log.append(f"{tag} out")
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_tests_hold_a_machine_together(tmp_path):
    log, release = [], threading.Event()
    a_in, b_in = threading.Event(), threading.Event()
    threads = [in_thread(tmp_path, ["m"], False, a_in, release, log, "a"),
               in_thread(tmp_path, ["m"], False, b_in, release, log, "b")]
    assert a_in.wait(2) and b_in.wait(2), "two tests holding a machine shared must not wait for each other"
    release.set()
    for t in threads:
        t.join(2)


def test_a_measurement_waits_for_the_running_tests_and_goes_before_later_ones(tmp_path):
    log = []
    running_in, running_out = threading.Event(), threading.Event()
    running = in_thread(tmp_path, ["m"], False, running_in, running_out, log, "running")
    assert running_in.wait(2)
    measure_in, measure_out = threading.Event(), threading.Event()
    measure = in_thread(tmp_path, ["m"], True, measure_in, measure_out, log, "measure")
    time.sleep(0.2)
    later_in, later_out = threading.Event(), threading.Event()
    later = in_thread(tmp_path, ["m"], False, later_in, later_out, log, "later")
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
    measure_in, measure_out = threading.Event(), threading.Event()
    measure = in_thread(tmp_path, ["lab"], True, measure_in, measure_out, log, "measure")
    assert measure_in.wait(2)
    other_in, other_out = threading.Event(), threading.Event()
    other = in_thread(tmp_path, ["elsewhere"], False, other_in, other_out, log, "other")
    assert other_in.wait(2), "a host on another machine waited for a measurement it does not share a CPU with"
    measure_out.set(), other_out.set()
    measure.join(2), other.join(2)


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
