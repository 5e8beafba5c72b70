"""CheckpointManager(keep_last=3) keeps exactly the last three epoch checkpoints."""

from __future__ import annotations

from pathlib import Path

from shardstore.kd.checkpoint import CheckpointManager


def test_keep_last_three_of_five_epochs(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3, keep_best=False)
    for epoch in range(1, 6):
        manager.save_epoch({"global_step": epoch * 10, "epoch": epoch}, epoch, is_best=False)
    epochs = sorted(p.name for p in manager.dir.iterdir() if p.name.startswith("epoch_"))
    assert epochs == ["epoch_0003.pt", "epoch_0004.pt", "epoch_0005.pt"]
