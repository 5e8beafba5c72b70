"""Processes for the attack tests: commands run in children of a fork server that imported torch and
shardstore once, so a kill loop pays milliseconds per process instead of seconds of imports.

A child is a real process: its stdout and stderr are files (what a user would see), a SIGKILL ends
it with no cleanup, and a crash in it (a traceback, SIGBUS, a hang) cannot take the test process down.
"""

from __future__ import annotations

import atexit
import fnmatch
import importlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Imported here so that the fork server (which preloads this module) has them ready for every child.
import torch  # noqa: F401
import torch._dynamo  # noqa: F401  (the optimizers import it lazily: seconds per child otherwise)
import yaml  # noqa: F401

import shardstore.cli  # noqa: F401
import shardstore.kd.teacher_cache  # noqa: F401
import shardstore.kd.trainer  # noqa: F401
import shardstore.store.ingest  # noqa: F401

_LOGS = Path(tempfile.mkdtemp(prefix="shardstore-attack-"))
atexit.register(shutil.rmtree, _LOGS, True)
_counter = 0


def _context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _child(kind: str, payload: Any, out_path: str, err_path: str, threads: int, nofile: int | None,
           memory_bytes: int | None) -> None:
    """Runs in the child: output to files, one torch thread (deterministic and light), then the command."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    import resource

    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if memory_bytes is not None:  # a runaway allocation fails in the child instead of starving the machine
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import torch as _torch

    _torch.set_num_threads(threads)
    if kind == "cli":
        from shardstore.cli import main

        code = main(list(payload))
    else:
        module, func, args = payload
        code = getattr(importlib.import_module(module), func)(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code or 0)


@dataclass
class Outcome:
    """How a child ended: ``code`` is its exit status (``-N`` for signal N, None if it ran past its time)."""

    code: int | None
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def describe(self) -> str:
        return (f"exit {self.code} after {self.seconds:.1f} s; stderr tail: {self.err[-1500:]!r}; "
                f"stdout tail: {self.out[-500:]!r}")


class Child:
    """A running child; ``kill()`` sends SIGKILL, ``wait()`` collects its ``Outcome``."""

    def __init__(self, kind: str, payload: Any, *, threads: int = 1, nofile: int | None = None,
                 memory_bytes: int | None = None) -> None:
        global _counter
        _counter += 1
        self.out_path = _LOGS / f"{os.getpid()}-{_counter}.out"
        self.err_path = _LOGS / f"{os.getpid()}-{_counter}.err"
        self.started = time.monotonic()
        self.proc = _context().Process(target=_child, args=(kind, payload, str(self.out_path), str(self.err_path),
                                                            threads, nofile, memory_bytes), daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> bool:
        """SIGKILL, like a node failure; True if the child was still running."""
        if not self.proc.is_alive():
            return False
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float = 120) -> Outcome:
        self.proc.join(timeout)
        code = self.proc.exitcode
        if code is None:  # ran past its time: stop it and say so
            self.kill()
            self.proc.join(10)
        seconds = time.monotonic() - self.started
        out = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        err = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        self.out_path.unlink(missing_ok=True)
        self.err_path.unlink(missing_ok=True)
        return Outcome(code, out, err, seconds)


def warm() -> None:
    """Start the fork server now (seconds of imports), so that the next child's time is the command's own."""
    outcome = cli("--help")
    assert outcome.code == 0, outcome.describe()


def cli_start(*argv: str, threads: int = 1, memory_bytes: int | None = None) -> Child:
    """``shardstore ARGV...`` in a child, running."""
    return Child("cli", [str(a) for a in argv], threads=threads, memory_bytes=memory_bytes)


def cli(*argv: str, timeout: float = 120, threads: int = 1, memory_bytes: int | None = None) -> Outcome:
    """``shardstore ARGV...`` in a child, to the end (killed after ``timeout`` seconds: code None)."""
    return cli_start(*argv, threads=threads, memory_bytes=memory_bytes).wait(timeout)


def call(module: str, func: str, *args: Any, timeout: float = 120, nofile: int | None = None) -> Outcome:
    """``module.func(*args)`` in a child (its return value is the exit code), to the end."""
    return Child("call", (module, func, args), nofile=nofile).wait(timeout)


# -- what the tests check -------------------------------------------------------------------


def assert_one_line_error(outcome: Outcome, *needles: str, code: int = 2) -> str:
    """The CLI contract for a user-caused error: exit ``code``, one line on stderr, no traceback."""
    assert outcome.code == code, outcome.describe()
    # A library warning logged before the error (the tiny configs' random teacher) is not part of the error.
    lines = [line for line in outcome.err_lines if not line.startswith("WARNING shardstore.")]
    assert len(lines) == 1, outcome.describe()
    assert lines[0].startswith("shardstore: error: "), outcome.describe()
    assert "Traceback" not in outcome.out + outcome.err, outcome.describe()
    line = lines[0]
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def temporaries(root: Path) -> list[str]:
    """Every ``.<name>.tmp-*`` file or directory under ``root`` (relative paths), symlinks not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name.startswith(".") and ".tmp-" in name:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def visible_npy_files(root: Path) -> list[Path]:
    """``.npy`` files under their final names (no hidden file or directory on the way)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / n for n in filenames if n.endswith(".npy") and not n.startswith(".")]
    return sorted(files)


def assert_visible_npy_load(root: Path) -> int:
    """Every visible ``.npy`` is complete: it loads without pickle and its size is exactly header + data."""
    files = visible_npy_files(root)
    for path in files:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001  (any failure is the finding)
            raise AssertionError(f"{path} is visible under its final name but does not load: {exc}") from None
        assert arr.offset + arr.nbytes == path.stat().st_size, f"{path}: {path.stat().st_size} bytes, partial"
        del arr
    return len(files)


def file_digests(root: Path, pattern: str = "*.npy") -> dict[str, bytes]:
    """The bytes of every visible file whose relative path matches ``pattern`` (``fnmatch``), by relative path.

    Small caches only. Symlinks are neither followed nor read: the tests check that nothing else follows them.
    """
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if not name.startswith(".") and not os.path.islink(path) and fnmatch.fnmatchcase(rel, pattern):
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return dict(sorted(found.items()))


def dead_pid() -> int:
    """The pid of a process that has exited (a killed writer's temporaries carry such a pid)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_stale(directory: Path, name: str, *, directory_too: bool = False) -> Path:
    """What a writer killed while replacing ``directory/name`` leaves: ``.<name>.tmp-<dead pid>-<hex>``."""
    path = directory / f".{name}.tmp-{dead_pid()}-0badc0de"
    if directory_too:
        path.mkdir()
        (path / "images.npy").write_bytes(b"\x93NUMPY half a shard")
    else:
        path.write_bytes(b"half of a file")
    return path


def kill_fractions(seed: int, count: int = 1000) -> Iterator[float]:
    """Where in its work each kill lands, as fractions in [0, 1) from a fixed-seed generator (the same every run)."""
    return iter(np.random.default_rng(seed).uniform(0.0, 1.0, count).tolist())


def kill_delay(fraction: float, startup_s: float, whole_s: float, remaining: float = 1.0) -> float:
    """Seconds after the start at which to kill: past the command's start-up (measured on a command that fails
    at once), ``fraction`` of the way through the work still left (``remaining`` of an uninterrupted run's)."""
    work_s = max(whole_s - startup_s, 0.0) * min(max(remaining, 0.05), 1.0)
    return startup_s * 0.5 + fraction * (startup_s * 0.5 + work_s)


# -- tiny training runs ---------------------------------------------------------------------

#: A run of 2 epochs x 6 steps over a 6-shard cache of 16 images (one shard held out), a checkpoint every step.
TINY_RUN = {"train__epochs": 2, "train__batch_size": 8, "train__checkpoint__every_steps": 1,
            "data__shards_per_epoch": 3, "train__eval__held_out_shards": 1}


def run_sets(run_dir: Path, cache: Path, **extra: Any) -> list[str]:
    """``--set`` arguments for a tiny CPU run (the configs the kd tests use, made smaller)."""
    from tests.kd.conftest import overrides

    return [a for o in overrides(run_dir, cache, **{**TINY_RUN, **extra}) for a in ("--set", o)]


def tiny_cache(root: Path, num_shards: int = 6, shard_size: int = 16) -> Path:
    """Learnable 16x16 images with labels, written and with a manifest (tests/kd's cache, smaller)."""
    from tests.kd.conftest import write_tiny_cache

    return write_tiny_cache(root, num_shards=num_shards, shard_size=shard_size)
