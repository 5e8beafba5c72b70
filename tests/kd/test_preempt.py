"""Preemption: a stop signal finishes the step, saves a recovery checkpoint, prints one line and exits 75; the
resumed run ends bit-identical to an uninterrupted one. Also: ranks stop together, a second Ctrl-C stops at once,
the time-based recovery interval, and the guard that turns signals into a flag."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.config.train import TrainConfig
from shardstore.errors import ConfigError
from shardstore.kd import checkpoint as checkpoint_module
from shardstore.kd import preempt as preempt_module
from shardstore.kd import trainable
from shardstore.kd.checkpoint import load_checkpoint
from shardstore.kd.metrics import read_metrics
from shardstore.kd.preempt import EXIT_PREEMPTED, PreemptionGuard, TrainingPreempted
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
TIMING_KEYS = {"samples_per_s", "time_s", "wait_frac"}


def cfg(run_dir: Path, cache: Path, **extra: Any):
    return load_run_config(*CONFIGS, overrides(run_dir, cache, **{"train__epochs": 2, **extra}))


def step_rows(run_dir: Path) -> list[tuple]:
    return [(r["global_step"], r["epoch"], r["step"], r["loss"], r["lr"])
            for r in read_metrics(run_dir) if r["kind"] == "step"]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir) if r["kind"] == "epoch"]


def latest(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp-*"))


class SignalAt:
    """Sends ``sig`` to this process at ``(epoch, step)`` (a logged step) or, with ``step`` None, at ``epoch``'s end."""

    def __init__(self, sig: int, epoch: int, step: int | None = None) -> None:
        self.sig, self.epoch, self.at_step = sig, epoch, step

    def epoch_start(self, *args: Any) -> None:
        pass

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if (epoch, step) == (self.epoch, self.at_step):
            os.kill(os.getpid(), self.sig)

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        if self.at_step is None and epoch == self.epoch:
            os.kill(os.getpid(), self.sig)


@pytest.fixture(scope="module")
def whole(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run (8 steps per epoch): what every stopped and resumed run must end as."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(cfg(run_dir, tiny_cache))
    return run_dir


# -- the guard ------------------------------------------------------------------------------------------------------


def test_the_guard_turns_signals_into_a_flag_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard(["SIGTERM", "usr1"], notify=False) as guard:
        assert guard.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal that is not Ctrl-C: the save goes on
        assert guard.requested == "SIGUSR1" and not guard.aborted
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_raises_at_once() -> None:
    with PreemptionGuard(["SIGINT"], notify=False) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns
        assert guard.aborted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP", "NOPE", "SIG_DFL", ""])
def test_signals_that_cannot_be_caught_are_refused_in_the_config(name: str) -> None:
    with pytest.raises(ValueError, match=rf"`preempt_signals` holds '{name}', not a signal a process can catch"):
        TrainConfig(preempt_signals=(name,))


def test_recovery_checkpoints_default_to_every_10_minutes() -> None:
    t = TrainConfig()
    assert (t.checkpoint.every_minutes, t.checkpoint.every_steps) == (10.0, 0)
    assert t.preempt_signals == ("SIGTERM", "SIGINT", "SIGUSR1")
    assert EXIT_PREEMPTED == 75


# -- in-process runs --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stop_asked_during_start_up_saves_nothing_and_says_so(tiny_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainable.build_student

    def build_student(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # while the models are built
        return real(*args, **kwargs)

    monkeypatch.setattr("shardstore.kd.trainer.build_student", build_student)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingPreempted, match=r"^stopped by SIGTERM in epoch 1/2 after step 0/8 \(global step 0, "
                                                 r"0 samples\): nothing to save yet$") as stop:
        train(cfg(run_dir, tiny_cache))
    assert stop.value.checkpoint is None
    assert not (run_dir / "checkpoints" / "latest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("at", [(0, 3), (0, 8), (1, 1)], ids=["mid-epoch", "last-batch", "second-epoch"])
def test_a_signal_at_a_step_saves_it_and_the_resumed_run_is_bit_identical(tiny_cache: Path, tmp_path: Path,
                                                                          whole: Path, at: tuple[int, int]) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingPreempted) as stop:
        train(cfg(run_dir, tiny_cache), reporter=SignalAt(signal.SIGTERM, *at))
    step = at[0] * 8 + at[1]
    assert str(stop.value) == (f"stopped by SIGTERM in epoch {at[0] + 1}/2 after step {at[1]}/8 (global step {step}, "
                               f"{16 * step} samples): saved {run_dir}/checkpoints/recovery.pt")
    assert latest(run_dir) == {"path": "recovery.pt", "global_step": step}
    assert not (run_dir / "final_rank0.json").exists()
    resumed = train(cfg(run_dir, tiny_cache), resume=True)
    assert resumed.weights_sha256 == json.loads((whole / "final_rank0.json").read_text())["weights_sha256"]
    assert step_rows(run_dir) == step_rows(whole) and epoch_rows(run_dir) == epoch_rows(whole)
    assert not (run_dir / "checkpoints" / "recovery.pt").exists()


@pytest.mark.slow
def test_a_signal_during_the_epoch_end_stops_on_the_epoch_checkpoint(tiny_cache: Path, tmp_path: Path,
                                                                      whole: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingPreempted, match=r"stopped by SIGUSR1 after epoch 1/2 \(global step 8, 128 samples\): "
                                                r"saved .*/checkpoints/epoch_0000.pt$"):
        train(cfg(run_dir, tiny_cache), reporter=SignalAt(signal.SIGUSR1, 0))
    assert latest(run_dir)["path"] == "epoch_0000.pt" and not (run_dir / "checkpoints" / "recovery.pt").exists()
    train(cfg(run_dir, tiny_cache), resume=True)
    assert step_rows(run_dir) == step_rows(whole) and epoch_rows(run_dir) == epoch_rows(whole)


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_save_stops_at_once_and_keeps_the_last_checkpoint(
        tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    real_write = checkpoint_module._RecordingWriter.write
    saves = []

    def write(self: Any, data: bytes) -> int:
        if not saves:  # the first write of the recovery checkpoint the first Ctrl-C asked for
            saves.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(self, data)

    run_dir = tmp_path / "run"
    train(cfg(run_dir, tiny_cache, train__epochs=1))  # epoch_0000.pt: the newest complete checkpoint
    before = (run_dir / "checkpoints" / "epoch_0000.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module._RecordingWriter, "write", write)
    sets = [a for o in overrides(run_dir, tiny_cache, train__epochs=2) for a in ("--set", o)]

    class CtrlC:  # the first Ctrl-C lands at the first logged step of the resumed run
        def __init__(self) -> None:
            self.sent = False

        def __call__(self, *args: Any) -> None:
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr("shardstore.cli.train.RichReporter.step", lambda self, *a: ctrl_c())
    ctrl_c = CtrlC()
    code = main(["train", *sets, "--resume", "--device", "cpu"])
    err = capfd.readouterr().err  # the notice is written to file descriptor 2 directly
    assert code == 130, err
    assert err.splitlines()[-1] == (f"shardstore: stopped at once by Ctrl-C; {run_dir}/checkpoints keeps its newest "
                                    "complete checkpoint (writes are atomic): continue with --resume")
    assert "press Ctrl-C again to stop at once" in err and "Traceback" not in err
    assert latest(run_dir)["path"] == "epoch_0000.pt" and temporaries(run_dir) == []
    assert (run_dir / "checkpoints" / "epoch_0000.pt").read_bytes() == before
    assert not (run_dir / "checkpoints" / "recovery.pt").exists()
    assert not (run_dir / ".lock").read_bytes()  # released


@pytest.mark.slow
def test_recovery_checkpoints_follow_the_minutes_interval(tiny_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(preempt_module, "time", SimpleNamespace(monotonic=lambda: clock.now))
    saved: list[int] = []
    real_save = checkpoint_module.CheckpointManager.save_recovery

    def save_recovery(self: Any, state: dict) -> Path:
        saved.append(int(state["global_step"]))
        return real_save(self, state)

    monkeypatch.setattr(checkpoint_module.CheckpointManager, "save_recovery", save_recovery)

    class FourMinutesPerStep:
        def epoch_start(self, *args: Any) -> None:
            pass

        def step(self, *args: Any) -> None:
            clock.now += 240.0

        def epoch_end(self, *args: Any) -> None:
            pass

    train(cfg(tmp_path / "run", tiny_cache, train__checkpoint__every_minutes=10), reporter=FourMinutesPerStep())
    # 12 minutes after the last checkpoint at steps 3, 6 (not 8: the epoch's own checkpoint follows), 11 and 14
    assert saved == [3, 6, 11, 14]
    saved.clear()
    train(cfg(tmp_path / "off", tiny_cache, train__checkpoint__every_minutes=0), reporter=FourMinutesPerStep())
    assert saved == []


# -- the real thing: a CLI process and a signal ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_cli_run_saves_exits_75_and_the_printed_command_resumes_it_bit_identical(
        tmp_path: Path, sig: signal.Signals) -> None:
    from tests.attack.harness import cli, cli_start, run_sets, warm
    from tests.attack.harness import tiny_cache as attack_cache

    cache = attack_cache(tmp_path / "cache")
    extra = {"train__epochs": 3, "train__checkpoint__every_steps": 0, "train__log__every_steps": 1}
    warm()
    reference = cli("train", *run_sets(tmp_path / "whole", cache, **extra), "--device", "cpu")
    assert reference.code == 0, reference.describe()

    run_dir = tmp_path / "run"
    child = cli_start("train", *run_sets(run_dir, cache, **extra), "--device", "cpu")
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or '"step"' not in (run_dir / "metrics.jsonl").read_text():
        assert child.alive() and time.monotonic() < deadline, child.wait(1).describe()
        time.sleep(0.01)
    os.kill(child.pid, sig)  # after the first logged step
    stopped = child.wait()
    assert stopped.code == EXIT_PREEMPTED, stopped.describe()
    lines = [line for line in stopped.err_lines if not line.startswith("WARNING shardstore.")]
    notice = f"shardstore: {sig.name} received: saving a recovery checkpoint after the current step"
    assert lines[0].startswith(notice) and len(lines) == 2, stopped.describe()
    step = latest(run_dir)["global_step"]
    assert latest(run_dir)["path"] == "recovery.pt" and 1 <= step < 18
    epoch, in_epoch = divmod(step, 6)
    head = (f"shardstore: stopped by {sig.name} in epoch {epoch + 1}/3 after step {in_epoch}/6 (global step {step}, "
            f"{8 * step} samples): saved {run_dir}/checkpoints/recovery.pt; continue with: ")
    assert lines[1].startswith(head) and lines[1].endswith(" --resume (exit code 75)"), lines[1]
    assert load_checkpoint(run_dir / "checkpoints" / "recovery.pt")["global_step"] == step
    assert temporaries(run_dir) == [] and not (run_dir / "final_rank0.json").exists()

    command = shlex.split(lines[1][len(head):].removesuffix(" (exit code 75)"))
    assert command[:2] == ["shardstore", "train"]
    resumed = cli(*command[1:])  # exactly what the line says to run
    assert resumed.code == 0, resumed.describe()
    assert (f"resuming from {run_dir}/checkpoints/recovery.pt: in epoch {epoch + 1}/3 after step {in_epoch}/6 "
            f"(global step {step}, {8 * step} samples)") in resumed.out.splitlines()
    final = json.loads((run_dir / "final_rank0.json").read_text())
    assert final == json.loads((tmp_path / "whole" / "final_rank0.json").read_text())  # bit-identical weights
    assert step_rows(run_dir) == step_rows(tmp_path / "whole")
    assert epoch_rows(run_dir) == epoch_rows(tmp_path / "whole")


def _launch_rank(rank: int, port: int, sets: list[str], logs: Path) -> subprocess.Popen:
    """One rank of a 2-process gloo job started directly (as ``srun`` starts one task per GPU), not by torchrun."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(logs / f"rank{rank}.out", "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "shardstore", "train", "--device", "cpu", *sets], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_they_resume_identical(tiny_cache: Path,
                                                                                    tmp_path: Path) -> None:
    def job(run_dir: Path, *args: str, signal_rank1: bool = False) -> list[int]:
        sets = [a for o in overrides(run_dir, tiny_cache, train__epochs=3, train__log__every_steps=1)
                for a in ("--set", o)] + list(args)
        port = _free_port()
        ranks = [_launch_rank(r, port, sets, tmp_path) for r in (0, 1)]
        if signal_rank1:
            deadline = time.monotonic() + 180
            while not (run_dir / "metrics.jsonl").exists() or '"step"' not in (run_dir / "metrics.jsonl").read_text():
                assert time.monotonic() < deadline and all(p.poll() is None for p in ranks)
                time.sleep(0.01)
            ranks[1].send_signal(signal.SIGTERM)  # only rank 1 hears it; rank 0 must stop at the same step
        return [p.wait(timeout=300) for p in ranks]

    assert job(tmp_path / "whole") == [0, 0]
    run_dir = tmp_path / "run"
    assert job(run_dir, signal_rank1=True) == [EXIT_PREEMPTED, EXIT_PREEMPTED], (tmp_path / "rank0.out").read_text()
    rank0 = (tmp_path / "rank0.out").read_text()
    assert "shardstore: stopped by a signal to another rank in epoch" in rank0, rank0
    assert latest(run_dir)["path"] == "recovery.pt"
    assert job(run_dir, "--resume") == [0, 0], (tmp_path / "rank0.out").read_text()
    for r in (0, 1):
        assert json.loads((run_dir / f"final_rank{r}.json").read_text()) == \
            json.loads((tmp_path / "whole" / f"final_rank{r}.json").read_text())
    assert step_rows(run_dir) == step_rows(tmp_path / "whole")


def test_resume_into_a_run_dir_without_a_checkpoint_is_one_line_naming_it(tiny_cache: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    typo = tmp_path / "rnus" / "kd"
    sets = [a for o in overrides(typo, tiny_cache) for a in ("--set", o)]
    assert main(["train", *sets, "--resume", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert err == [f"shardstore: error: --resume: train.run_dir {typo} holds no checkpoint "
                   f"({typo}/checkpoints/latest.json does not exist); check train.run_dir, or start without --resume "
                   "(--auto-resume starts fresh when there is none)"]
    assert not typo.exists()
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(cfg(typo, tiny_cache), resume=True)
