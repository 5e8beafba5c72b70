"""The torch floor in pyproject.toml is the newest torch feature the code relies on, and the installed torch has it.

``USED`` lists the torch features shardstore needs with the release that brought each. The floor is the
newest of them: using a newer feature means adding it here, which fails until the floor is raised in
pyproject.toml and in the README's install note as well.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shardstore.kd.models.io import _GLOBAL_RE
from shardstore.loader.slots import torch_dtype

ROOT = Path(__file__).resolve().parent.parent

#: the oldest torch shardstore supports: ``torch>=TORCH_FLOOR`` in pyproject.toml
TORCH_FLOOR = "2.4"

#: torch feature -> the release that brought it; the floor is the newest of these
USED = {
    # the weights-only unpickler names the class it refuses ("Unsupported global: GLOBAL module.Name"), which
    # makes a pickled checkpoint a one-line refusal naming that class (kd/models/io.py), not "corrupt"
    "torch.serialization.add_safe_globals": "2.4",
    # uint16 images, and bfloat16 images saved by ml_dtypes (read as uint16 bits), cross into torch as uint16
    "torch.uint16": "2.3",
    "torch.optim.swa_utils.get_ema_multi_avg_fn": "2.1",  # the EMA (kd/ema.py)
    "torch.nn.functional.scaled_dot_product_attention": "2.0",  # the ViT students (kd/models/vit.py)
    "torch.compile": "2.0",  # train.compile
}


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


def _lookup(dotted: str) -> object:
    obj: object = torch
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


class Payload:
    """A plain class: pickling an instance is what a whole saved model amounts to for the loader."""


def test_the_floor_is_the_newest_feature_used() -> None:
    assert max(USED.values(), key=_version) == TORCH_FLOOR


def test_pyproject_and_readme_state_the_floor() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"torch\s*>=\s*([0-9.]+)"', pyproject) == [TORCH_FLOOR]
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"any torch ≥ ([0-9.]+) works", readme) == [TORCH_FLOOR]


def test_the_installed_torch_is_at_or_above_the_floor() -> None:
    assert _version(torch.__version__) >= _version(TORCH_FLOOR), torch.__version__


@pytest.mark.parametrize("name", sorted(USED))
def test_every_feature_used_exists(name: str) -> None:
    assert _lookup(name) is not None


def test_uint16_fields_cross_into_torch() -> None:
    bits = np.array([[0, 1, 65535], [16256, 16384, 49024]], np.uint16)  # the last row: bfloat16 1.0, 2.0, -1.0
    assert torch_dtype("images", bits.dtype) == torch.uint16
    x = torch.from_numpy(bits)
    assert x[0].float().tolist() == [0.0, 1.0, 65535.0]
    assert x[1].view(torch.bfloat16).float().tolist() == [1.0, 2.0, -1.0]


def test_a_weights_only_load_names_the_class_it_refuses(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(path, map_location="cpu", weights_only=True)
    found = _GLOBAL_RE.search(str(refused.value))
    assert found is not None, str(refused.value)
    assert found.group(1).endswith(".Payload")
