"""Files written safely: atomic writes, sha256, the run-directory lock and output-directory checks.

Every write goes to a temporary file in the same directory (``.NAME.*.tmp``), is flushed and fsynced,
then renamed over the target, so a crash never leaves a half-written file where a good one was. A
directory is replaced the same way (a staging sibling, the old one moved aside as ``.NAME.old-PID``);
:func:`remove_stale_temporaries` sweeps what killed writers left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distillkac.errors import DistillKacError

LOCK_FILE = ".lock"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as err:
        Path(temp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err  # name the file (disk full...)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (a trailing newline), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def atomic_write_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)``, written atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_replace_dir(directory: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Replace ``directory`` by what ``fill(staging)`` writes into a temporary sibling directory; an existing one
    is moved aside first and deleted only once the new one is in place, so a crash leaves the old or the new."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    retired = None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        fill(staging)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
        os.replace(staging, directory)
        _fsync_directory(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and retired.exists() and not directory.exists():
            os.replace(retired, directory)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete what writers killed mid-write left in ``directory``: ``.NAME.*.tmp`` files and directories
    (atomic writes, replaced directories, the lock) and directories moved aside (``.NAME.old-PID``).

    Only call it while holding the directory's RunLock: another live writer's temporaries look the same.
    Returns the names removed.
    """
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        name = entry.name
        if name.startswith(".") and (name.endswith(".tmp") or ".old-" in name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on some systems (then skip)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Refuse (one line, naming ``option``) a directory that cannot be created or written: ``path`` is
    a file, or its nearest existing ancestor is a file or not writable. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DistillKacError(f"{option}: {path} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DistillKacError(f"{option}: cannot create {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistillKacError(f"{option}: cannot write to {existing} (permission denied)")
    return path


def check_new_output_dir(path: str | os.PathLike, option: str, *, overwrite: bool,
                         resumes: Callable[[Path], bool] | None = None, what: str = "") -> Path:
    """:func:`check_output_dir`, and refuse (one line) a directory that already holds results, unless
    ``overwrite``: one with visible entries (hidden ones such as ``.lock`` do not count) for which
    ``resumes(path)`` is not true. ``resumes`` recognises a run of the same command (``what`` names it),
    which the command continues. Creates nothing."""
    path = check_output_dir(path, option)
    if overwrite or not path.is_dir() or (resumes is not None and resumes(path)):
        return path
    if any(not entry.name.startswith(".") for entry in path.iterdir()):
        kind = f" and is not {what}" if what else ""
        raise DistillKacError(f"{option}: {path} is not empty{kind}; choose a new directory or add --overwrite "
                              f"to write into it")
    return path


def check_new_output_file(path: str | os.PathLike, option: str, *, overwrite: bool) -> Path:
    """Refuse (one line) an existing ``path`` unless ``overwrite``, a directory in its place, and a parent
    that cannot be created or written. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise DistillKacError(f"{option}: {path} is a directory; give the file to write")
    if path.exists() and not overwrite:
        raise DistillKacError(f"{option}: {path} already exists; choose a new file or add --overwrite to "
                              f"replace it")
    check_output_dir(path.parent, option)
    return path


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in the file ``path``; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` (created with O_EXCL, holding pid and host).

    A second holder is refused with a one-line DistillKacError. A lock left by a dead process on this
    host is stale and taken over; a lock from another host is never taken over (its process cannot be
    checked from here): delete the file by hand if that run is really gone.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._try_create():
                self.held = True
                return self
            if not self._remove_if_stale():
                break
        holder = read_json_object(self.path)
        who = ("lock file unreadable" if holder is None
               else f"locked by pid {holder.get('pid')} on {holder.get('hostname')}")
        raise DistillKacError(f"run directory: {self.path.parent} is in use ({who}); "
                              f"wait for it or delete {self.path} if that process is gone")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _try_create(self) -> bool:
        """Write pid and host to a temporary file, then hard-link it to ``.lock`` (fails if it exists):
        the lock appears complete or not at all, so a crash never leaves an empty, unreadable lock."""
        record = json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}).encode("ascii")
        handle, temp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(record)
                file.flush()
                os.fsync(file.fileno())
            os.link(temp, self.path)
        except (FileExistsError, FileNotFoundError):  # held, or our temporary was swept by the holder
            return False
        finally:
            Path(temp).unlink(missing_ok=True)
        return True

    def _remove_if_stale(self) -> bool:
        holder = read_json_object(self.path)
        if holder is None or holder.get("hostname") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
            return False
        self.path.unlink(missing_ok=True)
        return True
