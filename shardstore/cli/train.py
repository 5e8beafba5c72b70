"""``shardstore train`` and ``shardstore plot``: thin front ends over ``shardstore.kd``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shardstore.cli.app import app, err, out
from shardstore.cli.progress import PlainProgress

if TYPE_CHECKING:
    from shardstore.config.resolve import RunConfig


class RichReporter:
    """A progress bar per epoch (step, loss, samples/s, share of time waiting for data) and a line per epoch.

    Where stderr is not a terminal (a SLURM log) the bar draws nothing: a plain line on stdout every
    ``progress_every_s`` seconds (``train.log.progress_every_s``) says how the epoch goes instead.
    """

    def __init__(self, enabled: bool, progress_every_s: float = 30.0) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: Any = None
        self._plain = PlainProgress(progress_every_s, lambda line: out.print(line, markup=False)) \
            if enabled and not err.is_terminal else None

    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None:
        if not self.enabled:
            return
        shown = ", ".join(map(str, shards[:12])) + (" ..." if len(shards) > 12 else "")
        out.print(f"epoch {epoch + 1}/{epochs}: {steps} steps over {len(shards)} shards [{shown}]", markup=False)
        self._bar = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err, transient=True,
                             disable=not err.is_terminal)
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, status="")
        if self._plain is not None:
            self._plain.epoch_start(epoch, epochs, steps)

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if self._plain is not None:
            self._plain.step(step, values)
        if self._bar is None:
            return
        status = (f"loss {values.get('loss', float('nan')):.4f}  {values.get('samples_per_s', 0):,.0f} samples/s  "
                  f"waiting {100 * values.get('wait_frac', 0):.1f}%")
        self._bar.update(self._task, completed=step, status=status)

    def note(self, line: str) -> None:
        """A one-line message from the trainer (where a resume continues, the settings it changed)."""
        if self.enabled:
            out.print(line, markup=False)

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if not self.enabled:
            return
        parts = [f"loss {values.get('train_loss', float('nan')):.4f}",
                 f"{values.get('samples_per_s', 0):,.0f} samples/s",
                 f"waiting {100 * values.get('wait_frac', 0):.1f}%"]
        for key, label in (("eval_top1", "top-1"), ("eval_agreement", "agreement"), ("eval_kl", "KL"),
                           ("eval_teacher_top1", "teacher top-1")):
            if key in values:
                value = values[key]
                parts.append(f"{label} {value:.4f}" if key == "eval_kl" else f"{label} {100 * value:.2f}%")
        out.print(f"  epoch {epoch + 1} done: " + ", ".join(parts), markup=False)




DataConfigOption = Annotated[Optional[str], typer.Option("--data-config", "--data_config", metavar="FILE",
                                                         help="data_config.yaml (default: configs/).")]
TrainConfigOption = Annotated[Optional[str], typer.Option("--train-config", "--train_config", metavar="FILE",
                                                          help="train_config_kd.yaml (default: configs/).")]
ModelConfigOption = Annotated[Optional[str], typer.Option("--model-config", "--model_config", metavar="FILE",
                                                          help="model_config_kd.yaml (default: configs/).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE",
                                                        help="Override a key, e.g. train.lr=3e-4 "
                                                        "or data.shards_per_epoch=8 (repeatable).")]


def load_configs(data_config: str | None, train_config: str | None, model_config: str | None,
                 overrides: list[str] | None) -> RunConfig:
    """The three configs (defaults from configs/) with ``--set`` overrides applied."""
    from shardstore.config.resolve import (
        DEFAULT_DATA_CONFIG,
        DEFAULT_MODEL_CONFIG,
        DEFAULT_TRAIN_CONFIG,
        load_run_config,
    )

    return load_run_config(data_config or DEFAULT_DATA_CONFIG, train_config or DEFAULT_TRAIN_CONFIG,
                           model_config or DEFAULT_MODEL_CONFIG, overrides or [])


@app.command(short_help="Distill a student from a teacher over random shard epochs.")
def train(
    data_config: DataConfigOption = None,
    train_config: TrainConfigOption = None,
    model_config: ModelConfigOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in train.run_dir from its latest "
                                         "checkpoint, at the exact next batch (an error if it has none).")] = False,
    auto_resume: Annotated[bool, typer.Option("--auto-resume", help="Continue from the latest checkpoint if "
                                              "train.run_dir has one, else start: for batch jobs that are requeued.")
                           ] = False,
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", metavar="CHECKPOINT",
                                                       help="Continue from this checkpoint file "
                                                       "(e.g. RUN_DIR/checkpoints/epoch_0003.pt) instead of the "
                                                       "latest; the run still writes to train.run_dir.")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help="cpu, cuda or cuda:N (default: "
                                                  "cuda:LOCAL_RANK when CUDA is available, else cpu).")] = None,
) -> None:
    """Distill a student from a teacher over random shard epochs (also under torchrun for several GPUs).

    Needs: a cache with a manifest (`shardstore write`, or `shardstore build-manifest` for shards written
    by hand) at data_config's cache_root, and the three configs (defaults: configs/). The teacher's weights
    come from model_config's teacher.checkpoint (else a random teacher, with a warning), or its outputs
    from `shardstore cache-teacher` (data.teacher_targets). All three files are checked before anything
    runs, every problem in one go.

    SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (train.preempt_signals) finish the current step, save a recovery
    checkpoint and exit with code 75; run the same command with --resume to continue. A second Ctrl-C stops at once.
    """
    from shardstore.config.resolve import run_config_to_yaml
    from shardstore.kd.preempt import EXIT_PREEMPTED, TrainingPreempted
    from shardstore.kd.trainer import train as run_training

    cfg = load_configs(data_config, train_config, model_config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        out.print("resolved configuration:", markup=False)
        out.print(run_config_to_yaml(cfg), markup=False)
    how = resume_from or resume or ("auto" if auto_resume else False)
    try:
        reporter = RichReporter(main_rank, cfg.train.log.progress_every_s)
        result = run_training(cfg, resume=how, reporter=reporter, device=device)
    except TrainingPreempted as stop:
        if main_rank:
            flag = "--resume" if stop.checkpoint is not None else None  # nothing saved: the same command starts anew
            again = _resume_command(data_config, train_config, model_config, overrides, device, flag)
            err.print(f"shardstore: {stop}; {'continue' if flag else 'start again'} with: {again} "
                      f"(exit code {EXIT_PREEMPTED})", markup=False)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except KeyboardInterrupt:  # a second Ctrl-C (or one while SIGINT is not a preempt signal): checkpoints stay whole
        if main_rank:
            checkpoints = Path(cfg.train.run_dir) / "checkpoints"
            kept = (f"{checkpoints} keeps its newest complete checkpoint (writes are atomic): continue with --resume"
                    if (checkpoints / "latest.json").exists() else "no checkpoint was saved")
            err.print(f"shardstore: stopped at once by Ctrl-C; {kept}", markup=False)
        raise typer.Exit(130) from None
    if main_rank:
        out.print(f"run directory: {result.run_dir} ({result.global_step} optimizer steps; metrics.jsonl, "
                  "checkpoints/, config.yaml)", markup=False)


def _resume_command(data_config: str | None, train_config: str | None, model_config: str | None,
                    overrides: list[str] | None, device: str | None, flag: str | None) -> str:
    """The command that continues this run: its options, then ``flag`` (the same line under torchrun)."""
    import shlex

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"the same torchrun command{f' with {flag}' if flag else ''}"
    argv = ["shardstore", "train"]
    for option, value in (("--data-config", data_config), ("--train-config", train_config),
                          ("--model-config", model_config)):
        if value is not None:
            argv += [option, value]
    for item in overrides or []:
        argv += ["--set", item]
    if device is not None:
        argv += ["--device", device]
    return shlex.join([*argv, *([flag] if flag else [])])


@app.command(short_help="Draw a run's loss and accuracy curves into a PNG.")
def plot(
    run_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="A run directory (holding metrics.jsonl).")],
    output: Annotated[Optional[str], typer.Option("--out", help="PNG to write (default RUN_DIR/curves.png).")] = None,
) -> None:
    """Draw a run's loss and accuracy curves into a PNG.

    Needs: a run directory written by `shardstore train` (its metrics.jsonl), and matplotlib
    (the plot extra: pip install 'shardstore[plot]', or pip install matplotlib).
    """
    from shardstore.kd.plot import plot_run

    path = plot_run(Path(run_dir), Path(output) if output else None)
    out.print(f"wrote {path}", markup=False)


def _mean_spread(values: list[float], percent: bool) -> str:
    import statistics

    scale = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}{'%' if percent else ''}"
    spread = statistics.stdev(values) * scale
    return f"{mean:.2f} ± {spread:.2f}{' %' if percent else ''}"


@app.command(short_help="Digits -> cache -> teacher -> distilled students, on a CPU.")
def demo(
    directory: Annotated[str, typer.Argument(metavar="DIRECTORY", help="Where the demo writes its caches and runs.")
                         ] = "shardstore-demo",
    seeds: Annotated[int, typer.Option(help="Student runs per mode (seeds 0..N-1).")] = 3,
    teacher_epochs: Annotated[Optional[int], typer.Option(help="Teacher epochs (default: the tuned value).")] = None,
    student_epochs: Annotated[Optional[int], typer.Option(help="Student epochs (default: the tuned value).")] = None,
) -> None:
    """Digits (shipped in scikit-learn) -> shard cache -> teacher -> a small student on labels alone and distilled.

    Needs: scikit-learn (its digits are the data; no download) and a few CPU minutes; it writes
    only under DIRECTORY.

    Prints the test split's top-1, agreement with the teacher and KL to it (mean ± standard
    deviation over seeds). The settings were chosen on validation shards, never on the test split.
    """
    from rich.table import Table

    from shardstore.demo import run_kd_demo

    if seeds < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--seeds")
    settings = {k: v for k, v in (("teacher_epochs", teacher_epochs), ("student_epochs", student_epochs)) if v}
    result = run_kd_demo(directory, seeds=tuple(range(seeds)), settings=settings,
                         progress=lambda m: out.print(m, markup=False), reporter=RichReporter(False))
    s = result.settings
    table = Table(title=f"test split ({s['image_size']}x{s['image_size']} digits), {seeds} seed(s): mean ± std",
                  title_justify="left")
    for column in ("model", "top-1", "agreement", "KL to teacher"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    table.add_row(f"teacher {s['teacher']}", f"{100 * result.teacher_top1:.2f}%", "—", "—")
    for mode, metrics in result.rows.items():
        table.add_row(f"student, {mode}",
                      _mean_spread(metrics["top1"], True), _mean_spread(metrics["agreement"], True),
                      _mean_spread(metrics["kl"], False))
    out.print(table)
    out.print(f"student {s['student']} (width {s['student_width']}); distilled with alpha {s['alpha']}, "
              f"temperature {s['temperature']}; {s['student_epochs']} student epochs of "
              f"{s['shards_per_epoch']} random shards; {result.seconds:.0f} s; runs in {Path(directory) / 'runs'}",
              markup=False)
