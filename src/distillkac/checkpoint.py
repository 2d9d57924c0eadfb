"""Model artefacts (the :class:`Artifact`: layout, kind and how it samples) and the training state.

* A model **artefact** is a directory with ``model.safetensors`` (weights only: no code can run when it is
  read) and ``config.json`` (architecture, path, class count, data shape, the kind of model and the sha256
  of the weights file). ``load_artifact`` rebuilds the network from the JSON and refuses weights whose
  hash does not match (a truncated copy, an edited file, the wrong file).
* The **training state** (``training-state.pt``) holds tensors, dicts, lists, numbers and strings only and
  is read with ``torch.load(weights_only=True)``, so a malicious pickle cannot execute code.
* Both are written atomically (:mod:`distillkac.files`): a crash never leaves a half-written file or
  artefact where a good one was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.files import atomic_replace_dir, atomic_write_bytes, atomic_write_json, atomic_write_torch, sha256_bytes
from distillkac.nets import build_network

ARTIFACT_FORMAT = "distillkac-artifact"
ARTIFACT_VERSION = 1
DEFAULT_TEACHER_STEPS = 100


@dataclass(frozen=True)
class Sampling:
    """How a model is sampled: solver steps, solver, CFG weight and time grid."""

    steps: int
    solver: str
    guidance: float
    grid: str = "uniform"
    baked: bool = False
    """True for a distilled student: the guidance is in its weights, so the network runs unguided."""

    @property
    def forward_guidance(self) -> float:
        """The CFG weight the network is evaluated with (0 when the guidance is baked in)."""
        return 0.0 if self.baked else self.guidance


@dataclass(frozen=True)
class Artifact:
    """A model artefact (its ``meta``, the ``config.json``) and the layout of the run directory that holds one.

    A run directory ``RUN`` holds ``config.json`` (the resolved run config), ``training-state.pt`` (resume)
    and ``artifact/``: ``model.safetensors`` + ``config.json``. The kind is ``teacher`` (a Kac flow),
    ``baseline`` (a Gaussian path) or ``student`` (distilled: it samples only as it was distilled).
    """

    meta: dict[str, Any]

    DIR: ClassVar[str] = "artifact"
    WEIGHTS: ClassVar[str] = "model.safetensors"
    META: ClassVar[str] = "config.json"
    RUN_CONFIG: ClassVar[str] = "config.json"
    TRAINING_STATE: ClassVar[str] = "training-state.pt"
    TEACHER: ClassVar[str] = "teacher"
    BASELINE: ClassVar[str] = "baseline"
    STUDENT: ClassVar[str] = "student"
    KINDS: ClassVar[tuple[str, ...]] = (TEACHER, BASELINE, STUDENT)

    @classmethod
    def locate(cls, path: str | os.PathLike) -> Path:
        """The artefact directory given itself or a run directory holding ``artifact/``."""
        path = Path(path)
        if (path / cls.DIR / cls.META).is_file() and not (path / cls.WEIGHTS).is_file():
            return path / cls.DIR
        return path

    @classmethod
    def trained_steps(cls, run_dir: str | os.PathLike) -> int:
        """The optimiser step at which the run's artefact was written (0 if it has none yet)."""
        directory = Path(run_dir) / cls.DIR
        if not (directory / cls.META).is_file():
            return 0
        return int(read_artifact_meta(directory).get("train_step", 0))

    @property
    def is_student(self) -> bool:
        return self.meta.get("kind") == self.STUDENT

    def baked_sampling(self) -> Sampling | None:
        """The student rule: a distilled student keeps the guidance, steps, solver (Euler) and grid it was
        distilled with; ``None`` for a teacher or baseline, which samples however it is asked."""
        if not self.is_student:
            return None
        return Sampling(int(self.meta["steps"]), "euler", float(self.meta.get("guidance", 0.0)),
                        self.meta.get("grid", "uniform"), baked=True)

    def sampling(self, steps: int | None = None, solver: str | None = None, guidance: float | None = None,
                 grid: str | None = None) -> Sampling:
        """The settings to sample with. A teacher or baseline takes what is asked (default: 100 AB-2 steps,
        w = 0, the uniform grid); a student refuses anything but its own (guidance 0 means "unset")."""
        own = self.baked_sampling()
        if own is None:
            return Sampling(DEFAULT_TEACHER_STEPS if steps is None else steps, solver or "ab2",
                            0.0 if guidance is None else guidance, grid or "uniform")
        if steps is not None and steps != own.steps:
            raise DistillKacError(f"--steps: this student was distilled for {own.steps} step(s); "
                                  f"it cannot sample with {steps}")
        if solver is not None and solver != own.solver:
            raise DistillKacError(f"--solver: a student samples with its Euler steps only, not {solver!r}")
        if guidance is not None and guidance != 0 and guidance != own.guidance:
            raise DistillKacError(f"--guidance: this student has guidance w={own.guidance:g} baked in; "
                                  f"leave --guidance unset")
        if grid is not None and grid != own.grid:
            raise DistillKacError(f"grid: this student was distilled on the {own.grid!r} grid, not {grid!r}")
        return own


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
    """Write ``model`` (pass the EMA network) as an artefact directory, replaced atomically; returns the meta:
    ``meta`` (e.g. ``{"kind": "teacher", "path": {...}}``) with the format, version, network config, class
    count, data shape and ``weights_sha256``."""
    net = _unwrap(model)
    weights = save(portable_state_dict(net))
    full_meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **meta,
                 "net": net.config.to_dict(), "num_classes": int(net.num_classes),
                 "data_shape": list(net.config.data_shape), "weights_sha256": sha256_bytes(weights)}

    def fill(staging: Path) -> None:
        atomic_write_bytes(staging / Artifact.WEIGHTS, weights)
        atomic_write_json(staging / Artifact.META, full_meta)

    atomic_replace_dir(directory, fill)
    return full_meta


def read_artifact_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The artefact's ``config.json`` (checked to be a distillkac artefact), without loading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DistillKacError(f"checkpoint: {directory} is not a directory (expected a model artefact)")
    meta_path = directory / Artifact.META
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
    weights_path = directory / Artifact.WEIGHTS
    if not weights_path.is_file():
        raise DistillKacError(f"checkpoint: {weights_path} is missing")
    data = weights_path.read_bytes()
    if sha256_bytes(data) != meta["weights_sha256"]:
        raise DistillKacError(f"checkpoint: {weights_path} does not match the sha256 recorded in "
                              f"{directory / Artifact.META} (truncated, altered or replaced file)")
    return data


def load_artifact(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(model in eval mode on device, meta)``; every problem is a one-line DistillKacError."""
    directory = Path(directory)
    meta = read_artifact_meta(directory)
    data = _verified_weights(directory, meta)
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise DistillKacError(f"checkpoint: {directory / Artifact.WEIGHTS} is not a safetensors file "
                              f"({err})") from err
    model = build_network(meta["net"], generator=torch.Generator().manual_seed(0))
    check_state_dict(model, state, str(directory / Artifact.WEIGHTS))
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


save_training_state = atomic_write_torch
"""``torch.save`` of plain data (tensors, dicts, lists, numbers, strings), written atomically."""


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
