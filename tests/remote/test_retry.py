"""Retries (which errors, how many attempts, how long between) and the node-wide request cap (NodeGate)."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import pickle
import queue
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from shardstore.errors import ConfigError
from shardstore.remote.gate import NodeGate
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)
from shardstore.remote.retry import RetryPolicy, call_with_retries


class Flaky:
    """Raises ``errors`` one per call, then returns ``value``; counts its calls."""

    def __init__(self, errors: list[BaseException], value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def run(fn, policy=None, seed=0, on_retry=None):
    sleeps: list[float] = []
    result = call_with_retries(fn, what="GET s3://b/k [0, 8)", policy=policy, sleep=sleeps.append,
                               rng=random.Random(seed), on_retry=on_retry)
    return result, sleeps


# ---- retries ----

def test_transient_failures_are_retried_until_success():
    fn = Flaky([TransientRemoteError("503 SlowDown")] * 3)
    result, sleeps = run(fn)
    assert result == "ok" and fn.calls == 4 and len(sleeps) == 3


def test_sleeps_are_full_jitter_within_the_doubling_ceiling():
    policy = RetryPolicy(attempts=12, base_s=0.1, cap_s=1.0)
    seen: list[list[float]] = []
    for seed in range(20):
        fn = Flaky([TransientRemoteError("x")] * 11)
        _, sleeps = run(fn, policy, seed=seed)
        assert len(sleeps) == 11
        for k, s in enumerate(sleeps):
            assert 0.0 <= s <= min(1.0, 0.1 * 2 ** k)
        seen.append(sleeps)
    # jitter: the same failure count does not always sleep the same, and late sleeps use the cap's range
    assert len({round(s[5], 9) for s in seen}) > 10
    assert max(s[10] for s in seen) > 0.5


def test_seeded_rng_makes_sleeps_reproducible():
    a = run(Flaky([TransientRemoteError("x")] * 4), seed=7)[1]
    b = run(Flaky([TransientRemoteError("x")] * 4), seed=7)[1]
    assert a == b


def test_gives_up_after_the_attempts_with_a_one_line_message_naming_request_attempts_and_cause():
    fn = Flaky([TransientRemoteError("503 SlowDown\nsecond line")] * 100)
    with pytest.raises(RemoteError, match=r"^GET s3://b/k \[0, 8\): failed after 5 attempts; last cause: "
                                          r"TransientRemoteError: 503 SlowDown; check the network") as info:
        run(fn, RetryPolicy(attempts=5))
    assert fn.calls == 5
    assert "\n" not in str(info.value)
    assert not isinstance(info.value, TransientRemoteError)   # an outer retry loop must not multiply attempts
    assert isinstance(info.value.__cause__, TransientRemoteError)


def test_no_sleep_after_the_last_attempt():
    sleeps: list[float] = []
    with pytest.raises(RemoteError):
        call_with_retries(Flaky([TransientRemoteError("x")] * 9), what="w", policy=RetryPolicy(attempts=3),
                          sleep=sleeps.append, rng=random.Random(0))
    assert len(sleeps) == 2


def test_one_attempt_never_retries():
    fn = Flaky([TransientRemoteError("x")])
    with pytest.raises(RemoteError, match="failed after 1 attempt;"):
        run(fn, RetryPolicy(attempts=1))
    assert fn.calls == 1


@pytest.mark.parametrize("error", [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"),
                                   ConnectionRefusedError(errno.ECONNREFUSED, "refused"), BrokenPipeError()])
def test_network_os_errors_are_retried(error):
    fn = Flaky([error, error])
    assert run(fn)[0] == "ok" and fn.calls == 3


@pytest.mark.parametrize("error", [ObjectNotFound("s3://b/k: not found"), ObjectChanged("s3://b/k: replaced"),
                                   RemoteError("s3://b/k: 403 Forbidden"), ValueError("bug"),
                                   FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "no")])
def test_other_errors_propagate_at_once(error):
    fn = Flaky([error])
    with pytest.raises(type(error)) as info:
        run(fn)
    assert info.value is error and fn.calls == 1


def test_on_retry_counts_each_retry():
    calls: list[tuple[int, str]] = []
    fn = Flaky([TransientRemoteError("a"), TimeoutError("b")])
    run(fn, on_retry=lambda n, e: calls.append((n, str(e))))
    assert calls == [(1, "a"), (2, "b")]


@pytest.mark.parametrize("kwargs, match", [({"attempts": 0}, "attempts must be a whole number >= 1"),
                                           ({"attempts": 2.5}, "attempts must be"),
                                           ({"base_s": -1}, "base_s must be a number of seconds >= 0"),
                                           ({"cap_s": float("nan")}, "cap_s must be")])
def test_policy_refuses_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RetryPolicy(**kwargs)


# ---- the node-wide request cap ----

def _count_holders(gate: NodeGate, rounds: int, current, peak, lock) -> None:
    for _ in range(rounds):
        with gate.slot():
            with lock:
                current.value += 1
                peak.value = max(peak.value, current.value)
            time.sleep(0.001)
            with lock:
                current.value -= 1


@pytest.mark.parametrize("directory", [None, "gate"])
def test_threads_of_one_process_never_exceed_the_limit(tmp_path, directory):
    gate = NodeGate(None if directory is None else tmp_path / directory, 3)
    ctx = mp.get_context("fork")
    current, peak, lock = ctx.Value("i", 0, lock=False), ctx.Value("i", 0, lock=False), threading.Lock()
    threads = [threading.Thread(target=_count_holders, args=(gate, 30, current, peak, lock)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak.value == 3 and current.value == 0


def _process_holders(gate: NodeGate, current, peak, lock) -> None:
    threads = [threading.Thread(target=_count_holders, args=(gate, 25, current, peak, lock)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.slow
def test_three_processes_never_exceed_the_node_limit(tmp_path, method):
    ctx = mp.get_context(method)
    gate = NodeGate(tmp_path / "gate", 2)
    current, peak, lock = ctx.Value("i", 0, lock=False), ctx.Value("i", 0, lock=False), ctx.Lock()
    procs = [ctx.Process(target=_process_holders, args=(gate, current, peak, lock)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert peak.value == 2 and current.value == 0
    assert sorted(os.listdir(tmp_path / "gate")) == ["slot-0.lock", "slot-1.lock"]


def _hold_forever(gate: NodeGate, ready) -> None:
    with gate.slot():
        ready.set()
        time.sleep(600)


def _take_in_thread(gate: NodeGate) -> tuple[threading.Event, threading.Event, threading.Thread]:
    taken, release = threading.Event(), threading.Event()

    def take() -> None:
        with gate.slot():
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return taken, release, thread


@pytest.mark.slow
def test_a_killed_holders_slot_is_taken_by_another_within_a_second(tmp_path):
    ctx = mp.get_context("spawn")
    gate = NodeGate(tmp_path / "gate", 1)
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_forever, args=(gate, ready))
    holder.start()
    try:
        assert ready.wait(30)
        taken, release, thread = _take_in_thread(gate)
        assert not taken.wait(0.3)                     # the slot really is held by the other process
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert taken.wait(1.0)
        release.set()
        thread.join(5)
    finally:
        if holder.is_alive():
            holder.kill()


def _hold_and_fork(gate: NodeGate, ready, q) -> None:
    with gate.slot():
        child = mp.get_context("fork").Process(target=time.sleep, args=(600,))
        child.start()
        q.put(child.pid)
        ready.set()
        time.sleep(600)


@pytest.mark.slow
def test_a_killed_holders_slot_frees_even_while_its_forked_child_lives(tmp_path):
    ctx = mp.get_context("spawn")
    gate = NodeGate(tmp_path / "gate", 1)
    ready, q = ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold_and_fork, args=(gate, ready, q))
    holder.start()
    child_pid = None
    try:
        assert ready.wait(30)
        child_pid = q.get(timeout=10)
        taken, release, thread = _take_in_thread(gate)
        assert not taken.wait(0.3)
        os.kill(holder.pid, signal.SIGKILL)            # (no join: the child keeps the holder's sentinel open)
        assert taken.wait(1.0)                         # the child's copy of the descriptor was closed at fork
        release.set()
        thread.join(5)
    finally:
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
        holder.kill()
        holder.join(10)


def _take_and_report(gate: NodeGate, q) -> None:
    with gate.slot():
        q.put(os.getpid())


def _slot_is_locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.slow
def test_a_forked_child_neither_inherits_nor_frees_the_parents_slot(tmp_path):
    ctx = mp.get_context("fork")
    gate = NodeGate(tmp_path / "gate", 1)
    q = ctx.Queue()
    with gate.slot():
        child = ctx.Process(target=_take_and_report, args=(gate, q))
        child.start()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.3)                         # the child waits: the slot is the parent's
        assert _slot_is_locked(tmp_path / "gate" / "slot-0.lock")
    assert q.get(timeout=10) == child.pid             # released by the parent: the child gets it
    child.join(10)
    assert child.exitcode == 0
    assert not _slot_is_locked(tmp_path / "gate" / "slot-0.lock")


def test_a_forked_child_that_exits_leaves_the_parents_slot_held(tmp_path):
    ctx = mp.get_context("fork")
    gate = NodeGate(tmp_path / "gate", 1)
    with gate.slot():
        child = ctx.Process(target=os._exit, args=(0,))
        child.start()
        child.join(10)
        assert _slot_is_locked(tmp_path / "gate" / "slot-0.lock")
        assert len(gate._held) == 1                     # the parent's bookkeeping still has its one slot
    assert not _slot_is_locked(tmp_path / "gate" / "slot-0.lock")


def test_gate_pickles_to_the_same_slots(tmp_path):
    gate = pickle.loads(pickle.dumps(NodeGate(tmp_path / "g", 4)))
    assert gate.directory == tmp_path / "g" and gate.limit == 4
    with gate.slot():
        pass


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_gate_refuses_a_bad_limit(limit):
    with pytest.raises(ConfigError, match="request limit must be a whole number >= 1"):
        NodeGate(None, limit)
