"""Synthetic format-3 stores of up to millions of shards for ``test_store_bench.py``, and the probes it runs in fresh
processes (``python bench/synthetic_store.py PROBE ROOT``: one JSON object on stdout).

A store's shard table is written directly as columns (no million files, no scan); only the
shards that epochs 0 and 1 read (``RandomShardSubsetCachedDataset(store, 15, seed 42,
batch_size=64)`` on one rank) are real files, written after the epochs are planned on the
table, with the sizes, data offsets and mtimes the table then records. Sample ``k`` of
shard ``i`` has label ``i * samples_per_shard + k``: its global sample id, so a batch can
be checked against the dataset's ids. Every image of every shard holds the same random
bytes (the page cache keeps each file's pages anyway).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.store.manifest import FieldSpec, Manifest, empty_columns
from shardstore.store.snapshot import manifest_path, write_manifest

IMAGE_SHAPE = (3, 64, 64)
FIELDS = {"images": FieldSpec(np.dtype(np.uint8), IMAGE_SHAPE), "labels": FieldSpec(np.dtype(np.int64), ())}
SHARDS_PER_EPOCH = 15
BATCH_SIZE = 64
SEED = 42
EPOCHS_ON_DISK = (0, 1)  # the loader prepares epoch 1 while epoch 0 drains, so its shards must exist too
NPY_OFFSET = 128  # data offset np.save gives both fields at these shapes (checked when the files are written)
CHUNK = 8 << 20


@dataclass(frozen=True)
class SyntheticStore:
    """A written store: its root, size, and the shard files that exist (the rest are only rows of the table)."""

    root: Path
    num_shards: int
    samples_per_shard: int
    epoch_shards: dict[int, tuple[int, ...]]  # epoch -> shard ids it reads, in visit order
    files: tuple[Path, ...]

    @property
    def table_dir(self) -> Path:
        """The directory of the current snapshot's columns."""
        return self.root / json.loads(manifest_path(self.root).read_text())["table"]

    def table_files(self) -> list[Path]:
        return sorted(self.table_dir.glob("*.npy"))


def table_columns(num_shards: int, samples_per_shard: int, *, mtime_ns: int, checksums: bool = False
                  ) -> dict[str, np.ndarray]:
    """The shard table of ``num_shards`` native-layout shards of ``samples_per_shard`` samples each."""
    cols = empty_columns(FIELDS, num_shards, digests=list(FIELDS) if checksums else ())
    cols["id"][:] = np.arange(num_shards)
    cols["samples"][:] = samples_per_shard
    cols["layout"][:] = 0  # native: shard_<id>/<field>.npy
    cols["digits"][:] = 6
    cols["since"][:] = 0
    for name in FIELDS:
        cols[f"{name}.offset"][:] = NPY_OFFSET
        cols[f"{name}.mtime_ns"][:] = mtime_ns
    cols["labels.min"][:] = cols["id"] * samples_per_shard
    cols["labels.max"][:] = cols["labels.min"] + samples_per_shard - 1
    if checksums:  # any non-zero digest: the size, not the value, is what is measured
        for name in FIELDS:
            cols[f"{name}.sha256"][:] = 0xA5
    return cols


def plan_epochs(root: Path, epochs: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """The shard ids each epoch reads, as the dataset plans them on the table at ``root``."""
    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset

    ds = RandomShardSubsetCachedDataset(ShardStore.open(root), SHARDS_PER_EPOCH, SEED, batch_size=BATCH_SIZE)
    out = {}
    for epoch in epochs:
        ds.set_epoch(epoch)
        out[epoch] = tuple(ds.selected_shards)
    return out


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read(f)
        return f.tell()


def write_store(root: Path, num_shards: int, samples_per_shard: int) -> SyntheticStore:
    """Write the table, plan epochs 0 and 1 on it, write those shards' files, then the table again with their mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    cols = table_columns(num_shards, samples_per_shard, mtime_ns=time.time_ns())
    write_manifest(root, Manifest(FIELDS, columns=cols))
    epoch_shards = plan_epochs(root, EPOCHS_ON_DISK)
    shard_ids = sorted({s for ids in epoch_shards.values() for s in ids})
    rng = np.random.default_rng(0)
    images = np.frombuffer(rng.bytes(samples_per_shard * int(np.prod(IMAGE_SHAPE))), np.uint8)
    images = images.reshape(samples_per_shard, *IMAGE_SHAPE)
    files = []
    for shard_id in shard_ids:
        directory = root / f"shard_{shard_id:06d}"
        directory.mkdir(exist_ok=True)
        start = shard_id * samples_per_shard
        arrays = {"images": images, "labels": np.arange(start, start + samples_per_shard, dtype=np.int64)}
        for name, array in arrays.items():
            path = directory / f"{name}.npy"
            np.save(path, array, allow_pickle=False)
            offset = _data_offset(path)
            if offset != NPY_OFFSET:
                raise AssertionError(f"{path}: np.save put the data at {offset}, the table records {NPY_OFFSET}")
            cols[f"{name}.mtime_ns"][shard_id] = path.stat().st_mtime_ns  # position == id in this table
            files.append(path)
    write_manifest(root, Manifest(FIELDS, columns=cols))
    os.sync()  # write back now, so writeback does not disturb the timed runs (pages stay cached)
    return SyntheticStore(root, num_shards, samples_per_shard, epoch_shards, tuple(files))


def write_format2(store: SyntheticStore, root: Path) -> Path:
    """The same manifest as a format-2 JSON document (every shard a dict) at ``root/manifest.json`` (no shard files)."""
    from shardstore import ShardStore

    root.mkdir(parents=True, exist_ok=True)
    text = ShardStore.open(store.root).manifest.to_json()
    path = manifest_path(root)
    path.write_text(text)
    return path


def pre_read(paths: Sequence[Path]) -> None:
    """Read every file once, so that the next fresh process finds it in the page cache."""
    buf = bytearray(CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- memory of a process ---------------------------------------------------------------------


def memory(pid: int | str = "self", root: str | None = None) -> dict[str, int]:
    """Bytes of a process: VmRSS, VmHWM (peak), RssAnon, RssFile (/proc/PID/status), Pss and Private (clean +
    dirty, smaps_rollup).

    With ``root``, also the resident bytes of its maps of the shard files under ``root``
    (``ShardFiles``: the data an epoch reads, the same amount at every shard count) and of
    the manifest table (``Table``), from /proc/PID/smaps, and ``Rest``: VmRSS without ShardFiles.
    """
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    private = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Pss":
                out["Pss"] = int(value.split()[0]) * 1024
            elif key in ("Private_Clean", "Private_Dirty"):
                private += int(value.split()[0]) * 1024
    out["Private"] = private
    if root is not None:
        root = os.path.realpath(root)
        shards, table = os.path.join(root, "shard_"), os.path.join(root, "manifest.d") + os.sep
        out["ShardFiles"] = out["Table"] = 0
        kind = None
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    path = head[5].strip() if len(head) == 6 else ""
                    kind = "ShardFiles" if path.startswith(shards) else "Table" if path.startswith(table) else None
                elif kind is not None and line.startswith("Rss:"):
                    out[kind] += int(line.split()[1]) * 1024
        out["Rest"] = out["VmRSS"] - out["ShardFiles"]
    return out


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before`` of every figure; VmHWM becomes the peak above ``before``'s VmRSS (see ``reset_peak``)."""
    out = {key: after[key] - before[key] for key in before}
    out["VmHWM"] = after["VmHWM"] - before["VmRSS"]
    return out


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the next peak is the measured step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- probes (each run in a fresh interpreter) -------------------------------------------------


def probe_open(root: str) -> dict[str, Any]:
    """Open the store; RSS before, after the open, and after touching ``offsets`` and ``num_samples``."""
    from shardstore import ShardStore

    reset_peak()
    before = memory()
    start = time.perf_counter()
    store = ShardStore.open(root)
    opened = time.perf_counter()
    after_open = memory()
    _ = store.offsets, store.num_samples  # computed on first use: what a loader asks for first
    touched = time.perf_counter()
    after_touch = memory()
    return {"open_s": opened - start, "touch_s": touched - opened, "num_shards": store.num_shards,
            "num_samples": store.num_samples, "format_version": store.manifest.format_version,
            "rss_open": growth(before, after_open), "rss_touch": growth(before, after_touch)}


def probe_first_batch(root: str) -> dict[str, Any]:
    """Open + dataset + ``ShardLoader(num_threads=2)`` + its first batch; the batch is checked against the dataset."""
    import torch

    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    random_imported = "numpy.random" in sys.modules  # numpy imports it on first use: in the timed steps if not yet
    marks = [time.perf_counter()]
    store = ShardStore.open(root)
    marks.append(time.perf_counter())
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=SHARDS_PER_EPOCH, batch_size=BATCH_SIZE)
    marks.append(time.perf_counter())
    loader = ShardLoader(ds, num_threads=2)
    marks.append(time.perf_counter())
    batch = next(iter(loader))
    marks.append(time.perf_counter())
    want = torch.from_numpy(np.array(ds.indices()[:BATCH_SIZE]))
    ok = bool(torch.equal(batch["labels"], want)) and tuple(batch["images"].shape) == (BATCH_SIZE, *IMAGE_SHAPE)
    loader.close()
    steps = np.diff(marks)
    return {"total_s": marks[-1] - marks[0], "open_s": steps[0], "dataset_s": steps[1], "loader_s": steps[2],
            "first_batch_s": steps[3], "batch_ok": ok, "num_shards": store.num_shards,
            "numpy_random_imported_before": random_imported}


def probe_epoch_memory(root: str) -> dict[str, Any]:
    """RSS growth of store + dataset + ShardLoader(num_threads=2) after one whole epoch, step by step."""
    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    reset_peak()
    marks = {"start": memory(root=root)}
    store = ShardStore.open(root)
    _ = store.offsets
    marks["store"] = memory(root=root)
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=SHARDS_PER_EPOCH, batch_size=BATCH_SIZE)
    len(ds)  # plans epoch 0
    marks["dataset"] = memory(root=root)
    loader = ShardLoader(ds, num_threads=2)
    marks["loader"] = memory(root=root)
    batches = sum(1 for _ in loader)
    marks["epoch"] = memory(root=root)
    out = {name: growth(marks["start"], m) for name, m in marks.items() if name != "start"}
    out.update(batches=batches, steps=ds.steps_per_epoch, num_shards=store.num_shards)
    loader.close()
    return out


def probe_workers(root: str, method: str) -> dict[str, Any]:
    """``DataLoader(dataset, batch_size=64, num_workers=2)`` started by ``method``: each worker's memory after
    it served all but the last batch of the epoch, and the parent's."""
    import torch
    from torch.utils.data import DataLoader

    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset

    start = memory(root=root)
    store = ShardStore.open(root)
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=SHARDS_PER_EPOCH, batch_size=BATCH_SIZE)
    loader = DataLoader(ds, batch_size=BATCH_SIZE, num_workers=2, multiprocessing_context=method)
    it = iter(loader)
    n = len(loader)
    first = next(it)
    ok = bool(torch.equal(first["labels"], torch.from_numpy(np.array(ds.indices()[:BATCH_SIZE]))))
    for _ in range(n - 2):
        next(it)
    workers = [memory(w.pid, root) for w in it._workers]
    parent = growth(start, memory(root=root))
    for _ in it:
        pass
    return {"workers": workers, "parent": parent, "batches": n, "batch_ok": ok, "num_shards": store.num_shards}


PROBES = {"open": probe_open, "first-batch": probe_first_batch, "epoch-memory": probe_epoch_memory,
          "workers": probe_workers}


def run_probe(name: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run probe ``name`` in a fresh interpreter; its result, with ``wall_s`` (the whole process) added."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, name, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode:
        raise AssertionError(f"probe {name} {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str]) -> None:
    name, *args = argv
    probe = PROBES[name]
    # Everything a probe imports is imported before its first measurement.
    import torch  # noqa: F401

    import shardstore.dataset.subset
    import shardstore.loader  # noqa: F401
    from shardstore import ShardStore  # noqa: F401

    result = probe(*args)
    print(json.dumps(result, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


if __name__ == "__main__":
    main(sys.argv[1:])
