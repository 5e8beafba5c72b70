"""A Hugging Face dataset as an image source: a ``save_to_disk`` folder, Parquet or Arrow files, or a hub name.

``datasets`` is an optional extra (``pip install "shardstore[hf]"``), imported only here and only when asked.
The dataset is read memory-mapped through Arrow: the image column stays encoded (``Image(decode=False)``) and
its bytes go to the decoding processes, which resize and crop exactly as for an image folder. Parquet files
and hub datasets are first converted by ``datasets`` into its own cache (``HF_DATASETS_CACHE``, by default
``~/.cache/huggingface/datasets``), as ``load_dataset`` always does: the shuffled order needs random access.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.decode import ImageInput

log = logging.getLogger(__name__)

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")
FILE_SUFFIXES = (".parquet", ".arrow")


def import_datasets() -> ModuleType:
    """The ``datasets`` module, or one line naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise ShardstoreError(
            "--from-hf needs the optional `datasets` package, which is not installed; install the extra with "
            "pip install \"shardstore[hf]\" (or pip install datasets)"
        ) from None
    return datasets


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}" if str(exc) else type(exc).__name__


def _files(source: str) -> list[Path] | None:
    """The Parquet or Arrow files ``source`` names (a file, a glob, a folder of them); None for other sources."""
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True)) if Path(p).is_file()]
        if not files:
            raise ShardstoreError(f"{source}: no files match; pass a saved dataset folder, Parquet/Arrow files or a "
                                  "hub name")
    else:
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                return None  # a save_to_disk folder
            files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
            if not files:
                raise ShardstoreError(f"{path} holds neither a saved dataset (state.json or dataset_dict.json, "
                                      "written by save_to_disk) nor .parquet/.arrow files; pass one of those")
        elif path.is_absolute() or source.startswith((".", "~")) or path.suffix in FILE_SUFFIXES:
            raise ShardstoreError(f"{source} does not exist; pass a saved dataset folder, Parquet/Arrow files or a "
                                  "hub name")
        else:
            return None  # a hub name
    kinds = {p.suffix for p in files}
    if not kinds <= set(FILE_SUFFIXES) or len(kinds) != 1:
        raise ShardstoreError(f"{source}: expected only .parquet or only .arrow files, found "
                              f"{', '.join(sorted(kinds))}; pass the files of one format")
    return files


def _refuse_empty(source: str, files: list[Path] | None) -> None:
    """One line for a source without rows, which ``datasets`` fails to load with an unrelated error.

    Zero-row Parquet files make its Parquet builder fail ("BatchSize must be greater than 0", logged twice on
    stderr), and a dataset saved with no rows leaves no Arrow file for ``load_from_disk`` (an ``IndexError``).
    """
    if files is not None and files[0].suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        try:
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        except Exception:  # noqa: BLE001 - not Parquet: datasets names the problem when it reads the file
            return
        if rows == 0:
            raise ShardstoreError(f"{source} holds no rows ({len(files)} Parquet file(s) of 0 rows); there are no "
                                  "images to write")
        return
    state = Path(source).expanduser() / "state.json"
    if files is None and state.is_file():
        try:
            empty = json.loads(state.read_bytes()).get("_data_files") == []
        except (OSError, ValueError, AttributeError):
            return
        if empty:
            raise ShardstoreError(f"{source} is a saved dataset with no rows ({state} lists no data files); there "
                                  "are no images to write")


def _pick_split(loaded: Any, source: str, split: str | None) -> Any:
    """One split of a ``DatasetDict``: the one asked for, else ``train``, else the only one."""
    names = list(loaded)
    if split is None:
        if "train" in loaded:
            return loaded["train"]
        if len(names) == 1:
            return loaded[names[0]]
        raise ShardstoreError(f"{source} has splits {', '.join(names)}; choose one with --split")
    if split not in loaded:
        raise ShardstoreError(f"{source} has no split {split!r}; its splits are {', '.join(names)}")
    return loaded[split]


def open_hf_dataset(source: str, *, split: str | None = None, config: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Open ``source`` as one ``datasets.Dataset``: a saved folder, Parquet/Arrow files or a hub name."""
    datasets = import_datasets()
    files = _files(source)
    local = files is not None or Path(source).expanduser().is_dir()
    if local and config is not None:
        raise ShardstoreError(f"--config {config!r} chooses a configuration of a hub dataset; {source} is local, "
                              "drop --config")
    _refuse_empty(source, files)
    try:
        if files is not None and files[0].suffix == ".arrow":
            loaded = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in files])
        elif files is not None:
            loaded = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train",
                                           cache_dir=None if cache_dir is None else str(cache_dir))
        elif local:
            loaded = datasets.load_from_disk(str(Path(source).expanduser()))
        else:
            loaded = datasets.load_dataset(source, config, split=split,
                                           cache_dir=None if cache_dir is None else str(cache_dir))
    except ShardstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets and the hub raise many kinds; each becomes one line
        where = "the Hugging Face hub" if not local else "disk"
        fix = ("check the name, --config and --split, and that the hub is reachable (or save the dataset with "
               "save_to_disk where it is, and pass that folder)") if not local else "check the files"
        raise ShardstoreError(f"cannot load {source} from {where} ({_one_line(exc)}); {fix}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, source, split)
    if split is not None and local:
        raise ShardstoreError(f"{source} holds one dataset, not splits; drop --split {split}")
    if not isinstance(loaded, datasets.Dataset):
        raise ShardstoreError(f"{source} loads as a {type(loaded).__name__}; --from-hf needs a map-style Dataset")
    return loaded


def _describe_feature(feature: Any) -> str:
    kind = type(feature).__name__
    if kind == "ClassLabel":
        return f"ClassLabel({feature.num_classes} classes)"
    if kind == "Value":
        return str(feature.dtype)
    return kind


def _columns(features: Any) -> str:
    return ", ".join(f"{name} ({_describe_feature(f)})" for name, f in features.items())


def _choose(features: Any, source: str, asked: str | None, kind: str, of_type: str, names: tuple[str, ...]) -> str:
    """The column ``asked`` for, else the only one of type ``of_type``, else the first of ``names`` present."""
    flag = f"--{kind}-column"
    if asked is not None:
        if asked not in features:
            raise ShardstoreError(f"{flag} {asked!r} is not a column of {source}; its columns are "
                                  f"{_columns(features)}")
        return asked
    typed = [name for name, f in features.items() if type(f).__name__ == of_type]
    if len(typed) == 1:
        return typed[0]
    named = [name for name in names if name in features]
    if named:
        return named[0]
    if typed:
        raise ShardstoreError(f"{source} has {len(typed)} {of_type} columns ({', '.join(typed)}); choose one with "
                              f"{flag} NAME")
    raise ShardstoreError(f"{source} has no {kind} column ({of_type} feature, or named {' or '.join(names)}); "
                          f"its columns are {_columns(features)}; pass {flag} NAME")


def _image_kind(feature: Any, column: str, source: str) -> str:
    """How the column holds images: ``image`` (an Image feature or its bytes/path struct), ``bytes`` or ``path``."""
    kind = type(feature).__name__
    if kind == "Image":
        return "image"
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return "image"  # Image cells in a Parquet file written without the dataset's features
    if kind == "Value" and feature.dtype in ("binary", "large_binary"):
        return "bytes"
    if kind == "Value" and feature.dtype in ("string", "large_string"):
        return "path"
    raise ShardstoreError(f"column {column!r} of {source} holds {_describe_feature(feature)}, not images; pass "
                          "--image-column with a column of Image feature, encoded image bytes or image file paths")


def _labels(dataset: Any, column: str, source: str) -> tuple[np.ndarray, list[str] | None, str]:
    """Integer labels of every row, the class names (None for plain integers) and where the names come from."""
    feature = dataset.features[column]
    values = dataset.with_format("arrow")[column]
    if values.null_count:
        raise ShardstoreError(f"column {column!r} of {source} has {values.null_count:,} rows without a label; "
                              "filter them out first, or pass --label-column with another column")
    kind = type(feature).__name__
    if kind == "ClassLabel":
        return np.asarray(values.to_numpy(), dtype=np.int64), list(feature.names), f"{source}'s ClassLabel names"
    if kind == "Value" and feature.dtype.startswith(("int", "uint")):
        raw = values.to_numpy()
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            raise ShardstoreError(f"column {column!r} of {source} holds label {int(raw.max()):,}, beyond int64 (labels "
                                  "are written as int64); map the labels to class indices first, or pass "
                                  "--label-column with another column")
        return np.asarray(raw, dtype=np.int64), None, ""
    if kind == "Value" and feature.dtype in ("string", "large_string"):
        names = values.to_pylist()
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        return np.asarray([index[n] for n in names], dtype=np.int64), classes, f"{source}'s label strings (sorted)"
    raise ShardstoreError(f"column {column!r} of {source} holds {_describe_feature(feature)}; labels must be a "
                          "ClassLabel, integers or strings: pass --label-column with such a column")


@dataclass(frozen=True)
class HFImageSource:
    """The rows of a Hugging Face dataset as an image source (see ``shardstore.store.ingest.ImageSource``)."""

    name: str
    images: Any  # the dataset reduced to its image column, undecoded
    image_column: str
    image_kind: str
    label_column: str
    labels: np.ndarray
    classes: list[str] | None
    classes_origin: str

    @property
    def num_rows(self) -> int:
        """Rows of the dataset."""
        return int(self.labels.shape[0])

    def inputs(self, rows: np.ndarray) -> list[ImageInput]:
        """The rows' encoded images (or file paths), read from the memory-mapped table."""
        cells = self.images[[int(r) for r in rows]][self.image_column]
        if self.image_kind != "image":
            return [b"" if cell is None else cell for cell in cells]
        return [b"" if cell is None else cell["bytes"] or cell["path"] or b"" for cell in cells]

    def describe(self, row: int) -> str:
        """``SOURCE row N (column C)``."""
        return f"{self.name} row {row} (column {self.image_column!r})"


def hf_image_source(dataset: Any, *, image_column: str | None = None, label_column: str | None = None,
                    split: str | None = None, config: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> HFImageSource:
    """An image source from a ``datasets.Dataset`` or from what ``open_hf_dataset`` opens (a path or hub name).

    Without column names the image column is the only ``Image`` feature (else ``image``/``img``) and the
    label column the only ``ClassLabel`` (else ``label``/``labels``).
    """
    datasets = import_datasets()
    name = str(dataset) if isinstance(dataset, (str, os.PathLike)) else "the dataset"
    if isinstance(dataset, (str, os.PathLike)):
        dataset = open_hf_dataset(str(dataset), split=split, config=config, cache_dir=cache_dir)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = _pick_split(dataset, name, split)
    if not isinstance(dataset, datasets.Dataset):
        raise ShardstoreError(f"{name} has type {type(dataset).__name__}; an image source needs a map-style Dataset "
                              "(rows are read in a shuffled order)")
    dataset = dataset.with_format(None)
    if len(dataset) == 0:
        raise ShardstoreError(f"{name} has no rows; there are no images to write (check --split, or the files)")
    features = dataset.features
    image_column = _choose(features, name, image_column, "image", "Image", IMAGE_NAMES)
    label_column = _choose(features, name, label_column, "label", "ClassLabel", LABEL_NAMES)
    if image_column == label_column:
        raise ShardstoreError(f"column {image_column!r} of {name} cannot be both the images and the labels; pass "
                              "--image-column and --label-column")
    kind = _image_kind(features[image_column], image_column, name)
    labels, classes, origin = _labels(dataset, label_column, name)
    if labels.size and labels.min() < 0:
        log.warning("%s: %d rows have a negative label in column %r (-1 is ClassLabel's 'no label'); they are "
                    "written as they are", name, int((labels < 0).sum()), label_column)
    images = dataset.select_columns([image_column])
    if type(features[image_column]).__name__ == "Image":
        images = images.cast_column(image_column, datasets.Image(decode=False))
    log.info("%s: %d rows, images from column %r, labels from %r", name, len(labels), image_column, label_column)
    return HFImageSource(name, images, image_column, kind, label_column, labels, classes, origin)
