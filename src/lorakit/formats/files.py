"""Crash-safe file writes: a file under its final name is always complete, and an adapter's files change together.

`replace_files` is the one writer of saved files. Its rule: a process killed at any point of a save (SIGKILL
included) leaves either the previous files or the new ones, never a partial file under a final name; where the
directory holds only the files being written, never a mix of old and new files either. See its docstring for
when that second half cannot hold and what remains then.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import LoraError

_TEMP_PREFIX = ".lorakit-tmp-"  # a temporary file inside the target directory (the per-file path)
_SIBLING_MARK = ".lorakit-new-"  # `.<name>.lorakit-new-<random>`: a new directory built beside the target

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# renameat2 errors that mean "not here" (no syscall, an old kernel, a filesystem without RENAME_EXCHANGE, not
# allowed, another mount): the save falls back to per-file renames instead of failing
_UNSUPPORTED_BY_FILESYSTEM = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_UNSUPPORTED = _UNSUPPORTED_BY_FILESYSTEM | {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EBUSY}
_no_exchange_devices: set[int] = set()  # filesystems where RENAME_EXCHANGE failed once: not tried again


def as_path(value: object, what: str = "path") -> Path:
    """`value` (a `str` or `os.PathLike`) as a `Path`; anything else is a `LoraError` naming `what`."""
    if not isinstance(value, (str, os.PathLike)):
        raise LoraError(f"{what} must be a str or os.PathLike, got {type(value).__name__} {value!r}")
    return Path(value)


def replace_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write each `{name: data}` into `directory` so that no reader, and no crash, ever sees a partial save.

    The rule: when `directory` does not exist yet or holds nothing but files named in `files` (and lorakit's
    stale temporaries), a process killed at any moment (SIGKILL; power loss, given the fsyncs) leaves it with
    either all its previous files or all the new ones. The new files are written and fsynced in a fresh directory
    `.<name>.lorakit-new-<random>` beside `directory` (same parent, so the same filesystem), which is fsynced
    too, then put in place in one step: `rename` when `directory` does not exist, else Linux's
    `renameat2(RENAME_EXCHANGE)`, which swaps the two directories atomically; then the parent is fsynced and the
    old directory (now under the sibling's name) removed. A symlinked `directory` is resolved first: the real
    directory is swapped, the link kept. The new directory gets the old one's mode and group (a new one gets
    `mkdir`'s 0o777 & ~umask); files get 0o666 & ~umask, and unchanged ones are hard-linked, not rewritten. A
    save killed part-way leaves a sibling behind, which the next save to `directory` removes.

    The fallback, with a remaining window: when `directory` holds anything else (a Trainer's `checkpoint-*`
    directories, tokenizer files, another adapter's subdirectory: these are never touched), is not ours or not
    writable, is a mount point or the working directory, its parent is not readable (to fsync it), or the
    exchange is unavailable (not Linux, glibc < 2.28, a filesystem that refuses it), the changed files are
    written and fsynced as temporaries in `directory`, renamed over their final names one `os.replace` after
    another, and the directory is fsynced. Every file is still whole, but when two or more files change, a kill
    between two renames leaves some old files with some new ones.

    Either way links in `directory` are replaced, never written through, and a save that changes nothing
    writes nothing. When this raises (a full disk, a failed fsync), the previous files are in place (the swap is
    undone if the fsync after it fails; in the fallback, an error in the last fsync leaves the new files) and no
    temporary is left behind.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):  # a file, or a dangling symlink
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(directory))
    real = Path(os.path.realpath(directory))
    parent = real.parent
    if real == parent:  # the root directory
        _replace_each(real, files)
        return
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(parent, real.name)
    exists = real.is_dir()
    if exists:
        _remove_stale_temporaries(real)
        changed = {name for name, data in files.items() if not _same_content(real / name, data)}
        if not changed:
            _fsync_directory(real)
            return
        if not _can_exchange(real, files):
            _replace_each(real, files)
            return
    else:
        changed = set(files)
    if not _replace_directory(real, files, changed, exists):
        _replace_each(real, files)


def _replace_directory(real: Path, files: dict[str, bytes], changed: set[str], exists: bool) -> bool:
    """Build the new directory beside `real` and swap it in. False, with nothing changed and nothing left
    behind, where this cannot be done here: the caller falls back to per-file renames."""
    parent = real.parent
    if os.name == "posix" and not os.access(parent, os.R_OK):
        return False  # the parent could not be opened to fsync the swap
    try:
        sibling = _make_sibling(parent, real.name)
    except OSError:
        return False  # e.g. a parent we may not write: the per-file path may still work, or raises the error
    try:
        if exists and not _copy_mode_and_group(real, sibling):
            shutil.rmtree(sibling, ignore_errors=True)
            return False
        for name, data in files.items():
            if name not in changed and _link_unchanged(real / name, sibling / name):
                continue
            _write_new(sibling / name, data)
        _fsync_directory(sibling)
    except BaseException:
        shutil.rmtree(sibling, ignore_errors=True)
        raise
    try:
        if exists:
            _renameat2(sibling, real, _RENAME_EXCHANGE)
        else:
            os.rename(sibling, real)
    except OSError as error:
        shutil.rmtree(sibling, ignore_errors=True)
        if exists and error.errno in _UNSUPPORTED:
            if error.errno in _UNSUPPORTED_BY_FILESYSTEM:
                with contextlib.suppress(OSError):
                    _no_exchange_devices.add(os.stat(real).st_dev)
            return False
        if not exists and error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False  # a directory appeared at `real` meanwhile: write into it
        raise
    # `real` is the new directory; `sibling` is the old one (or nothing, when there was none)
    try:
        _fsync_directory(parent)
    except BaseException:  # the swap is not known durable: put the old directory back, so an error means "not saved"
        with contextlib.suppress(OSError):
            if exists:
                _renameat2(sibling, real, _RENAME_EXCHANGE)
            else:
                os.rename(real, sibling)
            _fsync_directory(parent)
        shutil.rmtree(sibling, ignore_errors=True)
        raise
    if exists:
        _discard_old_directory(sibling, real, files)
    return True


def _copy_mode_and_group(old: Path, new: Path) -> bool:
    """Give the new directory the old one's group (first: a setgid bit then hands it on to the files) and
    mode; False where that is not allowed."""
    try:
        info = os.stat(old)
        if os.stat(new).st_gid != info.st_gid:
            os.chown(new, -1, info.st_gid)
        os.chmod(new, stat.S_IMODE(info.st_mode))
        return stat.S_IMODE(os.stat(new).st_mode) == stat.S_IMODE(info.st_mode)
    except OSError:
        return False


def _replace_each(directory: Path, files: dict[str, bytes]) -> None:
    """The fallback: each changed file written to a temporary in `directory`, fsynced, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
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


def write_temp(directory: Path, final_name: str, data: bytes) -> Path:
    """Write `data` to a new temporary file in `directory` and fsync it; the caller renames it into place."""
    while True:
        temp = directory / f"{_TEMP_PREFIX}{final_name}.{secrets.token_hex(6)}"
        try:
            _write_new(temp, data)
        except FileExistsError:
            continue
        return temp


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) with mode 0o666 & ~umask, write `data` and fsync it; on any
    failure nothing is left at `path`. The kernel applies the umask: no `os.umask` call, which would briefly
    change it for every thread of the process."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _link_unchanged(current: Path, new: Path) -> bool:
    """Hard-link an unchanged regular file into the new directory instead of rewriting it; False if not."""
    try:
        if not stat.S_ISREG(os.lstat(current).st_mode):
            return False  # a symlink (never followed into the new directory) or something stranger: rewrite
        os.link(current, new, follow_symlinks=False)
    except OSError:
        return False
    return True


def _make_sibling(parent: Path, name: str) -> Path:
    """A new, empty directory `.<name>.lorakit-new-<random>` in `parent`, made by `mkdir(0o777)` so that it has
    the mode (umask, default ACL, setgid group) a plain new directory gets."""
    while True:
        sibling = parent / f".{name}{_SIBLING_MARK}{secrets.token_hex(6)}"
        try:
            os.mkdir(sibling, 0o777)
        except FileExistsError:
            continue
        return sibling


def _can_exchange(real: Path, files: dict[str, bytes]) -> bool:
    """Whether the existing directory `real` may be swapped for a new one: the exchange exists here, and the
    swap loses nothing (only files being written and stale temporaries inside), changes no owner, and moves no
    mount point or working directory."""
    if _renameat2_function() is None:
        return False
    try:
        info = os.stat(real)
        if info.st_dev in _no_exchange_devices or info.st_dev != os.stat(real.parent).st_dev:
            return False
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o300 != 0o300:
            return False  # another owner's directory, or one we may not write: the per-file path decides
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat("."), info):
                return False  # swapped, this process would be left in the removed old directory
        with os.scandir(real) as entries:
            for entry in entries:
                own = entry.name in files or entry.name.startswith(_TEMP_PREFIX)
                if not own or entry.is_dir(follow_symlinks=False):
                    return False  # anything else in the directory must stay where it is
    except OSError:
        return False
    return True


def _discard_old_directory(old: Path, new: Path, files: dict[str, bytes]) -> None:
    """Remove the swapped-out directory: the files it was checked to hold. Anything that appeared in it since
    the check (another process writing there) is moved into the new directory rather than deleted."""
    with contextlib.suppress(OSError), os.scandir(old) as entries:
        for entry in list(entries):
            path = old / entry.name
            if (entry.name in files or entry.name.startswith(_TEMP_PREFIX)) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            else:
                with contextlib.suppress(OSError):
                    _renameat2(path, new / entry.name, _RENAME_NOREPLACE)
    with contextlib.suppress(OSError):
        os.rmdir(old)


def _remove_stale_siblings(parent: Path, name: str) -> None:
    """Remove new directories left beside `parent / name` by a killed save (a partial new one, or the old one
    after the exchange). Their names are lorakit's own, so they hold nothing else."""
    prefix = f".{name}{_SIBLING_MARK}"
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        stale = [parent / entry.name for entry in entries if entry.name.startswith(prefix)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _remove_stale_temporaries(directory: Path) -> None:
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        stale = [directory / entry.name for entry in entries if entry.name.startswith(_TEMP_PREFIX)]
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()


@functools.cache
def _renameat2_function() -> Any:
    """The C library's `renameat2` (glibc >= 2.28) through ctypes, or None (not Linux, or too old a libc)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def _renameat2(source: Path, target: Path, flags: int) -> None:
    """`renameat2(AT_FDCWD, source, AT_FDCWD, target, flags)`; an `OSError` on failure (ENOSYS where the C
    library lacks it). Raises the audit event `lorakit.renameat2` (like `os.rename`'s `os.rename`)."""
    sys.audit("lorakit.renameat2", str(source), str(target), flags)
    function = _renameat2_function()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(source), None, str(target))
    import ctypes

    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


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
