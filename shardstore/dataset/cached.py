"""``CachedTensorDataset``: map-style over every sample of the manifest, a dict of tensors per sample."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from shardstore.store.reader import ShardStore


class CachedTensorDataset(Dataset):
    """Every sample of ``store`` by global id (shard-id order), as ``{field: tensor}``.

    Each tensor owns a copy of its sample (a few KB): the shard maps are read-only, and a
    tensor aliasing them would crash the process on the first in-place operation. The
    loader's bulk path gathers whole batches into reused buffers instead.
    """

    def __init__(self, store: ShardStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return self.store.num_samples

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        if isinstance(sample_id, (torch.Tensor, np.integer)):
            sample_id = int(sample_id)
        if sample_id < 0:
            sample_id += self.store.num_samples
        position, row = self.store.position_of(sample_id)
        # Guarded copies: a shard file truncated while mapped is an error naming it, not SIGBUS.
        return {name: torch.from_numpy(self.store.read(position, name, row)) for name in self.store.fields}
