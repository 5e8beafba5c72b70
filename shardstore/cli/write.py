"""``shardstore write``: fill a cache from whole-dataset .npy files or an image folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from shardstore.cli import _progress, app, build_manifest_cmd, out
from shardstore.errors import ShardstoreError


def _parse_npy_specs(specs: list[str]) -> dict[str, str]:
    parsed = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ShardstoreError(f"--from-npy {spec!r} is not FIELD=PATH; write e.g. --from-npy images=/data/x.npy")
        parsed[name] = file
    return parsed


@app.command()
def write(
    root: Annotated[str, typer.Argument(help="Cache directory to fill (created if needed).")],
    from_npy: Annotated[Optional[list[str]], typer.Option("--from-npy", help="FIELD=PATH of a .npy holding the whole dataset; repeat per field.")] = None,
    from_folder: Annotated[Optional[str], typer.Option("--from-folder", help="Image folder with one subfolder per class.")] = None,
    image_size: Annotated[int, typer.Option("--image-size", help="Square side the images are resized and center-cropped to.")] = 64,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard (cache_shard_size).")] = 2048,
    start_shard: Annotated[int, typer.Option("--start-shard", help="First shard id this job writes.")] = 0,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", help="Shards this job writes (default: to the end).")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="Unreadable image: 'skip' (count it) or 'stop'.")] = "skip",
    build: Annotated[bool, typer.Option("--build-manifest/--no-build-manifest", help="Build the manifest afterwards (leave it to the last of several parallel jobs).")] = True,
) -> None:
    """Fill a cache from whole-dataset .npy files or an image folder; parallel jobs take disjoint shard ranges."""
    from shardstore.store.ingest import list_image_folder, open_npy_inputs, write_arrays, write_image_folder

    if bool(from_npy) == bool(from_folder):
        raise ShardstoreError("give either --from-npy FIELD=PATH (repeatable) or --from-folder DIR, not both or neither")
    if on_error not in ("skip", "stop"):
        raise ShardstoreError(f"--on-error must be 'skip' or 'stop', got {on_error!r}")
    if from_npy:
        arrays = open_npy_inputs(_parse_npy_specs(from_npy))
        total = next(iter(arrays.values())).shape[0]
        with _progress("writing", total) as advance:
            report = write_arrays(root, arrays, shard_size=shard_size, start_shard=start_shard,
                                  num_shards=num_shards, progress=advance)
    else:
        listing = list_image_folder(from_folder)
        with _progress("images", len(listing.paths)) as advance:
            report = write_image_folder(root, listing, image_size=image_size, shard_size=shard_size,
                                        start_shard=start_shard, num_shards=num_shards, on_error=on_error,
                                        progress=advance)
    out.print(
        f"wrote {len(report.shards_written)} shard(s), {report.samples_written:,} samples"
        f" ({report.samples_already_written:,} already on disk, {len(report.bad_inputs):,} unreadable inputs skipped)",
        markup=False,
    )
    if build:
        build_manifest_cmd(root)
