"""Reading files that come from strangers: size-capped JSON objects, safetensors (or `weights_only` pickle)
weights files checked before any tensor is read, and adapter directories in the local HuggingFace hub cache.

Nothing here is unpickled, evaluated or trusted: every problem is a `LoraError` that names the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoraError
from .files import as_path

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
_MAX_CONFIG_BYTES = 16 << 20


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most 16 MiB, without NaN/Infinity; any problem is a `LoraError`."""
    if not path.is_file():  # also refuses FIFOs and devices, which could block or never end
        raise LoraError(f"{path} is missing or not a regular file")
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise LoraError(f"cannot read {path}: {error.strerror or error}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise LoraError(f"{path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; not an adapter config")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise LoraError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise LoraError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in an adapter config")


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding `adapter_config.json` for a local path or a hub id in the local cache."""
    candidate = as_path(path, "path")
    if not candidate.exists() and isinstance(path, str) and path.count("/") == 1 and not path.startswith("."):
        candidate = _hub_cache() / f"models--{path.replace('/', '--')}"
    if (candidate / CONFIG_NAME).is_file():
        return candidate
    snapshots = candidate / "snapshots"
    if snapshots.is_dir():
        ref = candidate / "refs" / "main"
        if ref.is_file():
            snapshot = snapshots / ref.read_text().strip()
            if (snapshot / CONFIG_NAME).is_file():
                return snapshot
        found = [d for d in sorted(snapshots.iterdir()) if (d / CONFIG_NAME).is_file()]
        if len(found) == 1:
            return found[0]
        if found:
            raise LoraError(f"{candidate} has several snapshots and no refs/main: {[d.name for d in found]}")
    raise LoraError(f"no {CONFIG_NAME} in {candidate} (an adapter directory or a local hub-cache entry)")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


class TensorFile:
    """Read-only view of an adapter weights file: keys, shapes and dtypes first, tensors on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._tensors: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> TensorFile:
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                self._handle.__enter__()
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}  # noqa: SIM118
                self.dtypes = {k: self._handle.get_slice(k).get_dtype() for k in self.shapes}
                _reject_duplicate_names(self.path)
            except Exception as error:
                raise LoraError(f"{self.path} is not a valid safetensors file: {error}") from None
        else:
            try:
                loaded = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise LoraError(
                    f"{self.path} could not be read as plain tensors (torch.load with weights_only=True; "
                    f"lorakit never unpickles arbitrary objects): {error}"
                ) from None
            if not isinstance(loaded, Mapping) or not all(
                isinstance(k, str)
                and isinstance(v, torch.Tensor)
                and v.layout == torch.strided
                and not v.is_nested
                and v.device.type == "cpu"  # not meta (no data), sparse or nested: they cannot be copied in
                for k, v in loaded.items()
            ):
                raise LoraError(f"{self.path} must hold a dict of name → dense CPU tensor")
            self._tensors = dict(loaded)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._tensors.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as error:
            raise LoraError(f"{self.path}: cannot read tensor {key!r}: {error}") from None


def _reject_duplicate_names(path: Path) -> None:
    """Raise if a JSON object in the (already validated) safetensors header repeats a name: safetensors keeps
    the last entry, another reader may keep the first, and a file whose tensors depend on the reader is refused."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"the header repeats the name {next(n for n in names if names.count(n) > 1)!r}")
        return dict(pairs)

    with open(path, "rb") as file:
        json.loads(file.read(int.from_bytes(file.read(8), "little")), object_pairs_hook=unique)


def open_weights(directory: Path) -> TensorFile:
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (directory / name).is_file():
            return TensorFile(directory / name)
    raise LoraError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in {directory}")


# dtype names of a safetensors header (and of `weights_only` pickles) that a float parameter can take
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


def match_keys_and_shapes(
    weights: TensorFile,
    params: Mapping[str, nn.Parameter | tuple[int, ...]],
    optional: Mapping[str, nn.Parameter | tuple[int, ...]],
    directory: Path,
) -> dict[str, str]:
    """`{parameter key: file key}` when the file holds exactly the model's adapter tensors (plus any of the
    `optional` ones) with the right shapes (a parameter's, or the shape given) and float dtypes; otherwise a
    `LoraError` naming every problem."""
    found: dict[str, str] = {}
    for key in weights.shapes:
        short = key.removeprefix(PEFT_PREFIX)
        if short in found:
            raise LoraError(f"{directory}: tensor {short!r} appears twice (with and without {PEFT_PREFIX!r})")
        found[short] = key
    missing = sorted(set(params) - set(found))
    unexpected = sorted(set(found) - set(params) - set(optional))
    params = {**params, **{key: optional[key] for key in found if key in optional}}
    problems = []
    if missing:
        problems.append(f"missing keys {quoted_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {quoted_list(unexpected)} (the model has no such adapter tensor)")
    for short in sorted(set(params) & set(found)):
        key = found[short]
        want = tuple(params[short].shape if isinstance(params[short], torch.Tensor) else params[short])
        if weights.shapes[key] != want:
            problems.append(f"{key!r} has shape {list(weights.shapes[key])}, the model expects {list(want)}")
        elif weights.dtypes[key] not in FLOAT_DTYPES:
            problems.append(f"{key!r} has dtype {weights.dtypes[key]}, expected a floating dtype")
    if problems:
        raise LoraError(f"adapter in {directory} does not fit the model: " + "; ".join(problems))
    return found


def quoted_list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', … ({len(keys)} in all)' if len(keys) > limit else ''}]"
