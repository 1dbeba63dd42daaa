"""Small shared helpers (the ground layer): input errors, safe names and paths inside an output folder,
atomic writes with the permissions a plain open() gives, weights-only loading."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable


class InputError(ValueError):
    """Bad input (a config value, a file, a name read from data): the message names it and says what is allowed.
    Commands turn it into `error: <message>` and exit code 2 (exitcodes.EXIT_BAD_INPUT), with no traceback."""


class UnsafeName(InputError):
    """A name read from data (an edit id, a file name in a record) that could leave its output folder."""


# Ids that become file or folder names: letters, digits, '_' and '-', starting with a letter or digit. No '.'
# (webdataset splits a member's extension at the first one), no separator, never absolute, never '..'.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")
# File names inside an edit's folder (sample_0.png): the id rule plus dotted extensions.
SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}(\.[A-Za-z0-9_-]{1,20}){0,3}")


def check_id(value: Any, what: str = "edit id") -> str:
    """`value` if it is a safe id (SAFE_ID), else UnsafeName naming it and the rule."""
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
        raise UnsafeName(f"unsafe {what} {value!r}: it becomes a file name, so use 1-200 of [A-Za-z0-9_-] "
                         "starting with a letter or digit (no '.', '/', '..' or absolute path)")
    return value


def check_file_name(value: Any, what: str = "file name") -> str:
    if not isinstance(value, str) or not SAFE_FILE.fullmatch(value):
        raise UnsafeName(f"unsafe {what} {value!r}: not a plain file name (letters, digits, '_', '-', an extension)")
    return value


def inside(folder: str | os.PathLike, *parts: str) -> Path:
    """folder/parts..., refused (UnsafeName) unless it lies inside `folder` once '..' and symbolic links are
    resolved: every output path built from data goes through here, so nothing is written elsewhere."""
    root = Path(folder)
    path = root.joinpath(*parts)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or (parts and real == real_root):
        raise UnsafeName(f"{path} would lie outside the output folder {root} (resolves to {real})")
    return path


def nonempty_path(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise InputError(f"{what} is empty: name a folder (an empty path would write into the current folder)")
    return str(value)


def writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` (with parents) and check a file can be created in it, before any heavy work: a read-only,
    full or mistyped output folder is an InputError naming it, not an OSError traceback hours later."""
    p = Path(nonempty_path(path, what))
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.EEXIST or (p.exists() and not p.is_dir()):
            reason = "it exists and is not a folder"
        raise InputError(f"{what} {p}: cannot write there ({reason})") from None
    return p


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only set-and-return, which races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode_for(path: Path) -> int:
    """The mode a plain open() would leave: an existing file keeps its mode, a new one gets 0o666 & ~umask
    (mkstemp's 0o600 would hide outputs from the rest of a shared cluster's group)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temp file in the same folder, fsync, then rename: readers never see a partial file.
    The result gets the permissions a plain open() would give it (file_mode_for)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode_for(path))
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def torch_load(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Every checkpoint read in the project goes through here: weights_only, clear error on a missing file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raise with the file name
        raise RuntimeError(f"{path}: cannot load as a weights-only checkpoint ({e})") from e
