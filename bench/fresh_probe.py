"""The cases of ``test_fresh_loader_bench.py``, each in a fresh interpreter: ``python bench/fresh_probe.py PROBE JSON``
prints one JSON object on stdout.

A run that starts a new process per epoch meets the loader fresh every time: a new interpreter,
store, ring of batch buffers and threads, and new memory maps whose pages are in the page cache
but not in this process's page tables. Each probe imports everything first, then times one case:

* ``memcpy``: one ``np.copyto`` of ``bytes`` into a pre-touched buffer (the warm ceiling);
* ``plain``: ``np.load(mmap_mode="r")`` of the epoch's files, ``np.copyto`` of 64-row slices into one
  reused buffer per field, one thread (what a hand-written loop does);
* ``read``: the epoch's files front to back in 8 MiB chunks, one thread (the cold ceiling);
* ``loader``: ``ShardLoader`` over a new ``RandomShardSubsetCachedDataset`` (store already open),
  from the loader's construction through ``set_epoch`` to the last batch, the consumer counting;
  with ``trace``, also where its threads spent the time (maps, planning, thread start, the
  pager's ``MADV_POPULATE_READ``, every filler chunk), measured by wrapping those calls.

Every probe reports its timed span (``s``), ``getrusage`` deltas over it, and wall-clock marks
(``time.time()``) so that the caller can time from the process's start and keep a trace's
system calls (strace) inside the span. With ``FRESH_PERF_CTL=CTL,ACK`` (two FIFOs of
``perf --control``) the span alone is counted. The cache is written by ``write_cache``: sample
``k`` of shard ``i`` has label ``i * samples_per_shard + k`` (its global id), so a first batch
can be checked against the dataset.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZE = 64
SEED = 42
SHARDS_PER_EPOCH = 15
CHUNK = 8 << 20  # reads of the sequential-read ceiling and of the warm-up


# -- the cache (written by the parent) ------------------------------------------------------------


def write_cache(root: Path, num_shards: int, samples_per_shard: int, image_side: int) -> None:
    """``num_shards`` shards of random uint8 3 x side x side images and int64 labels (global ids), with a manifest."""
    from shardstore import ShardWriter, build_manifest

    rng = np.random.default_rng(1)
    shape = (3, image_side, image_side)
    with ShardWriter(root, shard_size=samples_per_shard, fsync=False) as writer:
        for shard in range(num_shards):
            n = samples_per_shard
            # Fresh random bytes for every shard: no two shards share pages.
            images = np.frombuffer(rng.bytes(n * int(np.prod(shape))), np.uint8).reshape(n, *shape)
            writer.add_batch({"images": images, "labels": np.arange(shard * n, (shard + 1) * n, dtype=np.int64)})
    os.sync()  # written back now: writeback must not disturb the timed rounds (the pages stay cached)
    build_manifest(root)


def epoch_files(root: Path, epoch: int) -> tuple[list[list[str]], int, int, list[int]]:
    """The files epoch ``epoch`` reads (per shard, in visit order: images, labels), its samples, bytes per sample,
    and the labels of its first batch (the global ids the dataset lists)."""
    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset

    store = ShardStore.open(root)
    ds = RandomShardSubsetCachedDataset(store, min(SHARDS_PER_EPOCH, store.num_shards), SEED, batch_size=BATCH_SIZE)
    ds.set_epoch(epoch)
    position = {int(s): p for p, s in enumerate(store.shard_ids)}
    files = [[str(store.path(position[s], f)) for f in ("images", "labels")] for s in ds.selected_shards]
    sample_bytes = sum(spec.sample_bytes for spec in store.fields.values())
    return files, ds.steps_per_epoch * BATCH_SIZE, sample_bytes, np.asarray(ds.indices()[:BATCH_SIZE]).tolist()


def run_probe(name: str, args: dict[str, Any], *, prefix: list[str] | None = None, env: dict[str, str] | None = None,
              timeout: float = 600) -> dict[str, Any]:
    """Run probe ``name`` in a fresh interpreter (under ``prefix``, e.g. strace); its result."""
    command = [*(prefix or []), sys.executable, __file__, name]
    args = {**args, "spawned_at": time.time()}
    done = subprocess.run([*command, json.dumps(args)], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **env} if env else None)
    if done.returncode:
        raise AssertionError(f"probe {name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- measuring a span ------------------------------------------------------------------------------


def schedstat(tid: int | None) -> tuple[int, int]:
    """A thread's time on a CPU and time runnable but waiting for one (ns, /proc/self/task/TID/schedstat)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


def cpu_pressure_us() -> int:
    """Microseconds in which some runnable task of the machine waited for a CPU (/proc/pressure/cpu); 0 if unknown."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return 0


_RUSAGE = ("ru_minflt", "ru_majflt", "ru_nvcsw", "ru_nivcsw", "ru_utime", "ru_stime")


class Span:
    """A timed span: perf_counter and wall-clock marks, rusage deltas, and perf's counting switched on inside it."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        ctl = os.environ.get("FRESH_PERF_CTL")
        self._perf = ctl.split(",") if ctl else None

    def _perf_say(self, what: str) -> None:
        if self._perf is None:
            return
        with open(self._perf[0], "w") as ctl:
            ctl.write(what + "\n")
        with open(self._perf[1]) as ack:
            ack.readline()

    def __enter__(self) -> Span:
        self._perf_say("enable")
        self._psi = cpu_pressure_us()
        self._sched = schedstat(threading.get_native_id())
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall0 = time.time()
        self.t0 = time.perf_counter()
        return self

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self.t0

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0
        self.wall1 = time.time()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        # Every thread of the process (the loader's are still alive): CPU time, and time runnable but not running.
        self.threads = {}
        for thread in threading.enumerate():
            run, wait = schedstat(thread.native_id)
            if thread is threading.main_thread():
                run, wait = run - self._sched[0], wait - self._sched[1]
            self.threads[thread.name] = {"run_ms": round(run / 1e6, 3), "runqueue_ms": round(wait / 1e6, 3)}
        self.psi_ms = (cpu_pressure_us() - self._psi) / 1e3
        self._perf_say("disable")
        self.rusage = {k[3:]: round(getattr(ru, k) - getattr(self._ru, k), 6) for k in _RUSAGE}

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"s": self.s, "wall0": self.wall0, "wall1": self.wall1, "marks": self.marks, "rusage": self.rusage,
                "threads": self.threads, "cpu_pressure_ms": round(self.psi_ms, 3), **extra}


# -- probes ----------------------------------------------------------------------------------------


def probe_memcpy(args: dict[str, Any]) -> dict[str, Any]:
    n = int(args["bytes"])
    src = np.empty(n, np.uint8)
    src.fill(0x5A)
    dst = np.empty(n, np.uint8)
    dst.fill(0)  # pre-touched: the copy pays no page faults
    with Span() as span:
        np.copyto(dst, src)
    assert dst[0] == dst[-1] == 0x5A
    return span.result(bytes=n)


def probe_plain(args: dict[str, Any]) -> dict[str, Any]:
    """The epoch's samples, in the dataset's order (shard after shard), as 64-row batches into reused buffers."""
    files, num_samples = args["files"], int(args["num_samples"])
    out: dict[str, np.ndarray] | None = None
    done, first = 0, None
    with Span() as span:
        for image_path, label_path in files:
            src = {"images": np.load(image_path, mmap_mode="r"), "labels": np.load(label_path, mmap_mode="r")}
            if out is None:
                out = {k: np.empty((BATCH_SIZE, *a.shape[1:]), a.dtype) for k, a in src.items()}
            row, rows = 0, src["labels"].shape[0]
            while row < rows and done < num_samples:
                # A batch may span two shards: this copy fills it from where the last one stopped.
                at = done % BATCH_SIZE
                n = min(BATCH_SIZE - at, rows - row, num_samples - done)
                for k, a in src.items():
                    np.copyto(out[k][at : at + n], a[row : row + n])
                row, done = row + n, done + n
                if done == BATCH_SIZE:
                    first = out["labels"].copy()
                    span.mark("first_batch")
    return span.result(samples=done, first_labels=first.tolist() if first is not None else [])


def probe_read(args: dict[str, Any]) -> dict[str, Any]:
    buf = bytearray(CHUNK)
    total = 0
    with Span() as span:
        for pair in args["files"]:
            for path in pair:
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
    return span.result(bytes=total)


def probe_loader(args: dict[str, Any]) -> dict[str, Any]:
    """One epoch through a new ``ShardLoader``; the consumer counts, and keeps the first batch's labels to check."""
    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    store = ShardStore.open(args["root"])
    ds = RandomShardSubsetCachedDataset(store, min(SHARDS_PER_EPOCH, store.num_shards), SEED, batch_size=BATCH_SIZE)
    trace = Trace() if args.get("trace") else None
    n = 0
    with Span() as span:
        loader = ShardLoader(ds, num_threads=int(args["threads"]), **args.get("kwargs", {}))
        span.mark("constructed")
        loader.set_epoch(int(args["epoch"]))  # plans the epoch in this thread, as a trainer's call does
        span.mark("set_epoch")
        it = iter(loader)
        first = next(it)
        span.mark("first_batch")
        first_labels = first["labels"].clone()
        n = first_labels.shape[0]
        for batch in it:
            n += batch["labels"].shape[0]
    span_result = span.result(samples=n, first_labels=first_labels.tolist(),
                              want_labels=np.asarray(ds.indices()[:BATCH_SIZE]).tolist(),
                              waits=wait_summary(loader.stats.per_batch_s, loader))
    if trace is not None:
        span_result["trace"] = trace.summary(span.t0, span.s, loader, int(args["epoch"]))
    loader.close()
    return span_result


def wait_summary(waits: np.ndarray, loader: Any) -> dict[str, float]:
    """The consumer's waits, in ms: in all, the first batch's, and at the batches that start a chunk."""
    chunk = loader._pipeline.chunk
    return {"total_ms": float(waits.sum() * 1e3), "first_ms": float(waits[0] * 1e3) if waits.size else 0.0,
            "chunk_starts_ms": float(waits[chunk::chunk].sum() * 1e3), "batches": int(waits.size),
            "over_100us": int((waits > 1e-4).sum()), "chunk": int(chunk)}


# -- where a fresh loader's time goes ----------------------------------------------------------------


class Trace:
    """Wraps the loader's costly calls, recording who ran each, when and for how long (perf_counter).

    These are the loader's internals: a call that is not there (renamed, or gone in a rewrite)
    is listed in ``missing`` and its rows stay empty.
    """

    def __init__(self) -> None:
        from shardstore import kernels
        from shardstore.loader import pager, pipeline, shard_loader

        self.events: list[tuple[str, str, float, float, Any]] = []
        self.missing: list[str] = []
        self._wrap(kernels, "map_file", "map", lambda a: (a[2], int(a[1])))
        self._wrap(pager, "read_ahead", "populate", lambda a: ([str(p) for p in a[1]], sum(x.nbytes for x in a[0])))
        self._wrap(pipeline.Pipeline, "_start", "threads", None)
        self._wrap(shard_loader._Planner, "__call__", "plan", lambda a: a[1])
        self._wrap(pipeline.Pipeline, "_fill", "fill", self._fill_info)
        self._wrap(threading.Thread, "start", "thread_start", lambda a: a[0].name)

    @staticmethod
    def _fill_info(a: tuple[Any, ...]) -> tuple[Any, list[str], int]:
        """The chunk's job key, the shard directories it reads and its samples."""
        job, seq, count = a[1], a[2], a[3]
        try:
            start, stop = job.batch_bounds(seq - job.first_seq, count)
            shards = job.visited[np.unique(job.source_index[start:stop])]
            return job.key, [str(job.store.path(int(p), "images").parent) for p in shards], stop - start
        except (AttributeError, TypeError, IndexError):
            return getattr(job, "key", None), [], 0

    def _wrap(self, owner: Any, name: str, kind: str, info: Any) -> None:
        original = getattr(owner, name, None)
        if original is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        events = self.events

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            detail = info(args) if info is not None else None
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((kind, threading.current_thread().name, start, time.perf_counter(), detail))

        setattr(owner, name, wrapper)

    def summary(self, t0: float, span_s: float, loader: Any, epoch: int) -> dict[str, Any]:
        """Per kind of work: calls, ms, and which thread; for the pager, how far ahead of the fillers it was."""

        def ms(x: float) -> float:
            return round(x * 1e3, 3)

        def role(thread: str) -> str:
            return "pager" if "pager" in thread else "filler" if "fill" in thread else "main"

        out: dict[str, Any] = {"span_ms": ms(span_s), "missing": self.missing}
        inside = [e for e in self.events if e[2] < t0 + span_s]
        maps: dict[str, list[float]] = {}
        for kind, thread, start, end, _ in inside:
            if kind == "map":
                maps.setdefault(role(thread), []).append(end - start)
        out["maps"] = {r: {"calls": len(v), "ms": ms(sum(v))} for r, v in maps.items()}
        out["threads_start_ms"] = ms(sum(e[3] - e[2] for e in inside if e[0] == "threads"))
        out["thread_starts"] = {e[4]: ms(e[3] - e[2]) for e in inside if e[0] == "thread_start"}
        out["timeline"] = [(e[0], e[1][-1], ms(e[2] - t0), ms(e[3] - e[2])) for e in inside
                           if e[0] in ("fill", "populate")]
        out["plans"] = [{"epoch": e[4][0] if isinstance(e[4], tuple) else str(e[4]), "thread": role(e[1]),
                         "at_ms": ms(e[2] - t0), "ms": ms(e[3] - e[2])} for e in inside if e[0] == "plan"]
        fills = [e for e in inside if e[0] == "fill"]
        this = [e for e in fills if isinstance(e[4][0], tuple) and e[4][0][0] == epoch]
        busy: dict[str, float] = {}
        for e in this:
            busy[e[1]] = busy.get(e[1], 0.0) + e[3] - e[2]
        out["fills"] = {"chunks": len(this), "busy_ms": {t: ms(v) for t, v in sorted(busy.items())},
                        "first_at_ms": ms(min(e[2] for e in this) - t0) if this else None,
                        "next_epoch_chunks": len(fills) - len(this),
                        "next_epoch_ms": ms(sum(e[3] - e[2] for e in fills if e not in this))}
        # The pager: for each shard of this epoch, when its populate ended against the first chunk that read it.
        first_fill: dict[str, float] = {}
        for e in this:
            for shard in e[4][1]:
                first_fill[shard] = min(first_fill.get(shard, e[2]), e[2])
        populated: dict[str, tuple[float, float]] = {}
        populate_ms, populate_bytes, calls, next_bytes = 0.0, 0, 0, 0
        for kind, _, start, end, detail in sorted((e for e in inside if e[0] == "populate"), key=lambda e: e[2]):
            # The pager reads the next epoch's shards only once this epoch's are all read ahead.
            if first_fill and all(shard in populated for shard in first_fill):
                next_bytes += detail[1]
                continue
            calls += 1
            populate_ms += end - start
            populate_bytes += detail[1]
            for path in detail[0]:
                populated.setdefault(str(Path(path).parent), (start, end))
        leads = []
        for shard, at in first_fill.items():
            if shard in populated:
                start, end = populated[shard]
                leads.append(ms(at - end))  # > 0: populated before the fillers reached it
            else:
                leads.append(None)  # never populated: the fillers were there first
        known = [x for x in leads if x is not None]
        out["populate"] = {"calls": calls, "ms": ms(populate_ms), "MB": round(populate_bytes / 1e6, 1),
                           "shards": len(first_fill), "ahead": sum(x > 0 for x in known),
                           "behind": sum(x <= 0 for x in known), "skipped": len(leads) - len(known),
                           "lead_ms": leads, "next_epoch_MB": round(next_bytes / 1e6, 1)}
        return out


PROBES = {"memcpy": probe_memcpy, "plain": probe_plain, "read": probe_read, "loader": probe_loader}


# -- report ----------------------------------------------------------------------------------------

NAMES = {"memcpy": "ceiling: memcpy, 1 thread", "plain": "plain loop (np.load mmap + copyto), 1 thread",
         "loader_t1": "ShardLoader threads=1", "loader_t2": "ShardLoader threads=2",
         "read_cold": "ceiling: sequential read 8 MiB, 1 thread", "loader_t1_cold": "ShardLoader threads=1",
         "loader_t2_cold": "ShardLoader threads=2"}


def report(path: str) -> None:
    """Print the figures a ``--benchmark-json`` file of ``test_fresh_loader_bench.py`` holds as Markdown tables."""
    runs = [b["extra_info"] for b in json.loads(Path(path).read_text())["benchmarks"] if "kind" in b["extra_info"]]
    for info in (r for r in runs if r["kind"] == "fresh"):
        size = info["size"]
        reused = next((r for r in runs if r["kind"] == "reused" and r["size"] == size), None)
        cases = info["cases"]
        memcpy = cases["memcpy"]["GB_per_s"]
        print(f"\n{size}, {info['shards']} shards x {info['samples_per_shard']}, load average per round "
              f"{info['loadavg']}\n")
        print("| case | mode | GB/s median (min-max) | of ceiling | CPU ms | GB per CPU-s | minor faults per MiB "
              "| consumer wait | first batch |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for case, row in cases.items():
            cold = case.removesuffix("@base").endswith("_cold")
            mode = "cold, fresh" if cold else "warm, fresh"
            ceiling = cases.get("read_cold" if cold else "memcpy", {}).get("GB_per_s")
            first = (f"{row['first_batch_ms']:.1f} ms ({row['first_batch_from_start_s']:.2f} s from start)"
                     if "first_batch_ms" in row else "")
            name = NAMES[case.removesuffix("@base")] + (" (base tree)" if case.endswith("@base") else "")
            print(f"| {name} | {mode} | {row['GB_per_s']:.2f} ({row['min']:.2f}-{row['max']:.2f}) | "
                  f"{row['GB_per_s'] / ceiling:.0%} | {row['cpu_ms']:.0f} | {row['GB_per_cpu_s']:.2f} | "
                  f"{row['minflt_per_MiB']:.1f} | {row.get('wait_ms', '')} | {first} |")
        if reused:
            for case, row in reused["cases"].items():
                name = NAMES[case].replace("ceiling: memcpy", "ceiling: memcpy (this process)")
                print(f"| {name} | warm, maps reused | {row['GB_per_s']:.2f} ({row['min']:.2f}-{row['max']:.2f}) | "
                      f"{row['GB_per_s'] / reused['cases']['memcpy']['GB_per_s']:.0%} | | | | | |")
        print("\n| target | value | wanted | met |\n|---|---:|---:|---|")
        ratios = {**info["ratios"], **(reused["ratios"] if reused else {})}
        for name, r in ratios.items():
            wanted = "" if r["target"] is None else f"<= {r['target']}" if r.get("lower_is_better") else \
                f">= {r['target']}"
            met = "" if r["met"] is None else "yes" if r["met"] else "no"
            print(f"| {name} | {r['value']} | {wanted} | {met} |")
        print(f"\n(memcpy ceiling {memcpy:.2f} GB/s)")
    for info in (r for r in runs if r["kind"] == "breakdown"):
        breakdown(info)


def breakdown(info: dict[str, Any]) -> None:
    """Where a fresh warm epoch's time went, 1 and 2 threads side by side (medians of the traced runs)."""
    traces = {k: info[f"trace_t{k}"] for k in (1, 2) if f"trace_t{k}" in info}
    rows: list[tuple[str, Any]] = []

    def row(name: str, fn: Any) -> None:
        cells = []
        for t in traces.values():
            try:
                cells.append(fn(t, t["medians"], t["trace"]))
            except (KeyError, IndexError, ZeroDivisionError):
                cells.append("")
        rows.append((name, cells))

    row("epoch: construction to last batch", lambda t, m, tr: f"{m['span_ms']:.1f} ms")
    row("ShardLoader() (ring allocated)", lambda t, m, tr: f"{m['constructed_ms']:.2f} ms")
    row("set_epoch (epoch planned in the caller)", lambda t, m, tr: f"{m['set_epoch_ms']:.2f} ms")
    row("threads started (Pipeline._start)", lambda t, m, tr: f"{m['threads_start_ms']:.1f} ms ("
        + ", ".join(f"{k.split('-')[-1]} {v:.1f}" for k, v in tr["thread_starts"].items()) + ")")
    row("planned again on a filler (rank_plan)", lambda t, m, tr: f"{tr['plans'][0]['ms']:.2f} ms at "
        f"{tr['plans'][0]['at_ms']:.1f} ms")
    row("first batch in hand", lambda t, m, tr: f"{m['first_batch_ms']:.1f} ms")
    row("maps made (calls, ms)", lambda t, m, tr: ", ".join(f"{k} {v['calls']} / {v['ms']:.2f} ms"
                                                            for k, v in tr["maps"].items()))
    row("pager populate (MADV_POPULATE_READ)", lambda t, m, tr: f"{m['populate_ms']:.1f} ms, {tr['populate']['MB']} MB"
        f" in {tr['populate']['calls']} calls")
    row("  shards populated before the fillers reached them", lambda t, m, tr:
        f"{tr['populate']['ahead']} of {tr['populate']['shards']} (first shard: "
        f"{tr['populate']['lead_ms'][0]:+.1f} ms; median lead {_median(tr['populate']['lead_ms']):.1f} ms)")
    row("fillers busy in chunks (gather)", lambda t, m, tr: f"{m['fill_busy_ms']:.1f} ms, {tr['fills']['chunks']} "
        "chunks")
    row("consumer waiting", lambda t, m, tr: f"{m['wait_ms']:.1f} ms")
    row("CPU (user + system)", lambda t, m, tr: f"{m['cpu_ms']:.0f} ms")
    row("per thread: on CPU / runnable, waiting for one", lambda t, m, tr: ", ".join(
        f"{k.replace('shardstore-', '').replace('MainThread', 'main')} {v['run_ms']:.0f}/{v['runqueue_ms']:.0f}"
        for k, v in t["threads"].items()) + " ms")
    row("minor page faults", lambda t, m, tr: f"{m['minflt']:.0f}")
    row("next epoch: planned, chunks filled, MB populated", lambda t, m, tr: f"at {tr['plans'][1]['at_ms']:.0f} ms, "
        f"{tr['fills']['next_epoch_chunks']}, {tr['populate']['next_epoch_MB']}")
    print(f"\nbreakdown, {info['size']} (load average {info['loadavg']})\n")
    print("| | " + " | ".join(f"{k} thread{'s' if k > 1 else ''}" for k in traces) + " |")
    print("|---|" + "---:|" * len(traces))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    perf = {k: info[f"perf_{k}"] for k in ("t1", "t2", "plain") if "percent" in info.get(f"perf_{k}", {})}
    if perf:
        print("\n| share of CPU (perf, cpu-clock) | " + " | ".join(perf) + " |\n|---|" + "---:|" * len(perf))
        print("| CPU ms in the span | " + " | ".join(f"{p['cpu_ms']:.0f}" for p in perf.values()) + " |")
        for part in next(iter(perf.values()))["percent"]:
            print(f"| {part} | " + " | ".join(f"{p['percent'].get(part, 0):.1f}%" for p in perf.values()) + " |")
    stat = {k: info[f"perfstat_{k}"] for k in ("t1", "t2", "plain") if "counts" in info.get(f"perfstat_{k}", {})}
    if stat:
        print("\n| perf stat over the span | " + " | ".join(stat) + " |\n|---|" + "---:|" * len(stat))
        for event in next(iter(stat.values()))["counts"]:
            print(f"| {event} | " + " | ".join(f"{p['counts'].get(event) or 0:,.0f}" for p in stat.values()) + " |")
        print("| minor faults (getrusage, populate included) | "
              + " | ".join(f"{p['minflt']:,}" for p in stat.values()) + " |")
    for name in ("strace_t2", "strace_plain"):
        if name in info:
            calls = info[name]["syscalls"]
            print(f"\n{name}: " + ", ".join(f"{k} {v['calls']}" for k, v in calls.items())
                  + f"; mmap {info[name]['mmap_MB']} MB, munmap {info[name]['munmap_MB']} MB")


def _median(values: list[float | None]) -> float:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else float("nan")


def main(argv: list[str]) -> None:
    name, arg = argv
    if name == "report":
        report(arg)
        return
    args = json.loads(arg)
    # Every probe imports what the loader's does, before its span: the processes differ only in the case.
    import torch  # noqa: F401

    import shardstore
    import shardstore.dataset.subset
    import shardstore.loader

    started = args.get("spawned_at")
    result = PROBES[name](args)
    if started is not None:
        result["imported_after_s"] = result["wall0"] - float(started)
    result["shardstore"] = str(Path(shardstore.__file__).resolve().parent.parent)  # the source tree it ran
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1:])
