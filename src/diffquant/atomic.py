"""The one way diffquant writes files and folders: whole or not at all, never over what it was not
told to replace.

- atomic_directory(path): a work folder beside `path`, moved into place by one rename when the block
  succeeds. An existing `path` is replaced only with overwrite=True and only if `replaceable(path)`
  allows it, checked before the work and again at the commit; the commit is a no-replace (or, when
  overwriting, exchange) renameat2 on Linux, so of concurrent writers exactly one lands. Work folders
  carry the writer's pid: the next write beside them removes those of dead writers (and puts back a
  folder a dead writer had moved aside).
- atomic_file(path): the same for one file (a temporary file beside it, renamed over it); with
  write_text_atomic / write_json_atomic for the common cases.
- check_target / check_output_file: the same checks, to run before long work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Siblings a save works in: ".<name>.tmp-<pid>-<hex>" (being written), ".<name>.old-<pid>-<hex>" (the
# replaced folder, between the two renames of a save without an atomic exchange).
_WORK_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


@functools.cache
def _renameat2_function() -> Any:
    """libc's renameat2, looked up once (None where the C library lacks it)."""
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2): True when done, False where the system or file system lacks it."""
    fn = _renameat2_function()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clear_stale_work_folders(path: Path) -> None:
    """Remove what interrupted saves to `path` left beside it, and put back a folder that a save had
    moved aside and died before replacing. Work folders of running saves are left alone."""
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        match = _WORK_FOLDER.match(sibling.name)
        if match is None or match["name"] != path.name:
            continue
        if match["pid"] is not None and _process_alive(int(match["pid"])):
            continue  # a save in progress (this process's own threads included)
        if match["kind"] == "old" and not path.exists():
            os.replace(sibling, path)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _work_folder(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_target(path: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None = None) -> None:
    """Raise now (before any work) if a save to `path` would fail or replace what it was not told to."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
        if replaceable is not None and not replaceable(path):
            raise FileExistsError(f"{path} exists and is not a diffquant folder: refusing to replace it (remove it "
                                  "yourself, or choose another output folder)")
    _check_creatable(path)


def _check_creatable(path: Path) -> None:
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise PermissionError(f"cannot create {path}: {parent} is not a writable folder")


def check_output_file(path: Path) -> None:
    """Raise now if a file cannot be written at `path` (a folder there, or no writable folder above)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name")
    _check_creatable(path)


def _commit(tmp: Path, path: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None) -> None:
    """Move the finished `tmp` to `path`, checked again here: another save may have finished meanwhile."""
    check_target(path, overwrite, replaceable)
    if not (overwrite and path.exists()):  # decided once: `path` may appear at any moment
        try:
            if not _renameat2(tmp, path, _RENAME_NOREPLACE):
                os.rename(tmp, path)  # still refuses a non-empty folder that appeared since the check
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{path} was created by someone else during this save; it is left as "
                                      "it is") from exc
            raise
        return
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        shutil.rmtree(tmp)  # tmp now holds the replaced folder
        return
    old = _work_folder(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False,
                     replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only if the block succeeds.

    An existing `path` is replaced only with overwrite, and then only if `replaceable(path)` (when
    given) allows it; both are checked before the block and again at the commit.
    """
    path = Path(path)
    check_target(path, overwrite, replaceable)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_work_folders(path)
    tmp = _work_folder(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, path, overwrite, replaceable)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, for writers that read it) to write the file
    to; rename it over `path` only if the block succeeds. overwrite=False refuses an existing file,
    checked before the block and at the rename."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        elif not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.link(tmp, path)  # fails if `path` appeared meanwhile (FileExistsError)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, overwrite: bool = True) -> Path:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, overwrite: bool = True, **dumps: Any) -> Path:
    """JSON (indent 2 unless given, a final newline) written atomically."""
    return write_text_atomic(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n", overwrite)
