"""``shardstore write``: fill a cache from whole-dataset .npy files, an image folder or a Hugging Face dataset."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from shardstore.cli.app import app, err, out
from shardstore.cli.manifest import build_manifest_cmd
from shardstore.cli.progress import progress_bar
from shardstore.errors import ShardstoreError


def _parse_npy_specs(specs: list[str]) -> dict[str, str]:
    parsed = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ShardstoreError(f"--from-npy {spec!r} is not FIELD=PATH; write e.g. --from-npy images=/data/x.npy")
        parsed[name] = file
    return parsed


@app.command(short_help="Fill a cache from .npy files, an image folder or a HF dataset.")
def write(
    root: Annotated[str, typer.Argument(metavar="ROOT", help="Cache directory to fill (created if needed).")],
    from_npy: Annotated[Optional[list[str]], typer.Option("--from-npy", help="FIELD=PATH of a .npy holding the "
                                                          "whole dataset; repeat per field (rows keep their order).")
                        ] = None,
    from_folder: Annotated[Optional[str], typer.Option("--from-folder",
                                                       help="Image folder with one subfolder per class.")] = None,
    from_hf: Annotated[Optional[str], typer.Option("--from-hf", help="Hugging Face dataset: a save_to_disk folder, "
                                                   "Parquet/Arrow files (a file, glob or folder) or a hub name; needs "
                                                   "the hf extra.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="--from-hf: split of a DatasetDict or hub dataset "
                                                 "(default: train, or the only one).")] = None,
    config: Annotated[Optional[str], typer.Option("--config",
                                                  help="--from-hf: configuration (subset) of a hub dataset.")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="--from-hf: image column (default: the "
                                                        "only Image feature, else image or img).")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="--from-hf: label column (default: the "
                                                        "only ClassLabel, else label or labels).")] = None,
    image_size: Annotated[int, typer.Option("--image-size",
                                            help="Square side the images are resized and center-cropped to.")] = 64,
    shuffle_seed: Annotated[Optional[int], typer.Option("--shuffle-seed", help="Seed of the row order for images "
                                                        "(default 0): shards hold a mix of classes.")] = None,
    no_shuffle: Annotated[bool, typer.Option("--no-shuffle", help="Write images in source order (class by class for "
                                             "a folder).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image decoding processes (default: one per "
                                                   "core, at most 4); the cache is the same with any number.")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard (cache_shard_size).")] = 2048,
    start_shard: Annotated[int, typer.Option("--start-shard", help="First shard id this job writes.")] = 0,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards",
                                                      help="Shards this job writes (default: to the end).")] = None,
    on_error: Annotated[str, typer.Option("--on-error",
                                          help="Unreadable image: 'skip' (count it) or 'stop'.")] = "skip",
    build: Annotated[bool, typer.Option("--build-manifest/--no-build-manifest", help="Build the manifest afterwards "
                                        "(leave it to the last of several parallel jobs).")] = True,
) -> None:
    """Fill a cache from whole-dataset .npy files, an image folder or a Hugging Face dataset.

    Needs: one of --from-npy (a .npy per field, all with the same number of rows), --from-folder (a folder
    with one subfolder of images per class; Pillow) or --from-hf (the hf extra: pip install 'shardstore[hf]').
    ROOT is new or holds shards of the same fields, dtypes and shapes: another --image-size needs a new ROOT.

    Images are decoded, resized and center-cropped to uint8 CHW `images`, with int64 `labels` and `ids` (the
    source row), in a seeded shuffled order by default. Parallel jobs take disjoint shard ranges; a job run
    again keeps its finished shards and continues where it stopped.
    """
    from shardstore.store.ingest import job_range, list_image_folder, open_npy_inputs, write_arrays, write_images

    if sum(map(bool, (from_npy, from_folder, from_hf))) != 1:
        raise ShardstoreError("give either --from-npy FIELD=PATH (repeatable), --from-folder DIR or --from-hf SOURCE "
                              "(exactly one)")
    if on_error not in ("skip", "stop"):
        raise ShardstoreError(f"--on-error must be 'skip' or 'stop', got {on_error!r}")
    if no_shuffle and shuffle_seed is not None:
        raise ShardstoreError(f"--no-shuffle and --shuffle-seed {shuffle_seed} contradict each other; pass one")
    if not from_hf:
        for flag, value in (("--split", split), ("--config", config), ("--image-column", image_column),
                            ("--label-column", label_column)):
            if value is not None:
                raise ShardstoreError(f"{flag} applies to --from-hf only; drop it")
    if from_npy:
        for flag, value in (("--shuffle-seed", shuffle_seed), ("--workers", workers)):
            if value is not None:
                raise ShardstoreError(f"{flag} applies to images (--from-folder, --from-hf); --from-npy writes the "
                                      "arrays' rows in their order without decoding: drop it")
        arrays = open_npy_inputs(_parse_npy_specs(from_npy))
        total = next(iter(arrays.values())).shape[0]
        with progress_bar("writing", total) as advance:
            report = write_arrays(root, arrays, shard_size=shard_size, start_shard=start_shard,
                                  num_shards=num_shards, progress=advance)
    else:
        if from_folder:
            source = list_image_folder(from_folder)
        else:
            from shardstore.store.hf import hf_image_source, import_datasets

            if not err.is_terminal:  # datasets' own progress bars would fill a log (or a one-line error) with \r
                import_datasets().disable_progress_bars()
            source = hf_image_source(from_hf, image_column=image_column, label_column=label_column, split=split,
                                     config=config)
        start, stop = job_range(source.num_rows, shard_size, start_shard, num_shards)
        with progress_bar("images", stop - start, rate="images") as advance:
            report = write_images(root, source, image_size=image_size, shard_size=shard_size,
                                  start_shard=start_shard, num_shards=num_shards, on_error=on_error,
                                  workers=workers, shuffle_seed=None if no_shuffle else (shuffle_seed or 0),
                                  progress=advance)
    out.print(
        f"wrote {len(report.shards_written)} shard(s), {report.samples_written:,} samples"
        f" ({report.samples_already_written:,} already on disk, {len(report.bad_inputs):,} unreadable inputs skipped)",
        markup=False,
    )
    if build:
        build_manifest_cmd(root)
