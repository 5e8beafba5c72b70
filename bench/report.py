"""Markdown summary of a ``bench/test_loader_bench.py`` run: ``python bench/report.py out.json``.

``out.json`` is what ``pytest bench/test_loader_bench.py --benchmark-json out.json`` wrote.
One row per case and mode: samples/s and MB/s of the median round, the share of the ceiling
of its mode (warm: the 1 GiB memcpy, cold: the cold sequential read of the epoch's files),
the ratio to the random-id DataLoader with ``num_workers=0`` in the same mode, the samples/s
of the slowest and the fastest round, and (cold) how much of the cache was in the page cache
after a round, i.e. read from the disk, read-ahead included. Then one line per epoch-boundary
run: the wait for each epoch's first batch against the other batches' (median, the batches
that start a chunk, p90), "no dip" when the first batches' median is within the p90.
MB and GB are 10**6 and 10**9 bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BASELINE = "random_ids_w0"
CEILING = {"warm": "memcpy", "cold": "sequential_read"}
CASE_ORDER = ["shardloader_t1", "shardloader_t2", "random_ids_w0", "random_ids_w2", "subset_dataloader_w2"]
DASH = "—"


class Result:
    """One benchmark of the run, with its amounts per round from ``extra_info``."""

    def __init__(self, bench: dict[str, Any]) -> None:
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        self.case: str = info["case"]
        self.mode: str = info["mode"]
        self.kind: str = info.get("kind", "loader")
        self.name: str = info.get("name", self.case)
        self.info = info
        self.samples = float(info["samples"])
        self.bytes = float(info["bytes"])
        self.median_s = float(stats["median"])
        self.min_s = float(stats["min"])
        self.max_s = float(stats["max"])
        self.rounds = int(stats["rounds"])

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.median_s

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.median_s / 1e6


def load(path: Path) -> tuple[dict[str, Any], list[Result]]:
    data = json.loads(path.read_text())
    results = [Result(b) for b in data.get("benchmarks", []) if "case" in b.get("extra_info", {})]
    if not results:
        raise SystemExit(f"{path}: no loader benchmarks in it; write it with "
                         "`pytest bench/test_loader_bench.py --benchmark-only --benchmark-json FILE`")
    return data, results


def rate(value: float) -> str:
    return f"{value:,.0f}"


def table(results: list[Result]) -> list[str]:
    by_key = {(r.case, r.mode): r for r in results}
    rank = {case: i for i, case in enumerate(CASE_ORDER)}
    rows = sorted((r for r in results if r.kind in ("loader", "ceiling")),
                  key=lambda r: (r.mode != "warm", r.kind == "ceiling", rank.get(r.case, len(rank)), r.case))
    lines = ["| case | mode | samples/s (median) | MB/s | of ceiling | vs random ids w0 | samples/s min–max (rounds) "
             "| read from disk per round |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        ceiling = by_key.get((CEILING.get(r.mode, ""), r.mode))
        baseline = by_key.get((BASELINE, r.mode))
        of_ceiling = f"{r.mb_per_s / ceiling.mb_per_s:.0%}" if ceiling else DASH
        vs = f"{r.samples_per_s / baseline.samples_per_s:.2f}x" if baseline and r.kind == "loader" else DASH
        label = r.name if r.kind == "loader" else f"ceiling: {r.case.replace('_', ' ')}"
        if r.kind == "ceiling":
            label += f" ({r.mb_per_s / 1e3:.2f} GB/s)"
        spread = f"{rate(r.samples / r.max_s)}–{rate(r.samples / r.min_s)} ({r.rounds})"
        disk = r.info.get("cached_after_round_MB")
        disk_text = f"{disk:,.0f} MB" if disk is not None else DASH
        lines.append(f"| {label} | {r.mode} | {rate(r.samples_per_s)} | {rate(r.mb_per_s)} | {of_ceiling} | {vs} | "
                     f"{spread} | {disk_text} |")
    return lines


def boundary_lines(results: list[Result]) -> list[str]:
    lines = []
    order = {"count": 0, "sleep": 1, "busy": 2}
    for r in sorted((r for r in results if r.kind == "boundary"),
                    key=lambda r: (r.name, order.get(r.info.get("consumer", ""), len(order)))):
        i = r.info
        first, p90 = i["first_batch_wait_median_us"], i["p90_batch_wait_us"]
        verdict = "no dip" if first <= p90 else "dip"
        consumer = {"count": "counting consumer (loader-bound)",
                    "sleep": f"consumer sleeping {i.get('step_us', 0):.0f} µs per batch",
                    "busy": f"consumer busy in Python {i.get('step_us', 0):.0f} µs per batch (GIL held)",
                    }.get(i.get("consumer", ""), str(i.get("consumer")))
        lines.append(
            f"- Epoch boundary, {r.name}, {consumer}, {i['epochs_per_round']} epochs per round, "
            f"{i['boundaries']} boundaries: first-batch wait median {first:,.1f} µs (max "
            f"{i['first_batch_wait_max_us']:,.1f} µs) vs median batch wait {i['median_batch_wait_us']:,.1f} µs "
            f"(chunk-start median {i['chunk_start_wait_median_us']:,.1f} µs, p90 {p90:,.1f} µs, other batches' max "
            f"{i['max_other_batch_wait_us']:,.1f} µs): {verdict}; consumer waited {i['wait_share']:.1%} of the time; "
            f"{rate(r.samples_per_s)} samples/s ({rate(r.mb_per_s)} MB/s) over consecutive epochs; "
            f"epochs prepared ahead: {i['warm_starts']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the file --benchmark-json wrote")
    args = parser.parse_args(argv)
    data, results = load(args.json)
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    commit = data.get("commit_info", {})
    first = next(r for r in results if r.kind == "loader") if any(r.kind == "loader" for r in results) else results[0]
    print(f"ShardLoader benchmark, {data.get('datetime', '?')}, {cpu.get('brand_raw', machine.get('machine', '?'))} "
          f"x{cpu.get('count', '?')}, commit {str(commit.get('id', '?'))[:10]}"
          f"{' (dirty)' if commit.get('dirty') else ''}; "
          f"one epoch = {first.samples:,.0f} samples, {first.bytes / 1e6:,.0f} MB")
    print()
    print("\n".join(table(results)))
    lines = boundary_lines(results)
    if lines:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
