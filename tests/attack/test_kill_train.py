"""``shardstore train`` killed with SIGKILL at random moments, resumed each time: no partial checkpoint is ever
visible, ``latest.json`` always names a loadable checkpoint that is never older than the one before the kill,
and the run ends with the weights and metrics of an uninterrupted run and no temporaries left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shardstore.kd.checkpoint import load_checkpoint
from shardstore.kd.metrics import read_metrics

from .harness import cli, cli_start, kill_delay, kill_fractions, plant_stale, run_sets, temporaries, tiny_cache, warm

SEED = 11
KILLS = 24  # in all, over several chains of resumed runs
KILLS_PER_CHAIN = 6
TIMING_KEYS = {"samples_per_s", "time_s", "wait_frac"}


def checkpoint_state(run_dir: Path, previous_step: int) -> int:
    """Check the run directory right after a kill; returns the step ``latest.json`` names (0 without one)."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.exists():
        return 0
    for path in sorted(ckpts.glob("*.pt")):
        if path.name.startswith("."):
            continue
        state = load_checkpoint(path)  # a partial file under a final name fails here
        assert int(state["global_step"]) > 0, path
    pointer = ckpts / "latest.json"
    if not pointer.exists():
        assert previous_step == 0, f"latest.json vanished after a kill (it named step {previous_step})"
        return 0
    doc = json.loads(pointer.read_text())
    state = load_checkpoint(ckpts / doc["path"])
    step = int(state["global_step"])
    # recovery.pt is replaced in place: a kill between it and latest.json leaves the pointer one save behind
    assert step >= int(doc["global_step"]), doc
    assert step >= previous_step, f"a kill lost checkpointed progress: step {previous_step} -> {step}"
    return step


def step_rows(run_dir: Path) -> list[tuple]:
    return [(r["global_step"], r["epoch"], r["step"], r["loss"], r["lr"])
            for r in read_metrics(run_dir) if r["kind"] == "step"]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir) if r["kind"] == "epoch"]


@pytest.mark.slow
def test_train_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "cache")
    warm()
    whole = cli("train", *run_sets(tmp_path / "whole", cache), "--device", "cpu")
    assert whole.code == 0, whole.describe()
    reference = json.loads((tmp_path / "whole" / "final_rank0.json").read_text())
    startup = cli("train", *run_sets(tmp_path / "none", tmp_path / "missing"), "--device", "cpu").seconds
    fractions = kill_fractions(SEED)

    kills = finished_early = chains = left_behind = 0
    while kills < KILLS and chains < 3 * KILLS // KILLS_PER_CHAIN:
        run_dir = tmp_path / f"chain{chains}"
        chains += 1
        step = 0
        for _ in range(KILLS_PER_CHAIN):
            remaining = 1 - step / reference["global_step"]
            child = cli_start("train", *run_sets(run_dir, cache), "--auto-resume", "--device", "cpu")
            time.sleep(kill_delay(next(fractions), startup, whole.seconds, remaining))
            child.kill()
            outcome = child.wait()
            if outcome.code == 0:  # it finished before the kill came
                finished_early += 1
                break
            assert outcome.code == -9, outcome.describe()
            kills += 1
            step = checkpoint_state(run_dir, step)
            left_behind += len(temporaries(run_dir))
        if (run_dir / "checkpoints").exists():  # what a run killed while writing each of these leaves
            for name in ("recovery.pt", "epoch_0000.pt", "best.pt", "latest.json"):
                plant_stale(run_dir / "checkpoints", name)
            plant_stale(run_dir, "config.yaml")
        rerun = cli("train", *run_sets(run_dir, cache), "--auto-resume", "--device", "cpu")
        assert rerun.code == 0, rerun.describe()
        assert temporaries(run_dir) == [], "temporaries of killed runs were left behind"
        final = json.loads((run_dir / "final_rank0.json").read_text())
        assert final == reference, f"chain {chains}: a resumed run ended elsewhere than an uninterrupted one"
        assert step_rows(run_dir) == step_rows(tmp_path / "whole"), "logged step losses differ or repeat"
        assert epoch_rows(run_dir) == epoch_rows(tmp_path / "whole"), "the epoch rows differ after resuming"
    assert kills >= KILLS // 2, f"only {kills} kills landed while a run was going"
    print(f"\nattack train: {kills} SIGKILLs survived over {chains} chains of resumed runs "
          f"({finished_early} runs finished before their kill came, {left_behind} temporaries seen after kills); "
          "weights and metrics as uninterrupted")
