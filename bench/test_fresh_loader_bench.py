"""``ShardLoader`` in the conditions a training run meets: a fresh process per epoch, against ceilings of the same run.

Every epoch runs in its own interpreter (``fresh_probe.py``): a new store, dataset and loader,
maps made anew over files that are in the page cache. Two caches, written once per module:
SHARDSTORE_BENCH_FRESH_SHARDS (64) shards of SHARDSTORE_BENCH_FRESH_SAMPLES (2048) uint8
3x64x64 images, and of SHARDSTORE_BENCH_FRESH_LARGE_SAMPLES (160) uint8 3x224x224 images, with
int64 labels (12 KB and 150 KB samples, 1.6 and 1.5 GB). An epoch is ``min(15, shards)``
random shards (``RandomShardSubsetCachedDataset``, seed 42, epoch = round), batches of 64.

``test_fresh_epochs``: per round, one process per case, the order rotated each round.
Warm (every file read first, checked with ``resident_fraction``): one-thread memcpy of
SHARDSTORE_BENCH_FRESH_MEMCPY_MB (1024) MiB into a pre-touched buffer; a plain loop
(``np.load(mmap_mode="r")`` and ``np.copyto`` of 64-row slices, one thread); the loader with 1
and 2 threads, timed from its construction to the last batch, and its first batch from the
construction and from the process's start. Cold (the cache fsynced and dropped with
``posix_fadvise(DONTNEED)``, checked with ``mincore``): the epoch's files read in 8 MiB chunks,
and the loader with 1 and 2 threads. ``test_reused_warm``: the loader in one process over
rounds, maps kept (as ``test_loader_bench.py``), against a memcpy in the same process.
``test_fresh_breakdown``: where a fresh warm epoch's time goes (the probe's trace, and
``strace``/``perf`` when installed). SHARDSTORE_BENCH_FRESH_ROUNDS (5) rounds, one when
benchmarks are disabled. SHARDSTORE_BENCH_FRESH_LOADER_KWARGS (JSON, e.g. '{"pread": true}') is
passed to every ShardLoader; SHARDSTORE_BENCH_FRESH_BASE_TREE (a source tree with its extension built
in place) adds that tree's loader to the same rounds, for a before/after. Figures go to
``benchmark.extra_info``; ``python bench/fresh_probe.py report OUT.json`` prints them as tables.
GB is 10**9 bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from fresh_probe import CHUNK, epoch_files, run_probe, write_cache
from loader_cases import BATCH_SIZE, SEED, ShardLoaderCase, describe_epoch
from shardstore import ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.pagecache import resident_fraction


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {value}")
    return value


SHARDS = _env_int("SHARDSTORE_BENCH_FRESH_SHARDS", 64)
SIZES = {"3x64x64": (64, _env_int("SHARDSTORE_BENCH_FRESH_SAMPLES", 2048)),
         "3x224x224": (224, _env_int("SHARDSTORE_BENCH_FRESH_LARGE_SAMPLES", 160))}
ROUNDS = _env_int("SHARDSTORE_BENCH_FRESH_ROUNDS", 5)
MEMCPY_BYTES = _env_int("SHARDSTORE_BENCH_FRESH_MEMCPY_MB", 1024) << 20
#: Extra ``ShardLoader`` arguments for every loader case (JSON), e.g. '{"pread": true}'; default: none.
LOADER_KWARGS: dict[str, Any] = json.loads(os.environ.get("SHARDSTORE_BENCH_FRESH_LOADER_KWARGS", "{}"))
WARM_LIMIT = 0.99  # a warm round starts with at least this fraction of the epoch's files in the page cache
COLD_LIMIT = 0.05
#: After an epoch a loader prepares the next one (plans it, fills the first chunks, reads shards ahead);
#: the in-process cases wait this long between them, so that no case runs alongside another's preparation.
SETTLE_S = 0.3
#: Another shardstore source tree (extension built in place): its loader runs too, as ``...@base`` cases in the
#: same rounds and processes of the same kind, for a before/after that shares the machine's load.
BASE_TREE = os.environ.get("SHARDSTORE_BENCH_FRESH_BASE_TREE")
WARM = ["memcpy", "plain", "loader_t1", "loader_t2"] + (["loader_t1@base", "loader_t2@base"] if BASE_TREE else [])
COLD = ["read_cold", "loader_t1_cold", "loader_t2_cold"] + (["loader_t2_cold@base"] if BASE_TREE else [])
#: (name, numerator case, denominator case, target): ratios of median GB/s.
TARGETS = [("fresh warm 2 threads / memcpy", "loader_t2", "memcpy", 0.60),
           ("fresh warm 2 threads / plain loop", "loader_t2", "plain", 1.6),
           ("fresh warm 2 threads / 1 thread", "loader_t2", "loader_t1", 1.4),
           ("cold 2 threads / sequential read", "loader_t2_cold", "read_cold", 0.95),
           ("cold 1 thread / sequential read", "loader_t1_cold", "read_cold", 0.95)]


class Cache:
    """A written cache: its root and every field file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = sorted(str(p) for p in root.glob("shard_*/*.npy"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Cache]:
    made: dict[str, Cache] = {}

    def get(size: str) -> Cache:
        if size not in made:
            root = tmp_path_factory.mktemp(f"fresh_{size}")
            side, samples = SIZES[size]
            write_cache(root, SHARDS, samples, side)
            made[size] = cache = Cache(root)
            # Cached as reads leave it (as after an epoch read it cold), not as the writer did: a warm round
            # after a cold one finds the same. (The writer's pages are 2 MiB folios, which a map takes with
            # one fault per 2 MiB; read-ahead's are smaller, one fault per 64 KiB of fault-around.)
            evict(cache.files)
            read_all(cache.files)
        return made[size]

    return get


def rounds(benchmark: BenchmarkFixture) -> int:
    return 1 if benchmark.disabled else ROUNDS


def read_all(paths: list[str]) -> None:
    buf = bytearray(CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident(paths: list[str]) -> float:
    return float(np.mean([resident_fraction(p) for p in paths]))


def evict(paths: list[str]) -> None:
    """fsync, then drop from the page cache (no process of ours maps them: every probe has exited)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- fresh processes --------------------------------------------------------------------------------


def run_round(cache: Cache, epoch: int, cases: list[str], *, cold: bool) -> dict[str, dict[str, Any]]:
    """One process per case for ``epoch``; each result with its amounts (``bytes``) added."""
    files, num_samples, sample_bytes, want = epoch_files(cache.root, epoch)
    flat = [p for pair in files for p in pair]
    out = {}
    for case in cases:
        if cold:
            evict(cache.files)
            fraction = resident(flat)
            assert fraction < COLD_LIMIT, f"cold round: {fraction:.1%} of the epoch's files still cached after eviction"
        else:
            fraction = resident(flat)
            assert fraction >= WARM_LIMIT, f"warm round: only {fraction:.1%} of the epoch's files are cached"
        kind = case.removesuffix("@base").removesuffix("_cold")
        if kind == "memcpy":
            result = run_probe("memcpy", {"bytes": MEMCPY_BYTES})
        elif kind == "plain":
            result = run_probe("plain", {"files": files, "num_samples": num_samples})
            result["bytes"] = result["samples"] * sample_bytes
        elif kind == "read":
            result = run_probe("read", {"files": files})
        else:
            result = run_probe("loader", {"root": str(cache.root), "epoch": epoch, "threads": int(kind[-1]),
                                          "kwargs": LOADER_KWARGS},
                               env={"PYTHONPATH": BASE_TREE} if case.endswith("@base") and BASE_TREE else None)
            result["bytes"] = result["samples"] * sample_bytes
        if "samples" in result:
            assert result["samples"] == num_samples, f"{case}: {result['samples']} samples, not {num_samples}"
            assert result["first_labels"] == want, f"{case}: the first batch is not the dataset's first batch"
        if case.endswith("@base") and BASE_TREE:
            assert Path(result["shardstore"]) == Path(BASE_TREE).resolve(), f"{case} ran {result['shardstore']}"
        result["resident_before"] = fraction
        out[case] = result
    if cold:
        read_all(cache.files)  # warm again for the next round
    return out


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per case (GB/s, min-max, CPU, faults, waits, first batch) and the target ratios."""
    cases: dict[str, Any] = {}
    for case, runs in results.items():
        rates = [r["bytes"] / r["s"] / 1e9 for r in runs]
        cpu = [r["rusage"]["utime"] + r["rusage"]["stime"] for r in runs]
        row = {"GB_per_s": round(median(rates), 3), "min": round(min(rates), 3), "max": round(max(rates), 3),
               "ms": round(median([r["s"] for r in runs]) * 1e3, 2), "MB": round(runs[0]["bytes"] / 1e6, 1),
               "cpu_ms": round(median(cpu) * 1e3, 1),
               "GB_per_cpu_s": round(median([r["bytes"] / c / 1e9 for r, c in zip(runs, cpu) if c > 0]), 3),
               "minflt_per_MiB": round(median([r["rusage"]["minflt"] / (r["bytes"] / 2**20) for r in runs]), 2),
               "cpu_pressure_ms": round(median([r["cpu_pressure_ms"] for r in runs]), 1), "rounds": len(runs)}
        if "waits" in runs[0]:
            row["wait_ms"] = round(median([r["waits"]["total_ms"] for r in runs]), 2)
            row["first_batch_ms"] = round(median([r["marks"]["first_batch"] * 1e3 for r in runs]), 2)
            row["first_batch_ms_max"] = round(max(r["marks"]["first_batch"] * 1e3 for r in runs), 2)
            row["first_batch_from_start_s"] = round(median(
                [r["imported_after_s"] + r["marks"]["first_batch"] for r in runs]), 3)
            row["imports_s"] = round(median([r["imported_after_s"] for r in runs]), 3)
        cases[case] = row
    ratios = {}
    for name, num, den, target in TARGETS:
        if num in cases and den in cases:
            value = cases[num]["GB_per_s"] / cases[den]["GB_per_s"]
            ratios[name] = {"value": round(value, 3), "target": target, "met": bool(value >= target)}
    for case in [c for c in cases if c.endswith("@base")]:
        mine = case.removesuffix("@base")
        ratios[f"{mine}: this tree / base tree"] = {"value": round(cases[mine]["GB_per_s"] / cases[case]["GB_per_s"],
                                                                    3), "target": None, "met": None}
    return {"cases": cases, "ratios": ratios}


@pytest.mark.slow
@pytest.mark.benchmark(group="fresh process per epoch")
@pytest.mark.parametrize("size", list(SIZES))
def test_fresh_epochs(benchmark: BenchmarkFixture, caches: Callable[[str], Cache], size: str) -> None:
    cache = caches(size)
    read_all(cache.files)
    results: dict[str, list[dict[str, Any]]] = {case: [] for case in WARM + COLD}
    loads: list[float] = []
    counter = iter(range(10**6))

    # Disabled (CI): one process per code path; each costs an interpreter and torch's import (about 2 s).
    warm = [c for c in WARM if "loader_t1" not in c] if benchmark.disabled else WARM
    cold = [c for c in COLD if "loader_t1" not in c] if benchmark.disabled else COLD

    def one_round() -> None:
        epoch = next(counter)
        loads.append(os.getloadavg()[0])
        turn = epoch % len(warm)  # rotated, so no case always runs first or last
        for case, result in run_round(cache, epoch, warm[turn:] + warm[:turn], cold=False).items():
            results[case].append(result)
        if hasattr(os, "posix_fadvise"):
            turn %= len(cold)
            for case, result in run_round(cache, epoch, cold[turn:] + cold[:turn], cold=True).items():
                results[case].append(result)

    benchmark.pedantic(one_round, rounds=rounds(benchmark), iterations=1)
    summary = summarize({k: v for k, v in results.items() if v})
    first = summary["cases"]["loader_t2"]["first_batch_ms"]
    summary["ratios"]["first batch, construction to batch (ms)"] = {"value": first, "target": 5.0,
                                                                    "met": bool(first <= 5.0), "lower_is_better": True}
    benchmark.extra_info.update(kind="fresh", size=size, loader_kwargs=LOADER_KWARGS, shards=SHARDS,
                                samples_per_shard=SIZES[size][1],
                                loadavg=[round(x, 2) for x in loads], **summary)


# -- one process, maps reused ---------------------------------------------------------------------


class ReusedLoader(ShardLoaderCase):
    """``test_loader_bench.py``'s loader case, with LOADER_KWARGS."""

    def open(self) -> None:
        ds = RandomShardSubsetCachedDataset(ShardStore.open(self.epoch.root), self.epoch.shards_per_epoch, SEED,
                                            batch_size=BATCH_SIZE)
        self.reader = ShardLoader(ds, num_threads=self.num_threads, **LOADER_KWARGS)


@pytest.mark.slow
@pytest.mark.benchmark(group="fresh process per epoch")
@pytest.mark.parametrize("size", list(SIZES))
def test_reused_warm(benchmark: BenchmarkFixture, caches: Callable[[str], Cache], size: str) -> None:
    """The loader in this process over rounds (its maps and ring kept, as test_loader_bench.py), against memcpy here."""
    cache = caches(size)
    epoch = describe_epoch(cache.root, min(15, SHARDS))
    read_all(cache.files)
    src = np.full(MEMCPY_BYTES, 0x5A, np.uint8)
    dst = np.empty(MEMCPY_BYTES, np.uint8)
    dst.fill(0)  # pre-touched (np.zeros would leave it to fault in during the first copy)
    loaders = {threads: ReusedLoader(epoch, threads) for threads in (1, 2)}
    times: dict[str, list[float]] = {"memcpy": [], "loader_t1": [], "loader_t2": []}

    def timed(name: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        got = fn()
        times[name].append(time.perf_counter() - start)
        assert got is None or got == epoch.num_samples, f"{name} handed out {got} samples, not {epoch.num_samples}"

    def one_round() -> None:
        timed("memcpy", lambda: np.copyto(dst, src))
        for threads, case in loaders.items():
            time.sleep(SETTLE_S)
            timed(f"loader_t{threads}", case.run)
        time.sleep(SETTLE_S)

    try:
        for case in loaders.values():
            case.open()
            case.run()  # untimed: maps made and pages mapped, as in every round after it
        benchmark.pedantic(one_round, rounds=rounds(benchmark), iterations=1)
    finally:
        for case in loaders.values():
            case.close()
    amounts = {"memcpy": MEMCPY_BYTES, "loader_t1": epoch.bytes, "loader_t2": epoch.bytes}
    rates = {k: [amounts[k] / t / 1e9 for t in v] for k, v in times.items()}
    cases = {k: {"GB_per_s": round(median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3),
                 "rounds": len(v)} for k, v in rates.items()}
    ratio = cases["loader_t2"]["GB_per_s"] / cases["memcpy"]["GB_per_s"]
    per_round = [a / b for a, b in zip(rates["loader_t2"], rates["memcpy"])]
    benchmark.extra_info.update(
        kind="reused", size=size, loader_kwargs=LOADER_KWARGS, cases=cases,
        ratios={"reused warm 2 threads / memcpy": {
            "value": round(ratio, 3), "target": 0.70, "met": bool(ratio >= 0.70),
            "per_round": [round(x, 3) for x in per_round]}})


# -- where a fresh epoch's time goes -----------------------------------------------------------------


def strace_counts(probe: str, args: dict[str, Any]) -> dict[str, Any]:
    """System calls inside the probe's span (``strace -f -ttt -T``): calls and ms per call, bytes (un)mapped."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        result = run_probe(probe, args, prefix=["strace", "-f", "-qq", "-ttt", "-T", "-o", str(log)])
        line_re = re.compile(r"^\d+\s+(\d+\.\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*?)(?:\s+<([\d.]+)>)?$")
        calls: dict[str, list[float]] = {}
        mapped = unmapped = 0
        for line in log.read_text().splitlines():
            m = line_re.match(line)
            if not m or line.endswith("<unfinished ...>"):
                continue
            at, name, rest, took = float(m[1]), m[2] or m[3], m[4], float(m[5] or 0)
            if not result["wall0"] <= at <= result["wall1"]:
                continue
            calls.setdefault(name, []).append(took)
            arg = rest.split(")")[0].split(", ")  # mmap(addr, length, ...) and munmap(addr, length)
            if name in ("mmap", "munmap") and len(arg) > 1 and arg[1].isdigit():
                if name == "mmap":
                    mapped += int(arg[1])
                else:
                    unmapped += int(arg[1])
    table = {k: {"calls": len(v), "ms": round(sum(v) * 1e3, 3)} for k, v in sorted(calls.items())}
    return {"syscalls": table, "mmap_MB": round(mapped / 1e6, 1), "munmap_MB": round(unmapped / 1e6, 1),
            "span_ms_under_strace": round(result["s"] * 1e3, 1)}


#: Kernel entry points whose share (callees included) ``perf report --children`` gives. A fault on a file
#: map goes through ``do_fault``, one on fresh anonymous memory through ``do_anonymous_page`` (4 KiB) or
#: ``do_huge_pmd_anonymous_page`` (2 MiB); the pager's ``MADV_POPULATE_READ`` maps file pages too, but under
#: ``madvise``, not as a fault.
KERNEL_PARTS = {"page faults": ("asm_exc_page_fault",),
                "  anonymous (fresh buffers)": ("do_anonymous_page", "do_huge_pmd_anonymous_page"),
                "madvise (populate)": ("__x64_sys_madvise",), "read/pread": (
                    "__x64_sys_read", "__x64_sys_pread64", "__x64_sys_preadv", "__x64_sys_preadv2"),
                "mmap": ("__x64_sys_mmap",), "munmap": ("__x64_sys_munmap",), "futex": ("__x64_sys_futex",)}


def under_perf(tmp: Path, command: list[str], probe: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run the probe under ``perf COMMAND``, its events switched on for the probe's span only."""
    ctl, ack = tmp / "ctl", tmp / "ack"
    os.mkfifo(ctl)
    os.mkfifo(ack)
    return run_probe(probe, args, env={"FRESH_PERF_CTL": f"{ctl},{ack}"},
                     prefix=["perf", *command, "-D", "-1", "--control", f"fifo:{ctl},{ack}", "--"])


def perf_stat(probe: str, args: dict[str, Any]) -> dict[str, Any]:
    """``perf stat``'s software counters over the span. Its ``page-faults`` are the faults taken touching memory;
    getrusage's ``minflt`` also counts the pages ``MADV_POPULATE_READ`` mapped. (Cycles and instructions: not
    supported on this VM.)"""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stat.csv"
        events = "task-clock,page-faults,context-switches,cpu-migrations"
        result = under_perf(Path(tmp), ["stat", "-x", ",", "-e", events, "-o", str(out)], probe, args)
        counts = {}
        for line in out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in events.split(","):
                counts[fields[2]] = float(fields[0]) if fields[0].replace(".", "").isdigit() else None
    return {"counts": counts, "minflt": result["rusage"]["minflt"], "span_ms": round(result["s"] * 1e3, 1)}


def perf_profile(probe: str, args: dict[str, Any]) -> dict[str, Any]:
    """Where the span's CPU time went (``perf record -e cpu-clock -g``, switched on for the span only): shares in %."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        result = under_perf(Path(tmp), ["record", "-q", "-e", "cpu-clock", "-F", "10000", "-g", "-o", str(data)],
                            probe, args)

        def report(*options: str) -> list[list[str]]:
            text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none", *options],
                                  capture_output=True, text=True, check=True).stdout
            return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]

        by_dso: dict[str, float] = {}
        for row in report("--no-children", "--sort", "dso"):
            by_dso[row[1]] = by_dso.get(row[1], 0.0) + float(row[0].rstrip("%"))
        inclusive = {row[-1]: float(row[0].rstrip("%")) for row in report("--children", "--sort", "sym")}
    parts = {"copy kernel (_kernels)": sum(v for k, v in by_dso.items() if k.startswith("_kernels")),
             "numpy": sum(v for k, v in by_dso.items() if k.startswith("_multiarray")),
             "libc (memmove, malloc)": by_dso.get("libc.so.6", 0.0),
             "Python interpreter": sum(v for k, v in by_dso.items() if k.startswith(("libpython", "python"))),
             "kernel": by_dso.get("[kernel.kallsyms]", 0.0)}
    parts.update({name: sum(inclusive.get(s, 0.0) for s in symbols) for name, symbols in KERNEL_PARTS.items()})
    parts["  file maps (page faults less anonymous)"] = parts["page faults"] - parts["  anonymous (fresh buffers)"]
    cpu_ms = (result["rusage"]["utime"] + result["rusage"]["stime"]) * 1e3
    return {"cpu_ms": round(cpu_ms, 1), "span_ms": round(result["s"] * 1e3, 1),
            "percent": {k: round(v, 1) for k, v in parts.items()}}


def traced(cache: Cache, threads: int, times: int) -> dict[str, Any]:
    """The trace of ``times`` fresh warm epochs (epoch 0); the median run's, with the medians of its scalars."""
    runs = []
    for _ in range(times):
        read_all(cache.files)
        runs.append(run_probe("loader", {"root": str(cache.root), "epoch": 0, "threads": threads, "trace": True,
                                         "kwargs": LOADER_KWARGS}))
    runs.sort(key=lambda r: r["s"])
    mid = runs[len(runs) // 2]
    mid["medians"] = {
        "span_ms": round(median([r["s"] * 1e3 for r in runs]), 2),
        "constructed_ms": round(median([r["marks"]["constructed"] * 1e3 for r in runs]), 3),
        "set_epoch_ms": round(median([(r["marks"]["set_epoch"] - r["marks"]["constructed"]) * 1e3 for r in runs]), 3),
        "first_batch_ms": round(median([r["marks"]["first_batch"] * 1e3 for r in runs]), 3),
        "threads_start_ms": round(median([r["trace"]["threads_start_ms"] for r in runs]), 3),
        "wait_ms": round(median([r["waits"]["total_ms"] for r in runs]), 2),
        "fill_busy_ms": round(median([sum(r["trace"]["fills"]["busy_ms"].values()) for r in runs]), 2),
        "populate_ms": round(median([r["trace"]["populate"]["ms"] for r in runs]), 3),
        "minflt": median([r["rusage"]["minflt"] for r in runs]),
        "cpu_ms": round(median([(r["rusage"]["utime"] + r["rusage"]["stime"]) * 1e3 for r in runs]), 1),
    }
    mid["trace"].pop("timeline", None)
    return mid


@pytest.mark.slow
@pytest.mark.benchmark(group="fresh process per epoch")
@pytest.mark.parametrize("size", list(SIZES))
def test_fresh_breakdown(benchmark: BenchmarkFixture, caches: Callable[[str], Cache], size: str) -> None:
    cache = caches(size)
    files, num_samples, _, _ = epoch_files(cache.root, 0)
    out: dict[str, Any] = {}

    def run() -> None:
        for threads in (2,) if benchmark.disabled else (1, 2):
            out[f"trace_t{threads}"] = traced(cache, threads, 1 if benchmark.disabled else 3)
        if benchmark.disabled:
            return  # strace and perf: in measured runs only
        loader = {"root": str(cache.root), "epoch": 0, "threads": 2, "kwargs": LOADER_KWARGS}
        plain = {"files": files, "num_samples": num_samples}
        read_all(cache.files)
        if shutil.which("strace"):
            out["strace_t2"] = strace_counts("loader", loader)
            out["strace_plain"] = strace_counts("plain", plain)
        if shutil.which("perf"):
            for name, probe, args in (("t2", "loader", loader), ("t1", "loader", {**loader, "threads": 1}),
                                      ("plain", "plain", plain)):
                for kind, measure in (("perf", perf_profile), ("perfstat", perf_stat)):
                    try:
                        out[f"{kind}_{name}"] = measure(probe, args)
                    except (AssertionError, OSError, subprocess.CalledProcessError) as exc:
                        out[f"{kind}_{name}"] = {"error": str(exc)[-300:]}

    benchmark.pedantic(run, rounds=1, iterations=1)
    for trace in (out[k] for k in ("trace_t1", "trace_t2") if k in out):
        assert trace["samples"] == num_samples
        assert trace["first_labels"] == trace["want_labels"]
    benchmark.extra_info.update(kind="breakdown", size=size, loader_kwargs=LOADER_KWARGS,
                                loadavg=round(os.getloadavg()[0], 2), **out)
