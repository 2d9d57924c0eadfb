"""Datasets: scikit-learn digits, CIFAR-10, image folders/zips and labelled 2-D toys.

Every dataset is held in memory: images as one uint8 tensor ``[N, C, H, W]``, toy points as one float32
tensor ``[N, 2]``, labels as a LongTensor ``[N]``. ``get_batch`` turns rows into the library's model
inputs (images as float32 in ``[-1, 1]``). Image folders and zips are decoded once, at load time, with a
thread pool; that is fine for CIFAR-10 (60k images) and CelebA-64 (200k images, about 2.5 GB at
64x64), but a dataset the size of LSUN Bedroom at 256x256 must first be pre-resized or subset by the user.
Nothing is cached on disk and nothing is downloaded unless ``DataConfig.download`` asks for it (CIFAR-10
only, through torchvision).

Unlabelled datasets have ``num_classes = 0`` and all labels 0, which is the null label of an
unconditional model (see docs/architecture.md, "Conventions").
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from distillkac.errors import DistillKacError
from distillkac.rng import GeneratorLike, rand

DATASET_NAMES = ("digits", "cifar10", "folder", "toy2d")
SPLITS = ("train", "test")
BAD_FILE_POLICIES = ("skip", "error")
TOY_NAMES = ("grid", "checkerboard")
LABEL_MODES = ("auto", "folders", "none")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)

#: The fixed digits split: 297 of the 1797 images are held out, stratified by class, chosen with a
#: torch.Generator seeded with DIGITS_SPLIT_SEED (independent of DataConfig.seed).
DIGITS_TEST_SIZE = 297
DIGITS_SPLIT_SEED = 2509

#: Toy "grid": a 4x4 grid of equally weighted isotropic Gaussians, one class per mode, means at
#: {-0.75, -0.25, 0.25, 0.75}^2 (class k = row k // 4, column k % 4), standard deviation 0.05.
GRID_SIDE = 4
GRID_SPACING = 0.5
GRID_STD = 0.05
#: Toy "checkerboard": [-1, 1]^2 cut into 4x4 squares of side 0.5; the 8 squares with (row + column)
#: even are filled, each is one class, and points are uniform inside their square.
CHECKER_SIDE = 4

RESAMPLING = Image.Resampling.LANCZOS
_DECODE_CHUNK = 1024


@dataclass
class DataConfig:
    """Which dataset to load and how (the ``data`` part of a RunConfig).

    ``labels`` applies to the folder dataset: "auto" labels images by their top-level sub-folder when
    there are at least two such sub-folders and every image is inside one, "folders" demands that,
    "none" makes the set unconditional (use it for nested exports such as LSUN's hashed folders).
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


def load_dataset(cfg: DataConfig, split: str = "train") -> InMemoryDataset:
    """Load the ``split`` ("train" or "test") of the dataset that ``cfg`` names."""
    _check_config(cfg, split)
    loader = {"digits": _load_digits, "cifar10": _load_cifar10, "folder": _load_folder, "toy2d": _load_toy2d}
    return loader[cfg.name](cfg, split)


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


def _check_native_shape(cfg: DataConfig, resolution: int, channels: int) -> None:
    """Digits and CIFAR-10 are used at their own size: a different resolution/channels is an error."""
    if cfg.resolution is not None and cfg.resolution != resolution:
        raise DistillKacError(f"data.resolution: {cfg.name} images are {resolution}x{resolution}, "
                              f"got resolution {cfg.resolution} (leave it unset or set {resolution})")
    if cfg.channels is not None and cfg.channels != channels:
        raise DistillKacError(f"data.channels: {cfg.name} images have {channels} channel(s), "
                              f"got channels {cfg.channels} (leave it unset or set {channels})")


def _scale_info(hflip: bool) -> str:
    flip = "; random horizontal flip with probability 1/2 in get_batch" if hflip else ""
    return f"uint8 v -> v / 127.5 - 1 in [-1, 1]{flip}"


# ----------------------------------------------------------------------------------------- digits

def digits_split_indices(split: str) -> torch.Tensor:
    """Sorted indices into ``sklearn.datasets.load_digits()`` of the fixed train (1500) / test (297) split.

    Per class, a test share proportional to the class size (largest remainders to reach 297 in all)
    is drawn by a permutation from ``torch.Generator().manual_seed(DIGITS_SPLIT_SEED)``.
    """
    from sklearn.datasets import load_digits

    targets = torch.as_tensor(load_digits().target, dtype=torch.long)
    classes, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * DIGITS_TEST_SIZE / targets.numel()
    quota = exact.floor().long()
    shortfall = DIGITS_TEST_SIZE - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:shortfall]] += 1
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test = []
    for cls, take in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(targets == cls).flatten()
        test.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    is_test = torch.zeros(targets.numel(), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(is_test if split == "test" else ~is_test).flatten()


def _load_digits(cfg: DataConfig, split: str) -> InMemoryDataset:
    from sklearn.datasets import load_digits

    _check_native_shape(cfg, 8, 1)
    bunch = load_digits()
    indices = digits_split_indices(split)
    values = torch.as_tensor(bunch.images, dtype=torch.float64)[indices]
    images = torch.round(values * (255.0 / 16.0)).to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)[indices]
    info = {"name": "digits", "split": split, "source": "sklearn.datasets.load_digits (bundled 8x8 digits)",
            "source_format": "sklearn",
            "preprocessing": f"values 0..16 -> round(v * 255 / 16) uint8; {_scale_info(cfg.hflip)}; fixed "
                             f"stratified split: {DIGITS_TEST_SIZE} test images, seed {DIGITS_SPLIT_SEED}"}
    dataset = InMemoryDataset(images, labels, num_classes=10, class_names=[str(d) for d in range(10)],
                              hflip=cfg.hflip, info=info)
    dataset.source_indices = indices
    return dataset


# ---------------------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR-10 batches (dicts of numpy arrays, lists, bytes) and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DistillKacError(f"data.path: {file} is not a CIFAR-10 python batch ({err})") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise DistillKacError(f"data.path: {file} is not a CIFAR-10 python batch (expected uint8 data "
                              f"[N, 3072] and N labels, got {data.dtype} {list(data.shape)})")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DistillKacError(f"data.path: {file} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar_batches(path: Path) -> Path | None:
    """The folder holding the official batches: ``path`` itself or ``path/cifar-10-batches-py``."""
    for folder in (path, path / "cifar-10-batches-py"):
        batches = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
        if folder.is_dir() and any((folder / n).is_file() for n in batches):
            return folder
    return None


def _holds_images(path: Path) -> bool:
    """Whether ``path`` is a file (read as a zip, never downloaded over) or a folder with image files."""
    if not path.exists():
        return False
    if not path.is_dir():
        return True
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))


def _download_cifar10(path: Path) -> Path:
    import torchvision

    path.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(root=str(path), train=True, download=True)
    folder = _find_cifar_batches(path)
    if folder is None:
        raise DistillKacError(f"data.path: the CIFAR-10 download into {path} left no cifar-10-batches-py "
                              f"folder")
    return folder


def _load_cifar_batches(cfg: DataConfig, split: str, folder: Path) -> InMemoryDataset:
    names = CIFAR10_TRAIN_BATCHES if split == "train" else CIFAR10_TEST_BATCHES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DistillKacError(f"data.path: {folder} lacks the CIFAR-10 batch file(s) {', '.join(missing)}")
    arrays = [_read_cifar_batch(folder / n) for n in names]
    images = torch.from_numpy(np.concatenate([a for a, _ in arrays]))
    labels = torch.from_numpy(np.concatenate([b for _, b in arrays]))
    info = {"name": "cifar10", "split": split, "source": str(folder.resolve()),
            "source_format": "cifar-batches",
            "preprocessing": f"official uint8 pixels; {_scale_info(cfg.hflip)}"}
    return InMemoryDataset(images, labels, num_classes=10, class_names=CIFAR10_CLASSES, hflip=cfg.hflip,
                           info=info)


def _load_cifar10(cfg: DataConfig, split: str) -> InMemoryDataset:
    _check_native_shape(cfg, 32, 3)
    if cfg.path is None:
        raise DistillKacError("data.path: the cifar10 dataset needs a path (--data): the cifar-10-batches-py "
                              "folder, a .zip or folder with train/<class>/ and test/<class>/ images, or a "
                              "folder to download into with data.download=true")
    path = Path(cfg.path).expanduser()
    folder = _find_cifar_batches(path)
    if folder is None and cfg.download and not _holds_images(path):
        folder = _download_cifar10(path)
    if folder is not None:
        return _load_cifar_batches(cfg, split, folder)
    with _open_image_source(path) as source:
        index = _index_images(source, split, cfg.name, require_split=True, labels="folders")
        images, labels, skipped = _decode_index(source, index, _cifar_decoder, (3, 32, 32), cfg.bad_files)
    info = {"name": "cifar10", "split": split, "source": str(path.resolve()), "source_format": source.kind,
            "ignored_files": source.ignored,
            "preprocessing": f"decoded 32x32 images as RGB uint8; {_scale_info(cfg.hflip)}"}
    return InMemoryDataset(images, labels, num_classes=len(index.class_names), class_names=index.class_names,
                           hflip=cfg.hflip, info=info, skipped=skipped)


def _cifar_decoder(name: str, image: Image.Image) -> np.ndarray:
    if image.size != (32, 32):
        raise DistillKacError(f"data.path: cifar10 images must all be 32x32; {name} is "
                              f"{image.size[0]}x{image.size[1]} (use the folder dataset to resize)")
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------- image folders

class _ImageSource:
    """The image files of a folder or a zip archive, listed once (sorted, hidden files left out)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.kind = "folder-images"
            files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        elif zipfile.is_zipfile(path):
            self.kind = "zip-images"
            self._zip = zipfile.ZipFile(path)
            files = [info.filename for info in self._zip.infolist() if not info.is_dir()]
        else:
            raise DistillKacError(f"data.path: {path} is neither a folder, a .zip archive, nor a "
                                  f"cifar-10-batches-py folder")
        files = [f for f in files if not any(p.startswith(".") or p == "__MACOSX" for p in f.split("/"))]
        self.names = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        self.ignored = len(files) - len(self.names)

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


@contextmanager
def _open_image_source(path: Path) -> Iterator[_ImageSource]:
    if not path.exists():
        raise DistillKacError(f"data.path: {path} does not exist")
    source = _ImageSource(path)
    try:
        yield source
    finally:
        source.close()


@dataclass
class _ImageIndex:
    names: list[str]
    labels: list[int]
    class_names: tuple[str, ...]
    split: str


def _strip_wrappers(names: list[str]) -> list[tuple[str, ...]]:
    """Path parts with leading folders shared by every file (other than train/test) removed."""
    parts = [tuple(n.split("/")) for n in names]
    while (parts and all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1
           and parts[0][0] not in SPLITS):
        parts = [p[1:] for p in parts]
    return parts


def _index_images(source: _ImageSource, split: str, dataset: str, *, require_split: bool,
                  labels: str) -> _ImageIndex:
    """Which files form ``split`` and their labels; class names come from both splits so they agree.

    With train/ and test/ folders at the top (after shared wrapper folders) the split picks one and
    other top-level files are left out; without them the split is ignored and every image is used.
    """
    if not source.names:
        raise DistillKacError(f"data.path: no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                              f"found in {source.path}")
    parts = _strip_wrappers(source.names)
    has_splits = any(len(p) > 1 and p[0] in SPLITS for p in parts)
    if require_split and not has_splits:
        raise DistillKacError(f"data.path: a {dataset} image set needs train/<class>/ and test/<class>/ "
                              f"sub-folders; none found in {source.path}")
    if has_splits:
        usable = [(n, p[0], p[1:]) for n, p in zip(source.names, parts) if len(p) > 1 and p[0] in SPLITS]
    else:
        usable = [(n, split, p) for n, p in zip(source.names, parts)]
    chosen = [(n, rel) for n, s, rel in usable if s == split]
    if not chosen:
        raise DistillKacError(f"data.path: no images in the {split}/ sub-folder of {source.path}")
    flat = next((n for n, _, rel in usable if len(rel) == 1), None)
    class_set = {rel[0] for _, _, rel in usable if len(rel) > 1}
    labelled = labels == "folders" or (labels == "auto" and flat is None and len(class_set) >= 2)
    split_name = split if has_splits else "all"
    if not labelled:
        return _ImageIndex([n for n, _ in chosen], [0] * len(chosen), (), split_name)
    if flat is not None or len(class_set) < 2:
        where = f"{flat} is not in a class sub-folder" if flat else f"found {len(class_set)} class sub-folder"
        raise DistillKacError(f"data.path: {dataset} labels come from class sub-folders (at least 2); "
                              f"{where} in {source.path}")
    class_names = CIFAR10_CLASSES if class_set == set(CIFAR10_CLASSES) else tuple(sorted(class_set))
    order = {c: i for i, c in enumerate(class_names)}
    chosen.sort(key=lambda item: (order[item[1][0]], item[0]))
    return _ImageIndex([n for n, _ in chosen], [order[rel[0]] for _, rel in chosen], class_names, split_name)


_Converter = Callable[[str, Image.Image], np.ndarray]


def _decode_one(name: str, data: bytes, convert: _Converter) -> np.ndarray | str:
    """The decoded array, or the reason the file could not be read as an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return convert(name, image)
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _decode_index(source: _ImageSource, index: _ImageIndex, convert: _Converter, shape: tuple[int, int, int],
                  bad_files: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every indexed file into one preallocated uint8 tensor ``[N, *shape]`` (shape = C, H, W).

    A thread pool decodes (PIL releases the GIL while decoding and resizing); files are read in chunks
    so that only one chunk of encoded bytes is held at a time.
    """
    images = torch.empty((len(index.names), *shape), dtype=torch.uint8)
    pixels = images.numpy()
    labels: list[int] = []
    skipped: list[str] = []
    first_reason = ""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(index.names), desc="decoding images", unit="img",
                                                   disable=len(index.names) < 5000) as bar:
        for start in range(0, len(index.names), _DECODE_CHUNK):
            names = index.names[start:start + _DECODE_CHUNK]
            blobs = [source.read(n) for n in names]
            results = pool.map(_decode_one, names, blobs, [convert] * len(names))
            for name, label, result in zip(names, index.labels[start:start + _DECODE_CHUNK], results):
                if isinstance(result, str):
                    if bad_files == "error":
                        raise DistillKacError(f"data.path: cannot read {name} in {source.path} as an image "
                                              f"({result}); set data.bad_files=skip to leave such files out")
                    first_reason = first_reason or f"{name}: {result}"
                    skipped.append(name)
                else:
                    pixels[len(labels)] = result.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1)
                    labels.append(label)
            bar.update(len(names))
    if not labels:
        raise DistillKacError(f"data.path: none of the {len(index.names)} image files in {source.path} could "
                              f"be read (first: {first_reason})")
    if skipped:
        warnings.warn(f"data: skipped {len(skipped)} unreadable image file(s) in {source.path} "
                      f"(first: {first_reason})", stacklevel=3)
        images = images[:len(labels)].clone()
    return images, torch.tensor(labels, dtype=torch.long), skipped


def centre_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square of ``image``, resized to ``resolution`` with antialiased LANCZOS.

    Cropping first (rather than ``resize(box=...)``) keeps the filter from reading pixels outside the square.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == resolution:
        return square
    return square.resize((resolution, resolution), RESAMPLING)


def _folder_decoder(resolution: int, channels: int) -> _Converter:
    mode = "RGB" if channels == 3 else "L"

    def convert(name: str, image: Image.Image) -> np.ndarray:
        return np.asarray(centre_crop_resize(image.convert(mode), resolution))

    return convert


def _load_folder(cfg: DataConfig, split: str) -> InMemoryDataset:
    if cfg.path is None:
        raise DistillKacError("data.path: the folder dataset needs a path (--data) to a folder or .zip of "
                              "images")
    if cfg.resolution is None:
        raise DistillKacError("data.resolution: the folder dataset needs a resolution (e.g. 64); images are "
                              "centre-cropped to a square and resized to it")
    channels = cfg.channels or 3
    path = Path(cfg.path).expanduser()
    with _open_image_source(path) as source:
        index = _index_images(source, split, "folder", require_split=False, labels=cfg.labels)
        convert = _folder_decoder(cfg.resolution, channels)
        shape = (channels, cfg.resolution, cfg.resolution)
        images, labels, skipped = _decode_index(source, index, convert, shape, cfg.bad_files)
    info = {"name": "folder", "split": index.split, "source": str(path.resolve()),
            "source_format": source.kind,
            "ignored_files": source.ignored,
            "preprocessing": f"{'RGB' if channels == 3 else 'L'}; centre crop to a square; PIL LANCZOS "
                             f"(antialiased) resize to {cfg.resolution}x{cfg.resolution}; "
                             f"{_scale_info(cfg.hflip)}"}
    return InMemoryDataset(images, labels, num_classes=len(index.class_names), class_names=index.class_names,
                           hflip=cfg.hflip, info=info, skipped=skipped)


# ------------------------------------------------------------------------------------------- toy2d

def toy_mixture(cfg: DataConfig) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The exact "grid" mixture: means float64 [16, 2], the common std, and weights float64 [16].

    The density is sum_k w_k N(x; m_k, std^2 I); class k is mode k.
    """
    if cfg.toy != "grid":
        raise DistillKacError(f"data.toy: only the grid toy is a Gaussian mixture, got {cfg.toy!r}")
    coords = (torch.arange(GRID_SIDE, dtype=torch.float64) - (GRID_SIDE - 1) / 2) * GRID_SPACING
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([cols.flatten(), rows.flatten()], dim=1)
    weights = torch.full((GRID_SIDE * GRID_SIDE,), 1.0 / (GRID_SIDE * GRID_SIDE), dtype=torch.float64)
    return means, GRID_STD, weights


def checkerboard_squares() -> tuple[torch.Tensor, float]:
    """Lower-left corners float64 [8, 2] of the filled squares (class k = square k), and their side.

    The density is uniform, 1 / (8 * side^2), on the filled squares.
    """
    side = 2.0 / CHECKER_SIDE
    corners = [(-1.0 + col * side, -1.0 + row * side)
               for row in range(CHECKER_SIDE) for col in range(CHECKER_SIDE) if (row + col) % 2 == 0]
    return torch.tensor(corners, dtype=torch.float64), side


def toy_split_seed(cfg: DataConfig, split: str) -> int:
    """The generator seed of a toy split: 2*seed for train, 2*seed + 1 for test (never shared)."""
    return 2 * cfg.seed + (1 if split == "test" else 0)


def _load_toy2d(cfg: DataConfig, split: str) -> InMemoryDataset:
    if cfg.resolution is not None or cfg.channels is not None:
        raise DistillKacError("data.resolution/channels: toy2d is 2-D points; leave resolution and channels "
                              "unset")
    if cfg.hflip:
        raise DistillKacError("data.hflip: flips are for images; toy2d needs hflip=false")
    if cfg.toy_size < 1:
        raise DistillKacError(f"data.toy_size: must be a positive integer, got {cfg.toy_size}")
    seed = toy_split_seed(cfg, split)
    generator = torch.Generator().manual_seed(seed)
    if cfg.toy == "grid":
        means, std, weights = toy_mixture(cfg)
        labels = torch.multinomial(weights, cfg.toy_size, replacement=True, generator=generator)
        noise = torch.randn((cfg.toy_size, 2), generator=generator, dtype=torch.float64)
        points = means[labels] + std * noise
        detail = f"4x4 grid of Gaussians, std {std}, spacing {GRID_SPACING}"
    else:
        corners, side = checkerboard_squares()
        weights = torch.full((corners.shape[0],), 1.0 / corners.shape[0], dtype=torch.float64)
        labels = torch.multinomial(weights, cfg.toy_size, replacement=True, generator=generator)
        offsets = torch.rand((cfg.toy_size, 2), generator=generator, dtype=torch.float64)
        points = corners[labels] + side * offsets
        detail = f"{CHECKER_SIDE}x{CHECKER_SIDE} checkerboard on [-1, 1]^2, {corners.shape[0]} filled squares"
    info = {"name": "toy2d", "split": split, "source": f"generated: {cfg.toy}, seed {seed}",
            "source_format": "generated", "toy": cfg.toy,
            "preprocessing": f"{detail}; float32 points used as they are"}
    num_classes = weights.numel()
    kind = "mode" if cfg.toy == "grid" else "square"
    return InMemoryDataset(points.to(torch.float32), labels, num_classes=num_classes,
                           class_names=[f"{kind} {k}" for k in range(num_classes)], hflip=False, info=info)
