"""Crash-safe file writes: a file under its final name is always complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import LoraError

_TEMP_PREFIX = ".lorakit-tmp-"


def as_path(value: object, what: str = "path") -> Path:
    """`value` (a `str` or `os.PathLike`) as a `Path`; anything else is a `LoraError` naming `what`."""
    if not isinstance(value, (str, os.PathLike)):
        raise LoraError(f"{what} must be a str or os.PathLike, got {type(value).__name__} {value!r}")
    return Path(value)


def write_temp(directory: Path, final_name: str, data: bytes) -> Path:
    """Write `data` to a new temporary file in `directory` and fsync it; the caller renames it into place."""
    fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{final_name}.", dir=directory)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; a saved adapter gets the usual 0666 & ~umask
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return Path(temp)


def replace_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write each `{name: data}` into `directory` so that no reader ever sees a partial file.

    All files are written and fsynced under temporary names first; only then are they renamed over the
    final names, one `os.replace` after another, and the directory is fsynced. A crash before the renames
    leaves the previous files untouched (and a stray temporary, removed by the next call). Files whose
    content is already on disk are not rewritten, so re-saving an adapter with an unchanged config swaps
    just its weights, in one atomic rename.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TEMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            stale.unlink()
    changed = {name: data for name, data in files.items() if not _same_content(directory / name, data)}
    temps: dict[str, Path] = {}
    try:
        for name, data in changed.items():
            temps[name] = write_temp(directory, name, data)
        for name, temp in temps.items():
            os.replace(temp, directory / name)
    finally:
        for temp in temps.values():
            with contextlib.suppress(OSError):
                temp.unlink()
    _fsync_directory(directory)


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
