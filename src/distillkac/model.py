"""A trained model from Python in one line (``distillkac.load``, with the example in the package docstring):
:meth:`Model.sample` draws exactly what ``distillkac sample`` writes for the same seeds and labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.data import to_uint8
from distillkac.errors import DistillKacError
from distillkac.runtime import resolve_device
from distillkac.sampling import cycle_labels, sample_artifact


@dataclass
class Model:
    """A loaded model artefact: the network (eval mode, on ``device``), its ``meta`` (the artefact's
    config.json) and where it came from."""

    network: nn.Module
    meta: dict[str, Any]
    directory: Path
    device: torch.device

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Model:
        """The artefact at ``path``: an artefact directory, or a run or stage directory holding ``artifact/``.
        The weights are checked against their recorded sha256."""
        device = resolve_device(device)
        directory = Artifact.locate(Path(path).expanduser())
        stages = sorted(directory.glob(f"stage-*step/{Artifact.DIR}"))
        if stages and not (directory / Artifact.WEIGHTS).is_file():
            raise DistillKacError(f"checkpoint: {path} is a distillation; load one of its stages "
                                  f"({', '.join(str(stage.parent) for stage in stages)})")
        network, meta = load_artifact(directory, device=device)
        return cls(network, meta, directory, device)

    @property
    def kind(self) -> str:
        """"teacher", "baseline" or "student"."""
        return self.meta["kind"]

    @property
    def num_classes(self) -> int:
        """The number of classes (0: unconditional)."""
        return int(self.meta["num_classes"])

    @property
    def data_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(C, H, W)``, or ``(2,)`` for 2-D points."""
        return tuple(self.meta["data_shape"])

    def sample(self, num: int | None = None, *, labels: Sequence[int] | torch.Tensor | None = None, seed: int = 0,
               steps: int | None = None, solver: str | None = None, guidance: float | None = None,
               grid: str | None = None, batch_size: int = 256, precision: str = "auto",
               progress: bool = False) -> torch.Tensor:
        """``num`` samples, or one per entry of ``labels``; image i uses seed ``seed + i``.

        Without ``labels`` a conditional model cycles through its classes (0, 1, ..., 0, 1, ...) and an
        unconditional one takes none. Returns uint8 images ``[B, C, H, W]`` on the CPU (2-D models: float
        points ``[B, 2]``).
        """
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if num is not None and num != labels.numel():
                raise DistillKacError(f"num: {num} samples asked for, but {labels.numel()} labels given")
            num = labels.numel()
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise DistillKacError(f"num: give a positive number of samples, or their labels; got {num!r}")
        if labels is None:
            labels = cycle_labels(num, self.num_classes)
        result = sample_artifact((self.network, self.meta), seeds=range(seed, seed + num), labels=labels,
                                 steps=steps, solver=solver, guidance=guidance, grid=grid, batch_size=batch_size,
                                 device=self.device, precision=precision, progress=progress)
        return result.samples if result.samples.dim() == 2 else to_uint8(result.samples)
