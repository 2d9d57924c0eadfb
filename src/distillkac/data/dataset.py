"""The dataset interface: ``DataConfig`` (what to load) and ``InMemoryDataset`` (what every loader returns).

Every dataset is held in memory: images as one uint8 tensor ``[N, C, H, W]``, toy points as one float32
tensor ``[N, 2]``, labels as a LongTensor ``[N]``. ``get_batch`` turns rows into the library's model
inputs (images as float32 in ``[-1, 1]``; ``to_uint8`` is its inverse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from distillkac.errors import DistillKacError
from distillkac.rng import GeneratorLike, rand

DATASET_NAMES = ("digits", "cifar10", "folder", "toy2d")
SPLITS = ("train", "test")
BAD_FILE_POLICIES = ("skip", "error")
TOY_NAMES = ("grid", "checkerboard")
LABEL_MODES = ("auto", "subfolders", "none", "folders")


@dataclass
class DataConfig:
    """Which dataset to load and how (the ``data`` part of a RunConfig).

    ``labels`` applies to the folder dataset: "auto" labels images by their top-level sub-folder when
    there are at least two such sub-folders and every image is inside one, "subfolders" (also spelt
    "folders") demands that, "none" makes the set unconditional (use it for nested exports such as
    LSUN's hashed folders).
    """

    name: str
    path: str | None = None
    resolution: int | None = None
    channels: int | None = None
    hflip: bool = False
    bad_files: str = "skip"
    download: bool = False
    toy: str = "grid"
    toy_size: int = 20000
    seed: int = 0
    labels: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistillKacError(f"data: unknown key(s) {unknown}; allowed keys: {sorted(known)}")
        if "name" not in values:
            raise DistillKacError(f"data: missing key 'name' (one of {', '.join(DATASET_NAMES)})")
        return cls(**values)


class InMemoryDataset(Dataset):
    """A dataset held in one tensor: uint8 images ``[N, C, H, W]`` or float32 points ``[N, 2]``.

    Attributes: ``data`` (the storage tensor), ``labels`` (LongTensor [N]), ``num_classes`` (0 when
    unlabelled), ``class_names``, ``data_shape`` ((C, H, W) or (2,)), ``hflip``, ``skipped`` (names of
    unreadable files that were left out), ``source_indices`` (digits: rows of ``load_digits()``; else None).
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                 class_names: Sequence[str], hflip: bool, info: dict[str, Any],
                 skipped: Sequence[str] = ()) -> None:
        if data.shape[0] != labels.shape[0]:
            raise ValueError(f"data has {data.shape[0]} rows but labels has {labels.shape[0]}")
        self.data = data
        self.labels = labels.to(torch.long)
        self.num_classes = int(num_classes)
        self.class_names = tuple(class_names)
        self.data_shape = tuple(int(s) for s in data.shape[1:])
        self.hflip = bool(hflip)
        self.skipped = tuple(skipped)
        self.source_indices: torch.Tensor | None = None
        self._info = dict(info)

    @property
    def is_image(self) -> bool:
        return self.data.dtype == torch.uint8

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], int(self.labels[index])

    def get_batch(self, indices: torch.Tensor | Sequence[int],
                  generator: GeneratorLike = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` as model inputs: (x float32, y long), both on the CPU.

        Images map uint8 v to v / 127.5 - 1 in [-1, 1]. With ``hflip`` on, each image is mirrored
        left-right when a uniform draw from ``generator`` (one generator, or one per row) is below 1/2;
        with ``generator=None`` no image is flipped (unaugmented data, e.g. for reference statistics).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        x, y = self.data[idx], self.labels[idx]
        if not self.is_image:
            return x.to(torch.float32), y
        if self.hflip and generator is not None:
            flip = (rand((idx.shape[0],), generator) < 0.5).cpu()
            x[flip] = x[flip].flip(-1)
        return x.to(torch.float32).div_(127.5).sub_(1.0), y

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for run configs and reference statistics."""
        counts = torch.bincount(self.labels, minlength=max(self.num_classes, 1))
        return {
            **self._info,
            "count": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_counts": counts.tolist() if self.num_classes else [],
            "data_shape": list(self.data_shape),
            "hflip": self.hflip,
            "skipped_files": len(self.skipped),
        }


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 0..255, the inverse of ``get_batch``'s scaling (round to nearest,
    clamp); uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_native_shape(cfg: DataConfig, resolution: int, channels: int) -> None:
    """Digits and CIFAR-10 are used at their own size: a different resolution/channels is an error."""
    if cfg.resolution is not None and cfg.resolution != resolution:
        raise DistillKacError(f"data.resolution: {cfg.name} images are {resolution}x{resolution}, "
                              f"got resolution {cfg.resolution} (leave it unset or set {resolution})")
    if cfg.channels is not None and cfg.channels != channels:
        raise DistillKacError(f"data.channels: {cfg.name} images have {channels} channel(s), "
                              f"got channels {cfg.channels} (leave it unset or set {channels})")


def scale_info(hflip: bool) -> str:
    flip = "; random horizontal flip with probability 1/2 in get_batch" if hflip else ""
    return f"uint8 v -> v / 127.5 - 1 in [-1, 1]{flip}"
