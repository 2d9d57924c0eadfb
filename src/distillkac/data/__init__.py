"""Datasets: scikit-learn digits, CIFAR-10, image folders/zips and labelled 2-D toys.

``load_dataset(DataConfig(...), split)`` returns an ``InMemoryDataset`` (``dataset.py``); the loaders live
in ``digits.py``, ``images.py`` (CIFAR-10, image folders and zips, images for FID) and ``toy2d.py``.

Unlabelled datasets have ``num_classes = 0`` and all labels 0, which is the null label of an
unconditional model (see docs/architecture.md, "Conventions").
"""

from __future__ import annotations

from distillkac.data import digits, images, toy2d
from distillkac.data.dataset import (
    BAD_FILE_POLICIES,
    DATASET_NAMES,
    LABEL_MODES,
    SPLITS,
    TOY_NAMES,
    DataConfig,
    InMemoryDataset,
    to_uint8,
)
from distillkac.data.images import CIFAR10_CLASSES, ImageSetInfo, centre_crop_resize, inspect_images
from distillkac.data.toy2d import checkerboard_squares, toy_mixture
from distillkac.errors import DistillKacError

__all__ = ["CIFAR10_CLASSES", "DATASET_NAMES", "SPLITS", "DataConfig", "ImageSetInfo", "InMemoryDataset",
           "centre_crop_resize", "checkerboard_squares", "inspect_images", "load_dataset", "to_uint8", "toy_mixture"]

_LOADERS = {"digits": digits.load, "cifar10": images.load_cifar10, "folder": images.load_folder,
            "toy2d": toy2d.load}
_DECODED = {"cifar10", "folder"}  # loaders that decode image files, with a progress bar for large sets


def load_dataset(cfg: DataConfig, split: str = "train", progress: bool = True) -> InMemoryDataset:
    """Load the ``split`` ("train" or "test") of the dataset that ``cfg`` names; ``progress=False``
    silences the decoding bar of large image sets."""
    _check_config(cfg, split)
    if cfg.name in _DECODED:
        return _LOADERS[cfg.name](cfg, split, progress=progress)
    return _LOADERS[cfg.name](cfg, split)


def _check_config(cfg: DataConfig, split: str) -> None:
    choices = {"name": (cfg.name, DATASET_NAMES), "bad_files": (cfg.bad_files, BAD_FILE_POLICIES),
               "toy": (cfg.toy, TOY_NAMES), "labels": (cfg.labels, LABEL_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise DistillKacError(f"data.{key}: unknown value {value!r}; choose one of {', '.join(allowed)}")
    if split not in SPLITS:
        raise DistillKacError(f"split: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.resolution is not None and cfg.resolution < 1:
        raise DistillKacError(f"data.resolution: must be a positive integer, got {cfg.resolution}")
    if cfg.channels is not None and cfg.channels not in (1, 3):
        raise DistillKacError(f"data.channels: must be 1 or 3, got {cfg.channels}")
    if cfg.download and cfg.name != "cifar10":
        raise DistillKacError(f"data.download: only the cifar10 dataset can be downloaded, not {cfg.name}")
