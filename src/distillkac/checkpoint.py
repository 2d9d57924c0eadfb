"""Safe, portable artefacts and resume state, written atomically; the run-directory lock.

* A model **artefact** is a directory with ``model.safetensors`` (weights only: no code can run when it is
  read) and ``config.json`` (architecture, path, class count, data shape, the kind of model and the sha256
  of the weights file). ``load_artifact`` rebuilds the network from the JSON and refuses weights whose
  hash does not match (a truncated copy, an edited file, the wrong file).
* The **training state** (``training-state.pt``) holds tensors, dicts, lists, numbers and strings only and
  is read with ``torch.load(weights_only=True)``, so a malicious pickle cannot execute code.
* Every write goes to a temporary file in the same directory, is flushed and fsynced, then renamed over
  the target, so a crash never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkac.errors import DistillKacError

ARTIFACT_FORMAT = "distillkac-artifact"
ARTIFACT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "config.json"
LOCK_FILE = ".lock"


# ----------------------------------------------------------------------------------- atomic writes

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


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on some systems (then skip)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
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


# --------------------------------------------------------------------------------------- artefacts

def _unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as independent, contiguous CPU tensors (what safetensors needs)."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in _unwrap(model).state_dict().items()}


def save_artifact(directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``model`` (pass the EMA network) as an artefact directory; returns the written meta.

    ``meta`` (e.g. ``{"kind": "teacher", "path": {...}}``) is extended with the format, version, network
    config, class count, data shape and ``weights_sha256``. Both files are written into a temporary
    sibling directory that then replaces ``directory``; an existing artefact is moved aside first and
    deleted only once the new one is in place, so a crash leaves either the old or the new artefact.
    """
    from safetensors.torch import save

    directory = Path(directory)
    net = _unwrap(model)
    weights = save(portable_state_dict(net))
    full_meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **meta,
                 "net": net.config.to_dict(), "num_classes": int(net.num_classes),
                 "data_shape": list(net.config.data_shape), "weights_sha256": sha256_bytes(weights)}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    retired = None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        atomic_write_bytes(staging / WEIGHTS_FILE, weights)
        atomic_write_json(staging / META_FILE, full_meta)
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
    return full_meta


def read_artifact_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The artefact's ``config.json`` (checked to be a distillkac artefact), without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DistillKacError(f"checkpoint: {directory} is not a directory (expected a model artefact)")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DistillKacError(f"checkpoint: {meta_path} is missing (not a distillkac artefact)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DistillKacError(f"checkpoint: {meta_path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise DistillKacError(f"checkpoint: {meta_path} is not a distillkac artefact "
                              f"(format != {ARTIFACT_FORMAT!r})")
    if meta.get("version") != ARTIFACT_VERSION:
        raise DistillKacError(f"checkpoint: {meta_path} has artefact version {meta.get('version')!r}; "
                              f"this distillkac reads version {ARTIFACT_VERSION}")
    for key in ("net", "weights_sha256", "num_classes", "data_shape"):
        if key not in meta:
            raise DistillKacError(f"checkpoint: {meta_path} lacks the field {key!r}")
    return meta


def artifact_sha256(directory: str | os.PathLike) -> str:
    """The sha256 of the artefact's weights file as recorded in its meta (checked against the file)."""
    directory = Path(directory)
    meta = read_artifact_meta(directory)
    _verified_weights(directory, meta)
    return meta["weights_sha256"]


def _verified_weights(directory: Path, meta: dict[str, Any]) -> bytes:
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise DistillKacError(f"checkpoint: {weights_path} is missing")
    data = weights_path.read_bytes()
    if sha256_bytes(data) != meta["weights_sha256"]:
        raise DistillKacError(f"checkpoint: {weights_path} does not match the sha256 recorded in "
                              f"{directory / META_FILE} (truncated, altered or replaced file)")
    return data


def load_artifact(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(model in eval mode on device, meta)``; every problem is a one-line DistillKacError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from distillkac.nets import build_network

    directory = Path(directory)
    meta = read_artifact_meta(directory)
    data = _verified_weights(directory, meta)
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise DistillKacError(f"checkpoint: {directory / WEIGHTS_FILE} is not a safetensors file "
                              f"({err})") from err
    model = build_network(meta["net"], generator=torch.Generator().manual_seed(0))
    check_state_dict(model, state, str(directory / WEIGHTS_FILE))
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line DistillKacError if ``state`` does not fit ``model`` (keys or shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DistillKacError(f"checkpoint: {source} does not fit the network in its config "
                              f"(missing keys {missing[:3]}, unexpected keys {unexpected[:3]})")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise DistillKacError(f"checkpoint: {source} does not fit the network: {name} has shape "
                                  f"{list(state[name].shape)}, the network needs {list(tensor.shape)}")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete what writers killed mid-write left in ``directory``: ``.NAME.*.tmp`` files and directories
    (atomic_write_bytes, save_artifact, the lock) and artefacts moved aside (``.NAME.old-PID``).

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


# ---------------------------------------------------------------------------------- training state

def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save`` of plain data (tensors, dicts, lists, numbers, strings), written atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: a corrupt or malicious file is refused
    (a DistillKacError), never executed."""
    path = Path(path)
    if not path.is_file():
        raise DistillKacError(f"training state: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DistillKacError(f"training state: {path} cannot be loaded safely ({reason})") from err
    if not isinstance(state, dict):
        raise DistillKacError(f"training state: {path} does not hold a dict")
    return state


# -------------------------------------------------------------------------------------------- lock

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
        raise DistillKacError(f"run directory: {self.path.parent} is in use ({self._describe_holder()}); "
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

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _describe_holder(self) -> str:
        holder = self._holder()
        if holder is None:
            return "lock file unreadable"
        return f"locked by pid {holder.get('pid')} on {holder.get('hostname')}"

    def _remove_if_stale(self) -> bool:
        holder = self._holder()
        if holder is None or holder.get("hostname") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
            return False
        self.path.unlink(missing_ok=True)
        return True
