"""Getting models in and out: an input adapter with its own resize and normalisation, freezing, and loading
state-dict checkpoints and TorchScript files."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardstore.errors import ConfigError

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# Keys under which training scripts commonly nest the state dict, in the order they are tried.
WRAPPER_KEYS = ("student", "model", "state_dict", "ema")
# Prefixes added by DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Prefix of a model saved inside a wrapper (InputAdapter, TimmModel), as the trainer saves its student.
WRAPPER_PREFIX = "model."
MAX_LISTED = 5


class InputAdapter(nn.Module):
    """Runs a model behind its own input pipeline: a float batch in [0, 1] of any spatial size is resized to
    `size` x `size` (bilinear, antialiased; only when the size differs) and normalised with `mean` and `std`.

    `mean`/`std` are non-persistent buffers: they follow `.to(device)` but stay out of the state dict, so
    `adapter.model` loads and saves exactly like the bare model."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, *, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"InputAdapter: size {size} must be at least 1; set the model's input size")
        if len(mean) == 0 or len(mean) != len(std):
            raise ConfigError(
                f"InputAdapter: mean has {len(mean)} values and std {len(std)}; give one of each per channel"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"InputAdapter: std {list(std)} has a value <= 0; every std must be positive")
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def num_features(self) -> int:
        """The wrapped model's embedding size."""
        return self.model.num_features

    def preprocess(self, x: Tensor) -> Tensor:
        """Resize (if needed) and normalise a float batch in [0, 1], [B, C, H, W]."""
        if not x.is_floating_point():
            raise TypeError(
                f"InputAdapter expects a float batch in [0, 1], got {x.dtype}; convert it with x.float() / 255"
            )
        channels = self.mean.shape[1]
        if x.ndim != 4 or x.shape[1] != channels:
            raise ConfigError(
                f"InputAdapter: got a batch of shape {list(x.shape)}, expected [B, {channels}, H, W]; "
                "give mean and std one value per input channel"
            )
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """The wrapped model's pooled embedding of the preprocessed batch."""
        return self.model.forward_features(self.preprocess(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """The wrapped model's head (no preprocessing: features are already embeddings)."""
        return self.model.forward_head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the wrapped model for a float batch in [0, 1]."""
        return self.model(self.preprocess(x))


def freeze(module: ModuleT) -> ModuleT:
    """Put `module` in eval mode and turn off gradients for all its parameters; returns it.

    A later `.train()` call would switch batch norm and dropout back to training behaviour: callers keep a
    frozen teacher in eval mode (do not call `.train()` on it, nor on a parent module that holds it)."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _check_file(path: str | os.PathLike[str], what: str) -> Path:
    """The path as a Path, or a ConfigError when no file is there."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such file; check the {what} path in the model config")
    return file


def _pick_state_dict(loaded: Any, file: Path, key: str | None) -> Mapping[str, Any]:
    """The state dict inside what `torch.load` returned: `loaded[key]`, the first wrapper key present, or
    `loaded` itself."""
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{file}: holds a {type(loaded).__name__}, not a state dict; save model.state_dict()")
    if key is not None:
        if key not in loaded:
            keys = ", ".join(map(str, list(loaded)[:MAX_LISTED]))
            raise ConfigError(f"{file}: has no key '{key}' (top-level keys: {keys}); set the checkpoint key")
        loaded = loaded[key]
    else:
        for wrapper in WRAPPER_KEYS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{file}: entry '{key}' is a {type(loaded).__name__}, not a state dict; pick another key")
    return loaded


def _strip_prefixes(state: Mapping[str, Any], expected: set[str]) -> dict[str, Any]:
    """Remove a prefix that every key carries and the model's keys do not: DDP's `module.`, torch.compile's
    `_orig_mod.`, or the `model.` of a wrapper (InputAdapter, TimmModel); repeated until the keys match."""
    out = dict(state)
    while out and set(out) != expected:
        for prefix in (*WRAPPER_PREFIXES, WRAPPER_PREFIX):
            if _all_start(out, prefix) and not _all_start(expected, prefix):
                out = {k[len(prefix):]: v for k, v in out.items()}
                break
        else:
            break
    return out


def _all_start(keys: Iterable[Any], prefix: str) -> bool:
    """Whether there are keys and every one is a string starting with `prefix`."""
    keys = list(keys)
    return bool(keys) and all(isinstance(k, str) and k.startswith(prefix) for k in keys)


def _listed(keys: Sequence[str]) -> str:
    """At most MAX_LISTED keys, comma-separated, with a count of the rest."""
    more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _mismatch(model: nn.Module, state: Mapping[str, Any]) -> str:
    """What keeps `state` from loading strictly into `model`; empty when nothing does."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    resized = [
        f"{k} (file {list(v.shape)}, model {list(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listed(unexpected)}")
    if resized:
        parts.append(f"shape mismatch {_listed(resized)}")
    return "; ".join(parts)


def _is_torchscript(file: Path) -> bool:
    """Whether `file` is a TorchScript archive (a zip holding `constants.pkl`) rather than a state dict."""
    try:
        if not zipfile.is_zipfile(file):
            return False
        with zipfile.ZipFile(file) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):  # a damaged archive: torch.load names the problem
        return False


NPY_MAGIC = b"\x93NUMPY"
# torch's weights-only unpickler names the class it refused: "Unsupported global: GLOBAL module.Name ..."
_GLOBAL_RE = re.compile(r"unsupported global:?\s*(?:GLOBAL\s+)?([A-Za-z_][\w.]*)", re.IGNORECASE)


def read_torch_file(file: Path, *, fix: str, pickled_fix: str | None = None) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU; every failure is one ``ConfigError`` line ending in ``fix``.

    Nothing in the file runs: a payload of pickled Python objects (a whole model, a class
    instance) is refused for safety, and said to be, rather than reported as corrupt.
    """
    try:
        with open(file, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or type(exc).__name__}); {fix}") from None
    if not head:
        raise ConfigError(f"{file}: is empty (0 bytes), not a torch.save file; {fix}")
    if head == NPY_MAGIC:
        raise ConfigError(f"{file}: is a NumPy .npy file, not a torch.save file; {fix}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.search(str(exc))
        if found:
            raise ConfigError(
                f"{file}: holds pickled Python objects ({found.group(1)}), refused for safety: loading them would "
                f"run code, and only tensors and state dicts are loaded; {pickled_fix or fix}"
            ) from None
        raise ConfigError(f"{file}: is not a readable torch.save file (truncated, corrupt or another format); "
                          f"{fix}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a foreign file fails anywhere in torch.load's parsers
        raise ConfigError(f"{file}: is not a readable torch.save file ({type(exc).__name__}: truncated, corrupt or "
                          f"another format); {fix}") from None


def _read_state_file(file: Path) -> Any:
    """The object a state-dict checkpoint holds; a TorchScript file or a foreign one is a one-line ConfigError."""
    if _is_torchscript(file):
        raise ConfigError(
            f"{file}: is a TorchScript file, not a state dict; set checkpoint_format: torchscript to load it "
            "(TorchScript is code: only for files you trust)"
        )
    return read_torch_file(file, fix="point the checkpoint at a file saved with torch.save(model.state_dict(), path)",
                           pickled_fix="save model.state_dict() instead")


def load_checkpoint_into(model: ModuleT, path: str | os.PathLike[str], *, key: str | None = None) -> ModuleT:
    """Load a `torch.save`d state dict into `model` strictly and return the model.

    The file is read with `weights_only=True` (no code runs). A dict nesting the weights under `key`, or else
    the first of "student", "model", "state_dict", "ema", is unwrapped; `module.` / `_orig_mod.` prefixes
    (DDP, torch.compile) are removed, and so is the `model.` of an InputAdapter or TimmModel when the bare
    model is loaded (a trained student, saved with its adapter, becomes a teacher)."""
    file = _check_file(path, "checkpoint")
    loaded = _read_state_file(file)
    state = _strip_prefixes(_pick_state_dict(loaded, file, key), set(model.state_dict()))
    problem = _mismatch(model, state)
    if problem:
        raise ConfigError(
            f"{file}: does not fit {type(model).__name__}: {problem}; check that the model name, its arguments "
            "and num_classes match the checkpoint"
        )
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{file}: does not fit {type(model).__name__} ({reason}); check the checkpoint") from None
    return model


class ScriptedModel(nn.Module):
    """A TorchScript module behind the model contract: `forward` gives logits; `forward_features`,
    `forward_head` and `num_features` work only when the scripted module has them."""

    def __init__(self, scripted: nn.Module, source: str) -> None:
        super().__init__()
        self.model = scripted
        self.source = source

    def _has(self, name: str) -> bool:
        """Whether the scripted module exposes `name`."""
        return hasattr(self.model, name)

    @property
    def num_features(self) -> int:
        """The embedding size recorded in the scripted module."""
        if not self._has("num_features"):
            raise ConfigError(
                "a TorchScript teacher gives logits only; feature distillation needs a state-dict teacher"
            )
        return int(getattr(self.model, "num_features"))

    def forward_features(self, x: Tensor) -> Tensor:
        """The scripted module's own `forward_features`, if it has one."""
        if not self._has("forward_features"):
            raise ConfigError(
                "a TorchScript teacher gives logits only; feature distillation needs a state-dict teacher"
            )
        return self.model.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        """The scripted module's own `forward_head`, if it has one."""
        if not self._has("forward_head"):
            raise ConfigError(
                "a TorchScript teacher gives logits only; feature distillation needs a state-dict teacher"
            )
        return self.model.forward_head(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes]."""
        out = self.model(x)
        if not isinstance(out, Tensor):
            raise ConfigError(
                f"{self.source}: the TorchScript module returns {type(out).__name__}, not a logits tensor; "
                "script a module whose forward returns logits"
            )
        return out


def load_torchscript(path: str | os.PathLike[str]) -> nn.Module:
    """Load a TorchScript model onto the CPU and wrap it so `forward(x)` gives logits.

    A TorchScript file is code: loading it runs what its author wrote. It is only loaded when the model config
    asks for it by `checkpoint_format: torchscript`; state dicts are the safe default."""
    file = _check_file(path, "TorchScript")
    try:
        scripted = torch.jit.load(str(file), map_location="cpu")
    except (RuntimeError, OSError, ValueError) as exc:  # not a TorchScript archive, truncated, newer torch, ...
        raise ConfigError(
            f"{file}: cannot be loaded as TorchScript ({type(exc).__name__}: not a TorchScript archive, truncated, "
            "or from a newer torch); save it with torch.jit.save, or drop checkpoint_format: torchscript"
        ) from None
    return ScriptedModel(scripted, str(file))
