"""The ring's slots: one preallocated (page-locked when asked) host buffer per field, reused for every batch."""

from __future__ import annotations

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


def make_slots(fields: dict[str, FieldSpec], batch_size: int, count: int, *, pin_memory: bool,
               cuda: bool) -> list[Slot]:
    """``count`` slots holding ``batch_size`` samples of every field."""
    dtypes = {name: torch_dtype(name, spec.dtype) for name, spec in fields.items()}
    slots = []
    for _ in range(count):
        host = {name: torch.empty((batch_size, *spec.shape), dtype=dtypes[name], pin_memory=pin_memory)
                for name, spec in fields.items()}
        slots.append(Slot(host=host, arrays={k: t.numpy() for k, t in host.items()},
                          copied=torch.cuda.Event() if cuda else None))
    return slots
