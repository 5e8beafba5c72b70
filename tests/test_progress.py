"""What a run prints where output is not a terminal: plain progress lines inside an epoch; the no-evaluation line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardstore.cli import main
from shardstore.cli.progress import PlainProgress, format_duration
from tests.kd.conftest import overrides, write_tiny_cache

LINE = re.compile(r"^epoch \d+/\d+ step \d+/\d+ loss \d+\.\d{4} [\d,]+ samples/s wait \d+\.\d%"
                  r"( eta \d+(s|m\d\ds|h\d\dm))?$")
NO_EVAL = ("no evaluation: train.eval.held_out_shards is 0 and train.eval.cache_root is null, so this run measures no "
           "top-1 and keeps no best.pt; set train.eval.held_out_shards (e.g. 1) or train.eval.cache_root to evaluate")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def values(loss: float = 1.234) -> dict[str, float]:
    return {"loss": loss, "samples_per_s": 1234.4, "wait_frac": 0.031, "lr": 1e-3}


def test_a_line_every_interval_with_an_eta() -> None:
    clock, lines = FakeClock(), []
    progress = PlainProgress(30.0, lines.append, clock)
    progress.epoch_start(2, 10, 480)
    for step in range(10, 481, 10):  # a logged step every 10 steps, one step a second
        clock.now += 10
        progress.step(step, values())
    # At 30 s, 60 s, ...: the pace is measured from the first report (step 10 at 10 s).
    assert len(lines) == 16 and all(LINE.match(line) for line in lines), lines
    assert lines[0] == "epoch 3/10 step 30/480 loss 1.2340 1,234 samples/s wait 3.1% eta 7m30s"
    assert lines[1].startswith("epoch 3/10 step 60/480 ") and lines[1].endswith(" eta 7m00s")
    assert lines[-1].endswith("step 480/480 loss 1.2340 1,234 samples/s wait 3.1% eta 0s")


def test_a_new_epoch_starts_the_interval_again() -> None:
    clock, lines = FakeClock(), []
    progress = PlainProgress(5.0, lines.append, clock)
    progress.epoch_start(0, 2, 100)
    clock.now += 4
    progress.step(50, values())
    assert lines == []
    progress.epoch_start(1, 2, 100)
    clock.now += 4
    progress.step(10, values())
    clock.now += 2
    progress.step(20, values())
    assert lines == ["epoch 2/2 step 20/100 loss 1.2340 1,234 samples/s wait 3.1% eta 16s"]


def test_zero_turns_it_off_and_a_single_report_has_no_eta() -> None:
    clock, lines = FakeClock(), []
    off = PlainProgress(0.0, lines.append, clock)
    off.epoch_start(0, 1, 10)
    clock.now += 100
    off.step(5, values())
    assert lines == []
    on = PlainProgress(1.0, lines.append, clock)
    on.epoch_start(0, 1, 10)
    clock.now += 100
    on.step(5, values())  # a resumed epoch's first report: no pace known yet
    assert lines == ["epoch 1/1 step 5/10 loss 1.2340 1,234 samples/s wait 3.1%"]


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0s"), (59.4, "59s"), (130, "2m10s"), (3600 + 300, "1h05m")])
def test_durations(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.slow
def test_a_run_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Captured output is not a terminal: progress lines on stdout, the no-evaluation line once at the start."""
    cache = write_tiny_cache(tmp_path / "cache", num_shards=4)
    sets = overrides(tmp_path / "run", cache, train__epochs=2, train__eval__held_out_shards=0,
                     train__log__progress_every_s=1e-9)  # every logged step
    assert main(["train", *[a for o in sets for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out.count(NO_EVAL) == 1 and out.index(NO_EVAL) < out.index(next(x for x in out if x.startswith("epoch 1/2")))
    progress = [line for line in out if LINE.match(line)]
    steps = 4 * 32 // 16  # 4 shards of 32 samples, batches of 16, every step logged
    assert [line.split(" loss")[0] for line in progress] == \
        [f"epoch {e}/2 step {s}/{steps}" for e in (1, 2) for s in range(1, steps + 1)]
    assert " eta " not in progress[0] and progress[1].endswith(tuple(f"eta {n}s" for n in range(60)))
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_a_run_with_evaluation_says_nothing_of_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = write_tiny_cache(tmp_path / "cache", num_shards=4)
    sets = overrides(tmp_path / "run", cache, train__epochs=1, train__eval__held_out_shards=1,
                     train__log__progress_every_s=0)
    assert main(["train", *[a for o in sets for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "no evaluation" not in out and not any(LINE.match(line) for line in out.splitlines())


def test_a_cache_in_object_storage_adds_its_download_rate_and_local_cache_use() -> None:
    clock, lines = FakeClock(), []
    progress = PlainProgress(1.0, lines.append, clock)
    progress.epoch_start(0, 1, 100)
    clock.now += 2
    progress.step(10, values() | {"remote_wait_frac": 0.012, "download_MBps": 187.4, "local_cache_GB": 3.5,
                                  "local_cache_limit_GB": 50.0})
    assert lines == ["epoch 1/1 step 10/100 loss 1.2340 1,234 samples/s wait 3.1% (remote 1.2%) download 187 MB/s "
                     "local cache 3.50/50.00 GB"]
