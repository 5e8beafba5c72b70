"""One training rank for the end-to-end remote tests, run in its own process.

A rank opens a cache in object storage through a node-local directory, reads epochs of a
``RandomShardSubsetCachedDataset`` with a torch ``DataLoader`` and writes a digest of every batch,
so the test compares them with the batches of the local-disk store::

    python -m tests.remote.rank_worker CONFIG.json    # one rank, as a fresh interpreter
    python -m tests.remote.rank_worker --serve        # a fork server: one rank per JSON line on stdin

The fork server imports torch once and forks a rank for every line it reads (``start TAG PID``
on stdout), then reports each rank's end (``exit PID CODE``; -9 after a SIGKILL). A test that
kills and restarts ranks dozens of times pays for torch's import once. It runs one thread, so
forking is safe; a forked rank opens its own object-store client.

A rank writes ``OUT.opened`` (its pid) once the store is open, and ``OUT`` (JSON: the digests per
epoch and its cache's counters) when it has read every epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: ``python -m tests.remote.rank_worker`` runs from here


def batch_digest(batch: dict[str, Any]) -> str:
    """A hash of a collated batch: every field's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(batch):
        array = batch[name].numpy() if hasattr(batch[name], "numpy") else batch[name]
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class StepBarrier:
    """What DDP's all-reduce does to the ranks' pace: no rank starts batch ``k + 1`` before all took batch ``k``.

    ``path`` holds one int64 per rank (the batches it has taken), shared through a memory map.
    """

    def __init__(self, path: str, rank: int, world_size: int) -> None:
        import mmap

        import numpy as np

        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), world_size * 8)
        self._steps = np.frombuffer(self._map, np.int64)
        self.rank = rank

    def wait(self, step: int, timeout_s: float = 120.0) -> None:
        import time

        self._steps[self.rank] = step
        deadline = time.monotonic() + timeout_s
        while self._steps.min() < step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: the other ranks did not reach step {step} "
                                   f"in {timeout_s:.0f} s (steps {self._steps.tolist()})")
            time.sleep(0.001)


def _worker_init(log: str | None, worker_id: int) -> None:
    """A DataLoader worker's stacks go to a file of its own when it gets SIGUSR1."""
    if log:
        global _stack_file
        _stack_file = open(f"{log}.worker{os.getpid()}", "w")  # noqa: SIM115 - open for the worker's life
        faulthandler.register(signal.SIGUSR1, file=_stack_file, all_threads=True)


_stack_file = None


def epoch_digests(dataset: Any, epochs: list[int], *, num_workers: int = 0, context: str | None = None,
                  persistent: bool = False, barrier: StepBarrier | None = None, log: str | None = None
                  ) -> dict[str, list[str]]:
    """The digests of every batch of ``epochs``, read through a sequential ``DataLoader``.

    ``persistent`` keeps the workers from one epoch to the next (one start each, not one per epoch).
    """
    import functools

    from torch.utils.data import DataLoader

    extra = {"multiprocessing_context": context} if num_workers and context else {}
    if num_workers:
        extra["worker_init_fn"] = functools.partial(_worker_init, log)
        extra["persistent_workers"] = persistent
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers, **extra)
    out: dict[str, list[str]] = {}
    step = 0
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out[str(epoch)] = digests = []
        for batch in loader:
            digests.append(batch_digest(batch))
            step += 1
            if barrier is not None:
                barrier.wait(step)
    return out


def make_dataset(store: Any, config: dict[str, Any]) -> Any:
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset

    return RandomShardSubsetCachedDataset(store, config["shards_per_epoch"], config["seed"], config["policy"],
                                          batch_size=config["batch_size"], rank=config["rank"],
                                          world_size=config["world_size"])


def run_rank(config: dict[str, Any]) -> None:
    """Open the store, read the epochs, write the digests (atomically, so a killed rank leaves none)."""
    from shardstore.store.reader import ShardStore

    store = ShardStore.open(config["url"], local_cache=config["local_cache"], cache_limit=config["cache_limit"],
                            prefetch_shards=config["prefetch_shards"])
    out = Path(config["out"])
    Path(f"{out}.opened").write_text(str(os.getpid()))
    dataset = make_dataset(store, config)
    barrier = config.get("step_barrier")
    digests = epoch_digests(dataset, config["epochs"], num_workers=config["num_workers"],
                            context=config.get("context"), log=config.get("log"),
                            barrier=StepBarrier(barrier, config["rank"], config["world_size"]) if barrier else None)
    result = {"pid": os.getpid(), "batches": digests,
              "cache": dataclasses.asdict(store.remote.cache.stats)}
    store.remote.close()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.rename(tmp, out)


def _child(config: dict[str, Any]) -> None:
    os.setpgid(0, 0)  # its own group: a test that kills it can end its DataLoader workers too
    if config.get("log"):  # each rank's own log, kept apart from the other ranks' and the server's
        fd = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that times out asks for every stack
    code = 0
    try:
        run_rank(config)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def serve() -> None:
    """Fork a rank for each JSON line on stdin; report starts and exits on stdout; end at EOF once all exited."""
    import importlib

    for name in ("torch", "shardstore.dataset.subset", "shardstore.store.remote"):
        importlib.import_module(name)  # imported once here, inherited by every rank

    _say("ready")
    children: set[int] = set()
    pending = b""
    open_input = True
    while open_input or children:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
        if not open_input:
            select.select([], [], [], 0.01)
            continue
        ready, _, _ = select.select([0], [], [], 0.01)
        if not ready:
            continue
        data = os.read(0, 1 << 16)
        if not data:
            open_input = False
            continue
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            config = json.loads(line)
            pid = os.fork()
            if pid == 0:
                os.close(0)
                _child(config)
            children.add(pid)
            _say(f"start {config['tag']} {pid}")


class RankServer:
    """``python -m tests.remote.rank_worker --serve`` with this process's environment: ranks forked on demand.

    ``start(config)`` returns the rank's pid; ``wait(pid)`` its exit code (-9 after SIGKILL). Each rank leads
    its own process group, so ``close`` can end what a killed rank's DataLoader workers left behind.
    """

    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed by close()
        self.log_path = log_path
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.remote.rank_worker", "--serve"], cwd=ROOT,
                                      env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log)
        self._started: dict[str, int] = {}
        self.exits: dict[int, int] = {}
        self.pids: list[int] = []
        self.logs: dict[int, Path] = {}
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._expect(lambda: self._ready, 60, "the rank server to start")

    _ready = False

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            words = raw.decode().split()
            with self._cv:
                if words == ["ready"]:
                    self._ready = True
                elif words[0] == "start":
                    self._started[words[1]] = int(words[2])
                elif words[0] == "exit":
                    self.exits[int(words[1])] = int(words[2])
                self._cv.notify_all()

    def _expect(self, condition, timeout_s: float, what: str) -> None:
        with self._cv:
            if self._cv.wait_for(condition, timeout_s):
                return
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; {self.dump_stacks()}")

    def ours(self) -> list[int]:
        """Live processes in the groups of the ranks started here (ranks and their DataLoader workers).

        Each rank leads its own process group; a killed rank's workers stay in its group. Processes are
        found by group and by command line, so a pid the system has since reused is never signalled.
        """
        groups, found = set(self.pids), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) in groups and fields[0] != "Z" and b"tests.remote.rank_worker" in cmdline:
                found.append(int(entry))
        return found

    def dump_stacks(self) -> str:
        """The Python stacks of every rank and worker started here (they write them on SIGUSR1), as one text."""
        live = self.ours()
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)
        out = [f"live rank and worker processes: {live}"]
        for pid in self.pids:
            log = self.logs[pid]
            for path in [log, *sorted(log.parent.glob(log.name + ".worker*"))]:
                text = path.read_text()
                if "most recent call first" in text:
                    out.append(f"--- {path.name} (rank process {pid}):\n{text[-5000:]}")
        return "\n".join(out)

    def start(self, config: dict[str, Any]) -> int:
        tag = f"{config['rank']}-{len(self._started)}"
        log = self.log_path.with_name(f"rank{tag}.log")
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps({**config, "tag": tag, "log": str(log)}) + "\n").encode())
        self._proc.stdin.flush()
        self._expect(lambda: tag in self._started, 30, f"rank {tag} to start")
        pid = self._started[tag]
        self.pids.append(pid)
        self.logs[pid] = log
        return pid

    def wait(self, pid: int, timeout_s: float = 60.0) -> int:
        self._expect(lambda: pid in self.exits, timeout_s, f"process {pid} to exit")
        return self.exits[pid]

    def ended_well(self, pid: int, timeout_s: float = 60.0) -> bool:
        """True if ``pid`` exits 0 within the timeout; otherwise the assertion quotes its log."""
        code = self.wait(pid, timeout_s)
        assert code == 0, f"rank process {pid} exited with {code}:\n{self.logs[pid].read_text()[-4000:]}"
        return True

    def running(self, pid: int) -> bool:
        with self._cv:
            return pid not in self.exits

    def close(self) -> None:
        for pid in self.ours():  # a killed rank's orphaned DataLoader workers, if any are left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._log.close()


def main(argv: list[str]) -> None:
    if argv == ["--serve"]:
        serve()
    elif len(argv) == 1:
        run_rank(json.loads(Path(argv[0]).read_text()))
    else:
        raise SystemExit("usage: python -m tests.remote.rank_worker CONFIG.json | --serve")


if __name__ == "__main__":
    main(sys.argv[1:])
