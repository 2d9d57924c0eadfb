"""Image datasets: CIFAR-10 (the official batches, or JPEG/PNG folders and zips), image folders/zips with
class sub-folders (what fid and ref read is in ``distillkac.metrics.inputs``).

Image folders and zips are decoded once, at load time, with a thread pool; that is fine for CIFAR-10 (60k
images) and CelebA-64 (200k images, about 2.5 GB at 64x64), but a dataset the size of LSUN Bedroom at
256x256 must first be pre-resized or subset by the user. Nothing is cached on disk and nothing is
downloaded unless ``DataConfig.download`` asks for it (CIFAR-10 only, through torchvision).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from distillkac.data.dataset import SPLITS, DataConfig, InMemoryDataset, check_native_shape, scale_info
from distillkac.errors import DistillKacError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)

RESAMPLING = Image.Resampling.LANCZOS
_DECODE_CHUNK = 1024


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


def find_cifar_batches(path: Path) -> Path | None:
    """The folder holding the official batches: ``path`` itself or ``path/cifar-10-batches-py``."""
    batches = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
    return next((folder for folder in (path, path / "cifar-10-batches-py")
                 if any((folder / n).is_file() for n in batches)), None)


def _holds_images(path: Path) -> bool:
    """Whether ``path`` is a file (read as a zip, never downloaded over) or a folder with image files."""
    return path.exists() and (not path.is_dir() or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")))


def _download_cifar10(path: Path) -> Path:
    import torchvision  # optional and slow to import: only for a download

    path.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(root=str(path), train=True, download=True)
    folder = find_cifar_batches(path)
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
    info = {"name": "cifar10", "split": split, "source": str(folder.resolve()), "source_format": "cifar-batches",
            "preprocessing": f"official uint8 pixels; {scale_info(cfg.hflip)}"}
    return InMemoryDataset(images, labels, num_classes=10, class_names=CIFAR10_CLASSES, hflip=cfg.hflip,
                           info=info)


def load_cifar10(cfg: DataConfig, split: str, progress: bool = True) -> InMemoryDataset:
    check_native_shape(cfg, 32, 3)
    if cfg.path is None:
        raise DistillKacError("data.path: the cifar10 dataset needs a path (--data): the cifar-10-batches-py "
                              "folder, a .zip or folder with train/<class>/ and test/<class>/ images, or a "
                              "folder to download into with data.download=true")
    path = Path(cfg.path).expanduser()
    folder = find_cifar_batches(path)
    if folder is None and cfg.download and not _holds_images(path):
        folder = _download_cifar10(path)
    if folder is not None:
        return _load_cifar_batches(cfg, split, folder)
    return _decode_dataset(cfg, split, path, _cifar_decoder, (3, 32, 32), "decoded 32x32 images as RGB uint8",
                           progress, require_split=True, labels="subfolders")


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

    def header(self, name: str) -> tuple[tuple[int, int], str] | None:
        """``((width, height), PIL mode)`` of an image file from its header; None if it is not readable."""
        try:
            stream = self._zip.open(name) if self._zip is not None else open(self.path / name, "rb")
            with stream, Image.open(stream) as image:
                return image.size, image.mode
        except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError):
            return None

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
    labelled = labels in ("subfolders", "folders") or (labels == "auto" and flat is None and len(class_set) >= 2)
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
    except Image.UnidentifiedImageError:
        return "not in an image format that Pillow recognises"
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _decode_index(source: _ImageSource, index: _ImageIndex, convert: _Converter, shape: tuple[int, int, int],
                  bad_files: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
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
                                                   disable=not progress or len(index.names) < 5000) as bar:
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


def _folder_decoder(mode: str, resolution: int, name: str, image: Image.Image) -> np.ndarray:
    return np.asarray(centre_crop_resize(image.convert(mode), resolution))


def load_folder(cfg: DataConfig, split: str, progress: bool = True) -> InMemoryDataset:
    if cfg.path is None:
        raise DistillKacError("data.path: the folder dataset needs a path (--data) to a folder or .zip of "
                              "images")
    if cfg.resolution is None:
        raise DistillKacError("data.resolution: the folder dataset needs a resolution (e.g. 64); images are "
                              "centre-cropped to a square and resized to it")
    channels, side = cfg.channels or 3, cfg.resolution
    mode = "RGB" if channels == 3 else "L"
    preprocessing = f"{mode}; centre crop to a square; PIL LANCZOS (antialiased) resize to {side}x{side}"
    return _decode_dataset(cfg, split, Path(cfg.path).expanduser(), functools.partial(_folder_decoder, mode, side),
                           (channels, side, side), preprocessing, progress, require_split=False, labels=cfg.labels)


def _decode_dataset(cfg: DataConfig, split: str, path: Path, convert: _Converter, shape: tuple[int, int, int],
                    preprocessing: str, progress: bool, **index_options: Any) -> InMemoryDataset:
    """The ``split`` images of the folder or zip ``path``, decoded by ``convert`` to uint8 ``shape``."""
    with _open_image_source(path) as source:
        index = _index_images(source, split, cfg.name, **index_options)
        images, labels, skipped = _decode_index(source, index, convert, shape, cfg.bad_files, progress)
    info = {"name": cfg.name, "split": index.split, "source": str(path.resolve()), "source_format": source.kind,
            "ignored_files": source.ignored, "preprocessing": f"{preprocessing}; {scale_info(cfg.hflip)}"}
    return InMemoryDataset(images, labels, num_classes=len(index.class_names), class_names=index.class_names,
                           hflip=cfg.hflip, info=info, skipped=skipped)


# ------------------------------------------------------------------------- what a folder holds

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
"""PIL modes of single-channel images (palette images count as colour)."""


@dataclass(frozen=True)
class ImageSetInfo:
    """What a folder or zip of images holds, read from the file headers (nothing is decoded): the
    number of readable images, how many have each size ``(width, height)``, 1 channel if every image
    is greyscale (else 3), the class names (empty when unlabelled) and the unreadable files."""

    path: Path
    count: int
    sizes: dict[tuple[int, int], int]
    channels: int
    class_names: tuple[str, ...]
    unreadable: int

    def resolution(self) -> int:
        """The side of the square the images are used at: the shorter side of their one size (square
        images are used as they are); images of several sizes need ``--resolution``."""
        if len(self.sizes) == 1:
            return min(next(iter(self.sizes)))
        common = sorted(self.sizes.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in common[:3]) + (", ..." if len(common) > 3 else "")
        raise DistillKacError(f"--resolution: the {self.count} images in {self.path} come in {len(self.sizes)} "
                              f"sizes ({listed}); give --resolution N to centre-crop and resize them all to NxN")


def inspect_images(path: str | os.PathLike, labels: str = "auto") -> ImageSetInfo:
    """Sizes, channels and classes of the images a folder dataset at ``path`` would load (its train/
    sub-folder if it has one), with ``labels`` as in :class:`DataConfig`."""
    path = Path(path).expanduser()
    with _open_image_source(path) as source:
        index = _index_images(source, "train", "folder", require_split=False, labels=labels)
        headers = [source.header(name) for name in index.names]
    readable = [header for header in headers if header is not None]
    if not readable:
        raise DistillKacError(f"data.path: none of the {len(headers)} image files in {path} could be read")
    sizes: dict[tuple[int, int], int] = {}
    for size, _ in readable:
        sizes[size] = sizes.get(size, 0) + 1
    channels = 1 if all(mode in GREY_MODES for _, mode in readable) else 3
    return ImageSetInfo(path=path, count=len(readable), sizes=sizes, channels=channels,
                        class_names=index.class_names, unreadable=len(headers) - len(readable))
