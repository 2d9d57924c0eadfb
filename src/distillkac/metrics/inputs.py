"""The images that ``fid`` and ``ref`` read: what ``sample`` writes, image folders and zips, and .npz files.

* ``fid --images`` takes the directory ``sample --out`` wrote (its ``samples.npz``, never its grid), that
  directory's ``images/`` folder or any folder of PNG/JPEG files, or an .npz of uint8 images (``sample``'s
  key "samples", or the key "images").
* ``ref --data`` takes the same .npz files, image folders and zips (class sub-folders and train/test
  splits as ``train`` reads them) and the CIFAR-10 batches; the loader is inferred from the path unless
  ``--dataset`` names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distillkac.data import DataConfig, InMemoryDataset, inspect_images, load_dataset
from distillkac.data.images import find_cifar_batches
from distillkac.errors import DistillKacError
from distillkac.npz import read_npz
from distillkac.sampling import IMAGES_DIR, SAMPLES_FILE

IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""The files read from a folder of images given to ``fid``."""
NPZ_KEYS = ("samples", "images")
"""The keys an .npz of images may use (``sample`` writes "samples")."""
REFERENCE_SOURCES = ("folder", "cifar10", "npz")


# ------------------------------------------------------------------------------------ fid --images

def image_file_batches(path: str | os.PathLike, batch_size: int, channels: int = 3,
                  option: str = "--images") -> tuple[int, Iterator[torch.Tensor]]:
    """(number of images, iterator of uint8 ``[B, C, H, W]`` batches) of what ``path`` names (see the module).

    Folder images are read recursively in sorted order (hidden files left out) and converted to
    ``channels`` (RGB or L) as torch-fidelity's loader does; .npz images are used as stored.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DistillKacError(f"{option}: {source} does not exist")
    if source.is_dir():
        source = sample_output(source) or source
        if source.is_dir():
            return _folder_batches(source, batch_size, channels, option)
    images = read_npz_images(source, option)
    return images.shape[0], (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))


def sample_output(directory: Path) -> Path | None:
    """The images of a directory ``sample --out`` wrote: its ``samples.npz``, else its ``images/`` folder
    (when the .npz was removed); None for any other directory."""
    if (directory / SAMPLES_FILE).is_file():
        return directory / SAMPLES_FILE
    if (directory / IMAGES_DIR).is_dir() and (directory / "grid.png").is_file():
        return directory / IMAGES_DIR
    return None


def _folder_batches(folder: Path, batch_size: int, channels: int, option: str
                    ) -> tuple[int, Iterator[torch.Tensor]]:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_FILE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DistillKacError(f"{option}: no PNG/JPEG files in {folder}")

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(files), batch_size):
            arrays = [_read_image(f, channels, option) for f in files[start:start + batch_size]]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise DistillKacError(f"{option}: images in {folder} differ in size: {sorted(shapes)}")
            yield torch.from_numpy(np.stack(arrays))

    return len(files), batches()


def _read_image(file: Path, channels: int, option: str) -> np.ndarray:
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DistillKacError(f"{option}: cannot read {file} as an image ({err})") from err
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_npz_images(file: Path, option: str) -> torch.Tensor:
    """The uint8 images ``[N, C, H, W]`` of an .npz (key "samples" or "images"; stored NCHW or NHWC)."""
    problem = f"{option}: {file} is not a folder of images or an .npz with the key 'samples' or 'images'"
    arrays = read_npz(file, (), problem, optional=NPZ_KEYS)
    key = next((k for k in NPZ_KEYS if k in arrays), None)
    if key is None:
        raise DistillKacError(problem)
    images = arrays[key]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DistillKacError(f"{option}: {file} key {key!r} must hold uint8 images [N, C, H, W] or "
                              f"[N, H, W, C], got {images.dtype} {list(images.shape)}")
    if images.shape[1] not in (1, 3):
        if images.shape[3] not in (1, 3):
            raise DistillKacError(f"{option}: {file} key {key!r} has no channel axis of size 1 or 3: "
                                  f"{list(images.shape)}")
        images = images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images))


# ---------------------------------------------------------------------------------------- ref --data

def infer_source(path: str | os.PathLike) -> tuple[str, Path]:
    """The loader for ``ref --data`` and what it reads: "npz" for an .npz file or the directory ``sample``
    wrote (its samples.npz), "cifar10" for a folder with the CIFAR-10 batches (in it or in its
    ``cifar-10-batches-py``), else "folder" (an image folder or zip)."""
    path = Path(path).expanduser()
    written = sample_output(path) if path.is_dir() else None
    if written is not None:
        return ("npz" if written.is_file() else "folder"), written
    if path.suffix.lower() == ".npz" and path.is_file():
        return "npz", path
    if find_cifar_batches(path) is not None:
        return "cifar10", path
    return "folder", path


def load_reference_images(source: str, path: str | os.PathLike, split: str, *, resolution: int | None,
                          channels: int | None, bad_files: str, progress: bool = True) -> InMemoryDataset:
    """The images of a reference set: an .npz of images as stored (``split`` does not apply), or the
    dataset ``source`` loads. Folders are read unlabelled, at the images' own size and channels (as
    ``train`` reads them, from the train/ images when there are splits) unless ``resolution`` or
    ``channels`` is given; images of several sizes need ``resolution``."""
    if source == "folder" and (resolution is None or channels is None):
        info = inspect_images(path, labels="none")
        resolution = resolution or info.resolution()
        channels = channels or info.channels
    if source != "npz":
        config = DataConfig(name=source, path=str(path), resolution=resolution, channels=channels,
                            bad_files=bad_files, labels="none" if source == "folder" else "auto")
        return load_dataset(config, split, progress)
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistillKacError(f"--data: {file} does not exist")
    images = read_npz_images(file, "--data")
    info = {"name": "npz", "split": "all", "source": str(file.resolve()), "source_format": "npz",
            "preprocessing": "uint8 images as stored"}
    return InMemoryDataset(images, torch.zeros(images.shape[0], dtype=torch.long), num_classes=0,
                           class_names=(), hflip=False, info=info)
