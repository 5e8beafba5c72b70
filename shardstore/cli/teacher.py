"""``shardstore cache-teacher``: teacher targets for K replayable views per sample, added to the cache's shards."""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from shardstore.cli.app import app, err, out
from shardstore.cli.progress import format_bytes, progress_bar
from shardstore.cli.train import DataConfigOption, ModelConfigOption, SetOption, TrainConfigOption, load_configs
from shardstore.config.resolve import RunConfig


@app.command("cache-teacher", short_help="Store the teacher's outputs on K views of every sample.")
def cache_teacher(
    data_config: DataConfigOption = None,
    train_config: TrainConfigOption = None,
    model_config: ModelConfigOption = None,
    overrides: SetOption = None,
    name: Annotated[str, typer.Option(help="Name of the targets (their fields are NAME_views, NAME_topk_index, "
                                      "...).")] = "teacher",
    views: Annotated[int, typer.Option("--views", help="Augmented views per sample (K).")] = 4,
    topk: Annotated[int, typer.Option("--topk", help="Classes kept per view (sparse logits).")] = 10,
    dense: Annotated[bool, typer.Option("--dense", help="Store all logits in float16 instead of the top-k.")] = False,
    logits: Annotated[bool, typer.Option("--logits/--no-logits", help="Store logits at all.")] = True,
    embeddings: Annotated[bool, typer.Option("--embeddings",
                                             help="Also store the teacher's pooled embedding.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the targets stored under NAME first and "
                                            "fill every shard again (new teacher or settings).")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the views (default: train.seed).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Views per teacher batch.")] = 256,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if any).")] = None,
    check: Annotated[int, typer.Option("--check", help="Only check: recompute N random stored targets with the "
                                       "live teacher on the replayed views (exit 1 if they disagree).")] = 0,
    max_kl: Annotated[float, typer.Option("--max-kl", help="--check: largest KL(live || stored) allowed.")] = 1e-2,
    min_top1: Annotated[float, typer.Option("--min-top1", help="--check: least top-1 match rate.")] = 0.99,
    min_cosine: Annotated[float, typer.Option("--min-cosine", help="--check: least embedding cosine.")] = 0.99,
) -> None:
    """Run the teacher on K seeded views of every sample and store its outputs next to the images.

    Needs: a cache with a manifest (data_config's cache_root) and the teacher's weights in model_config's
    teacher.checkpoint; the same three configs as `shardstore train`.

    Only shards without the targets are filled, each whole or not at all: run it again after
    a crash, or when new shards arrive. Under torchrun each GPU fills its share of the shards. Train from the targets
    with `--set data.teacher_targets=NAME` (no teacher is loaded then).
    """
    from shardstore.store.groups import check_group_name

    check_group_name(name)  # the name becomes file names in the cache: one line and exit 2 before any work
    cfg = load_configs(data_config, train_config, model_config, overrides)
    if check:
        if check < 0:
            raise typer.BadParameter("must be positive", param_hint="--check")
        _check(cfg, name, samples=check, device=device, batch_size=batch_size, max_kl=max_kl, min_top1=min_top1,
               min_cosine=min_cosine)
        return
    _fill(cfg, name, views=views, topk=topk, dense=dense, logits=logits, embeddings=embeddings, seed=seed,
          batch_size=batch_size, device=device, overwrite=overwrite)


def _check(cfg: RunConfig, name: str, **settings: Any) -> None:
    """``--check N``: recompute stored targets, print the figures; exit 1 with each failure when they disagree."""
    from shardstore.kd.teacher_check import check_teacher_cache

    report = check_teacher_cache(cfg, name=name, **settings)
    table = Table("check", "value", title=f"{report.checked} stored views of {name!r} recomputed",
                  title_justify="left")
    table.add_row("views equal to the seeded redraw", f"{report.checked - report.views_not_redrawn:,} "
                  f"of {report.checked:,}")
    if report.top1_match is not None:
        table.add_row("top-1 match", f"{100 * report.top1_match:.2f}%")
        table.add_row("KL(live || stored), worst / mean", f"{report.worst_kl:.3g} / {report.mean_kl:.3g} nats")
    if report.worst_cosine is not None:
        table.add_row("embedding cosine, worst", f"{report.worst_cosine:.5f}")
    out.print(table)
    if report.teacher_differs:
        out.print(f"note: {report.teacher_differs}", markup=False)
    if not report.passed:
        for failure in report.failures:
            err.print(f"FAILED: {failure}", markup=False)
        err.print(f"the cached targets {name!r} do not match the live teacher; do not train from them "
                  "(run cache-teacher again with --overwrite)", markup=False)
        raise typer.Exit(1)
    out.print("check passed", markup=False)


def _fill(cfg: RunConfig, name: str, **settings: Any) -> None:
    """Fill the shards that lack the targets, with a progress bar; the main rank prints what was stored."""
    from shardstore.kd.teacher_cache import fill_teacher_cache

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank fills its share of the shards
    with progress_bar("teacher", None, rate="images", hidden=not main_rank) as advance:
        report = fill_teacher_cache(cfg, name=name, progress=advance, on_plan=advance.set_total, **settings)
    if not main_rank:
        return
    spec = report.spec
    out.print(f"filled {len(report.shards_filled):,} shard(s) ({report.images:,} images x {spec.views} views, "
              f"{report.images_per_s:,.0f} images/s); {report.shards_present:,} already had them", markup=False)
    out.print(f"targets {name!r}: {format_bytes(spec.bytes_per_sample())} per sample ({spec.views} views, "
              + (f"top-{spec.topk} of {spec.num_classes} classes" if spec.logits == "topk" else
                 f"{spec.logits} logits") + (f", embedding {spec.embedding_dim}" if spec.embedding_dim else "")
              + f"); train with --set data.teacher_targets={name}", markup=False)
