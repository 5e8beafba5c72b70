"""``CachedTensorDataset``: map-style over every sample of the manifest, a dict of tensors per sample."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from shardstore import kernels
from shardstore.manifest.reader import ShardStore
from shardstore.store.mmaps import shrunk_error


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
        out = {}
        for name, view in self.store.sample(sample_id).items():
            try:
                # A guarded copy: a shard file truncated while mapped is an error naming it, not SIGBUS.
                out[name] = torch.from_numpy(kernels.copy_from_map(view, name))
            except kernels.SourceFault:
                position = int(np.searchsorted(self.store.offsets, sample_id, side="right")) - 1
                raise shrunk_error(self.store.path(position, name),
                                   self.store.shards[position].files[name].bytes) from None
        return out
