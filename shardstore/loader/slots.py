"""The ring's slots: one preallocated (page-locked when asked) host buffer per field, reused for every batch."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np
import torch

from shardstore.errors import ConfigError
from shardstore.manifest.model import FieldSpec


def torch_dtype(name: str, dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a field's NumPy dtype; ``ConfigError`` naming the field when torch has none."""
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        raise ConfigError(f"field {name!r} has dtype {dtype}, which torch cannot hold; "
                          "store it as a supported dtype (e.g. uint8, int64, float16, float32)") from None


@dataclass
class Slot:
    """One batch's buffers and, once filled, which batch they hold."""

    host: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    seq: int = -1
    size: int = 0
    error: BaseException | None = None
    #: CUDA only: the device copy of the batch, and an event recorded after that copy was issued
    device_batch: dict[str, torch.Tensor] | None = None
    copied: torch.cuda.Event | None = None
    views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        """Samples a slot holds (the batch size)."""
        return next(iter(self.arrays.values())).shape[0]

    def batch(self) -> dict[str, torch.Tensor]:
        """The filled rows as tensors viewing the host buffers (a partial batch is a leading slice)."""
        views = self.views.get(self.size)
        if views is None:
            views = self.views[self.size] = {k: t[: self.size] for k, t in self.host.items()}
        return dict(views)


#: Each wake-up of a thread should pay for about this much copying (see ``pipeline``).
CHUNK_BYTES = 4 << 20
MAX_CHUNK = 8


def chunk_batches(fields: dict[str, FieldSpec], batch_size: int) -> int:
    """Batches per chunk: about ``CHUNK_BYTES`` of data, at least 1 and at most ``MAX_CHUNK``."""
    batch_bytes = batch_size * sum(spec.sample_bytes for spec in fields.values())
    return max(1, min(MAX_CHUNK, -(-CHUNK_BYTES // max(1, batch_bytes))))


def ring_size(chunk: int, num_threads: int, prefetch: int) -> int:
    """Slots: a chunk in work per thread, ``prefetch`` batches ready, one held by the consumer; whole chunks."""
    need = chunk * num_threads + max(prefetch, chunk) + 1
    return -(-need // chunk) * chunk


HUGE_PAGE = 2 << 20
_SLOT_ALIGN = 4096


def ring_memory(nbytes: int) -> np.ndarray:
    """``nbytes`` of fresh private anonymous memory (uint8), backed by 2 MiB pages where the kernel allows.

    A fresh process pays for every page of new memory on first touch (a fault, and on a VM
    an exit to the host): touching the ~20 MB of a ring one 4 KiB page at a time took 11-14 ms
    on the 2-core VMs, in 2 MiB pages 3.5-4 ms (both more while the host is busy), while the
    copies of a whole 15-shard epoch take 40-60 ms. Transparent huge pages are asked for with
    ``MADV_HUGEPAGE`` (the kernel default is "madvise"); where they are unavailable, this is
    ordinary memory.
    """
    size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    whole = np.frombuffer(region, np.uint8)  # keeps the map alive as long as a view of it lives
    start = -whole.ctypes.data % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, size)
        except OSError:
            pass  # no transparent huge pages here: 4 KiB pages
    return whole[start : start + nbytes]


def make_slots(fields: dict[str, FieldSpec], batch_size: int, count: int, *, pin_memory: bool,
               cuda: bool) -> list[Slot]:
    """``count`` slots holding ``batch_size`` samples of every field.

    Page-locked slots come from torch's pinned allocator; the others from one ``ring_memory``
    region (each buffer page-aligned), so a fresh loader's first pass over its ring is cheap.
    """
    dtypes = {name: torch_dtype(name, spec.dtype) for name, spec in fields.items()}
    sizes = {name: batch_size * spec.sample_bytes for name, spec in fields.items()}
    stride = sum(-(-n // _SLOT_ALIGN) * _SLOT_ALIGN for n in sizes.values())
    region = None if pin_memory else ring_memory(count * stride)
    slots = []
    for k in range(count):
        if region is None:
            host = {name: torch.empty((batch_size, *spec.shape), dtype=dtypes[name], pin_memory=True)
                    for name, spec in fields.items()}
        else:
            host, at = {}, k * stride
            for name, spec in fields.items():
                arr = region[at : at + sizes[name]].view(spec.dtype).reshape(batch_size, *spec.shape)
                host[name] = torch.from_numpy(arr)
                at += -(-sizes[name] // _SLOT_ALIGN) * _SLOT_ALIGN
        slots.append(Slot(host=host, arrays={k: t.numpy() for k, t in host.items()},
                          copied=torch.cuda.Event() if cuda else None))
    return slots
