"""torch's CPU threads: by default what the machine leaves after the loader's threads, so that they never oversubscribe.

torch starts one intra-op thread per core it sees. The loader's gather threads run beside them, so on a
shared or small CPU the two fight for cores: a CPU run measured 26-46 samples/s with torch's default
threads and 371 samples/s with one thread, on 2 cores with 2 loader threads. The cores a process may use
are its affinity mask (what SLURM's ``--cpus-per-task`` and ``taskset`` set), capped by a cgroup CPU quota
(a container's ``--cpus``), shared by the processes torchrun starts on the node.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows (``200000 100000`` is 2), rounded up; None without a quota."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        return max(1, math.ceil(int(fields[0]) / int(fields[1])))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit is not None else cpus)


def env_threads(env: Mapping[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` when the environment sets it to a positive number (torchrun sets 1 for several processes)."""
    env = os.environ if env is None else env
    try:
        value = int(env.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def auto_threads(loader_threads: int, *, cpus: int, processes: int = 1, env: Mapping[str, str] | None = None) -> int:
    """torch's threads when ``train.threads`` is unset: ``OMP_NUM_THREADS`` if the environment sets it, else the
    process's share of ``cpus`` (``processes`` on the node share them) less its ``loader_threads``, at least 1."""
    return env_threads(env) or max(1, cpus // max(1, processes) - loader_threads)


def configure_threads(threads: int | None, loader_threads: int) -> int:
    """Set torch's intra-op threads to ``threads`` or, when it is 0 or None, to ``auto_threads``; the number set.

    Never more than ``available_cpus()``: a larger ``train.threads`` or ``OMP_NUM_THREADS`` is lowered with a warning.
    """
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cpus = available_cpus()
    chosen = threads or auto_threads(loader_threads, cpus=cpus, processes=processes)
    if chosen > cpus:
        # More threads than CPUs only oversubscribe; tens of thousands make OpenMP fail to start them and crash.
        source = "train.threads" if threads else "OMP_NUM_THREADS"
        log.warning("%s is %d, more than the %d CPU(s) this process may use; torch uses %d thread(s)",
                    source, chosen, cpus, cpus)
        chosen = cpus
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    if threads:
        how = "train.threads"
    elif env_threads():
        how = "OMP_NUM_THREADS"
    else:
        how = f"{cpus} CPUs / {processes} process(es) on the node - {loader_threads} loader thread(s)"
    log.info("torch uses %d CPU thread(s) (%s)", chosen, how)
    return chosen
