"""FID: torch-fidelity's Inception features, reference statistics, and the distance to them.

FID (method.md §6) follows the standard protocol: uint8 images at their own resolution go into
torch-fidelity's ``inception-v3-compat`` network (the TF Inception v3 "2015-12-05" graph), which resizes
them to 299x299 internally with TF1-style bilinear interpolation; nothing is pre-resized here. The
pool3 (2048-d) features are streamed into float64 moments (``stats.Moments``), so 50k samples never sit
in memory, and

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

Reference statistics are ``.npz`` files with the mean, the covariance and JSON metadata (dataset,
split, count, resolution, preprocessing, the sha256 of the Inception weights and of the arrays).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distillkac.data import to_uint8
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_bytes, sha256_bytes, sha256_file
from distillkac.metrics.stats import GaussianStats, Moments, frechet_distance
from distillkac.npz import SideFile, read_npz
from distillkac.runtime import resolve_device

WEIGHTS_ENV = "DISTILLKAC_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS_ID = "torch-fidelity-default"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
FEATURE_DIM = 2048
REFERENCE_FORMAT = "distillkac-fid-reference"
REFERENCE_VERSION = 1
PROGRESS_FORMAT = "distillkac-fid-reference-progress"
PREPROCESSING = ("uint8 images at their own resolution (float [-1, 1] converted by round((x + 1) * 127.5)); "
                 "1-channel images repeated to 3 channels; torch-fidelity inception-v3-compat resizes to "
                 "299x299 (TF1 bilinear) internally; pool3 2048-d features")
_WEIGHTS_HINT = ("pass --inception-weights PATH or set DISTILLKAC_INCEPTION_WEIGHTS "
                 "(the standard pt_inception-2015-12-05 pool3 weights)")


# ----------------------------------------------------------------------------- Inception features

def resolve_inception_weights(path: str | os.PathLike | None) -> str | None:
    """The Inception weights file to use: ``path``, else ``$DISTILLKAC_INCEPTION_WEIGHTS``, else None
    (torch-fidelity's own copy, downloaded once into the torch hub cache)."""
    source = "--inception-weights"
    if path is None or str(path) == "":
        path, source = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if path is None:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DistillKacError(f"{source}: Inception weights file {resolved} does not exist; {_WEIGHTS_HINT}")
    return str(resolved)


def inception_weights_id(weights_path: str | os.PathLike | None) -> str:
    """The weights identity stored in reference files: the file's sha256, or "torch-fidelity-default"."""
    return sha256_file(weights_path) if weights_path else DEFAULT_WEIGHTS_ID


def _build_inception(weights_path: str | None) -> nn.Module:
    # torch-fidelity pulls in torchvision and scipy: imported only when an Inception network is built.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights_path is None:
        try:
            return FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER])
        except (OSError, RuntimeError, http.client.HTTPException) as err:
            raise DistillKacError(f"--inception-weights: could not download torch-fidelity's Inception "
                                  f"weights ({type(err).__name__}); {_WEIGHTS_HINT}") from err
    # torch-fidelity loads the file with weights_only=False (arbitrary pickles); refuse anything that
    # is not a plain tensor state_dict before it gets there.
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise DistillKacError(f"--inception-weights: {weights_path} is not a torch state_dict file "
                              f"({type(err).__name__}); {_WEIGHTS_HINT}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistillKacError(f"--inception-weights: {weights_path} is not a state_dict of tensors; "
                              f"{_WEIGHTS_HINT}")
    del state
    try:
        return FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER],
                                           feature_extractor_weights_path=weights_path)
    except RuntimeError as err:
        raise DistillKacError(f"--inception-weights: {weights_path} does not fit torch-fidelity's "
                              f"Inception v3; {_WEIGHTS_HINT}") from err


class InceptionFeatures:
    """Pool3 features of torch-fidelity's ``inception-v3-compat`` network (the standard FID features).

    Call it on uint8 images ``[B, C, H, W]`` at their native resolution (C = 1 or 3; a 1-channel image
    is repeated to 3 channels, as PIL's convert("RGB") does for grayscale files); it returns float64
    features ``[B, 2048]`` on ``device``, computed in chunks of ``batch_size``. Only the pool3 output
    is used, so a weights file whose fc layer is NaN (the offline pool3-only file) is fine.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 250) -> None:
        if batch_size < 1:
            raise DistillKacError(f"--batch: must be a positive integer, got {batch_size}")
        self.weights_path = resolve_inception_weights(weights_path)
        self.weights_id = inception_weights_id(self.weights_path)
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.batch_size = int(batch_size)
        self.model = _build_inception(self.weights_path).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DistillKacError(f"images: Inception features need uint8 [B, 1 or 3, H, W], got "
                                  f"{images.dtype} {list(images.shape)}")
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            if chunk.shape[1] == 1:
                chunk = chunk.repeat(1, 3, 1, 1)
            (features,) = self.model(chunk)
            chunks.append(features.to(torch.float64))
        if not chunks:
            return torch.zeros((0, FEATURE_DIM), dtype=torch.float64, device=self.device)
        features = torch.cat(chunks)
        if not torch.isfinite(features).all():
            raise DistillKacError(f"--inception-weights: {self.weights_path or DEFAULT_WEIGHTS_ID} gives "
                                  f"non-finite pool3 features; {_WEIGHTS_HINT}")
        return features


def checked_image_batches(batches: Iterable[torch.Tensor], on_first_shape) -> Iterator[torch.Tensor]:
    """Pass uint8 ``[B, C, H, W]`` batches through, refusing other types and a change of image shape.

    ``on_first_shape((C, H, W))`` is called before the first batch is passed on (to check it early).
    """
    first_shape = None
    for batch in batches:
        if batch.dtype != torch.uint8 or batch.ndim != 4:
            raise DistillKacError(f"images: expected uint8 batches [B, C, H, W] (see to_uint8), got "
                                  f"{batch.dtype} {list(batch.shape)}")
        shape = tuple(int(s) for s in batch.shape[1:])
        if first_shape is None:
            first_shape = shape
            on_first_shape(shape)
        elif shape != first_shape:
            raise DistillKacError(f"images: all images must share one shape; got {list(first_shape)} and "
                                  f"then {list(shape)}")
        yield batch


def feature_stats(batches: Iterable[torch.Tensor], extractor, progress: bool = True,
                  total: int | None = None, desc: str = "Inception features") -> GaussianStats:
    """Gaussian statistics of ``extractor`` features ``[B, D]`` of uint8 image batches, streamed in float64
    (``total``: the number of images, for the progress bar only)."""
    moments = Moments.empty()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            moments = moments.add(extractor(batch))
            bar.update(int(batch.shape[0]))
    return moments.stats()


# ------------------------------------------------------------------------------ reference files

@dataclass
class Reference:
    """FID reference statistics and their metadata (see ``save_reference``)."""

    stats: GaussianStats
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def reference_meta(dataset_description: dict[str, Any], split: str, count: int, image_shape: tuple[int, ...],
                   weights_id: str, **extra: Any) -> dict[str, Any]:
    """The metadata stored with reference statistics (``save_reference`` adds format and hashes)."""
    channels, height, width = image_shape
    return {"dataset": dataset_description, "split": split, "count": int(count),
            "resolution": [int(height), int(width)], "channels": int(channels),
            "preprocessing": PREPROCESSING, "feature_extractor": f"torch-fidelity {EXTRACTOR_NAME} pool3",
            "weights_sha256": weights_id, **extra}


def compute_reference(dataset, split: str, extractor: InceptionFeatures, batch_size: int | None = None,
                      limit: int | None = None, seed: int = 0, progress: bool = True,
                      progress_file: str | os.PathLike | None = None, save_every: int = 20) -> Reference:
    """Reference statistics of ``dataset`` (a distillkac.data dataset of images), unflipped.

    With ``limit`` a subset of ``limit`` images is used, chosen by a permutation from a generator
    seeded with ``seed`` (sorted, so the order of the files does not matter).

    With ``progress_file`` the exact float64 moments are written there (atomically) every
    ``save_every`` batches, and a progress file left by an interrupted call with the same dataset,
    images, batch size and Inception weights is continued from: the result equals an uninterrupted
    call bit for bit. The caller deletes the file once the statistics are saved.
    """
    if len(dataset.data_shape) != 3:
        raise DistillKacError(f"--dataset: FID statistics need images, got data of shape "
                              f"{dataset.data_shape}")
    indices = torch.arange(len(dataset))
    if limit is not None:
        if limit < 2:
            raise DistillKacError(f"--limit: must be at least 2, got {limit}")
        if limit < len(dataset):
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values
    step = batch_size or extractor.batch_size
    starts = range(0, len(indices), step)
    fingerprint = {"format": PROGRESS_FORMAT, "dataset": dataset.describe(), "split": split,
                   "indices_sha256": sha256_bytes(indices.numpy().astype("<i8").tobytes()),
                   "batch_size": int(step), "weights_sha256": extractor.weights_id}
    side_file = None if progress_file is None else SideFile(
        Path(progress_file), {"fingerprint": json.dumps(fingerprint, sort_keys=True)}, done_key="batches_done")
    done, restored = 0, None
    if side_file is not None:
        done, restored = side_file.restore(("count",), lambda arrays, _: Moments.from_arrays(arrays),
                                           optional=("mean", "scatter", "shift", "sum", "outer"))
    moments = restored or Moments.empty()
    with tqdm(total=len(indices), initial=min(done * step, len(indices)), desc=f"reference {split}",
              unit="img", disable=not progress) as bar:
        for number, start in enumerate(starts[done:], start=done + 1):
            batch = to_uint8(dataset.get_batch(indices[start:start + step])[0])
            moments = moments.add(extractor(batch))
            bar.update(int(batch.shape[0]))
            if side_file is not None and number % save_every == 0 and number < len(starts):
                side_file.save(number, moments.arrays())
    stats = moments.stats()
    subset = {"subset": {"limit": int(limit), "seed": int(seed)}} if len(indices) < len(dataset) else {}
    meta = reference_meta(dataset.describe(), split, stats.count, dataset.data_shape, extractor.weights_id,
                          **subset)
    return Reference(stats, meta)


def save_reference(path: str | os.PathLike, stats: GaussianStats, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``mu``, ``sigma`` (float64) and ``meta`` (JSON) to an .npz atomically; returns the full meta.

    The stored metadata gains "format", "version", "count" and "stats_sha256" (GaussianStats.sha256),
    which ``load_reference`` checks.
    """
    full_meta = {**meta, "format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "count": int(stats.count),
                 "stats_sha256": stats.sha256()}
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.asarray(stats.mu, dtype=np.float64),
             sigma=np.asarray(stats.sigma, dtype=np.float64),
             meta=np.array(json.dumps(full_meta, sort_keys=True)))
    atomic_write_bytes(Path(path), buffer.getvalue())
    return full_meta


def load_reference(path: str | os.PathLike) -> Reference:
    """Read and verify reference statistics written by ``save_reference`` (no pickles are loaded)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DistillKacError(f"--ref: reference statistics file {file} does not exist")
    not_reference = f"--ref: {file} is not a distillkac reference statistics file"
    arrays = read_npz(file, ("mu", "sigma", "meta"), not_reference)
    mu, sigma = arrays["mu"], arrays["sigma"]
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as err:
        raise DistillKacError(f"{not_reference} (its meta is not JSON)") from err
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT:
        raise DistillKacError(f"--ref: {file} is not a distillkac reference statistics file (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if mu.dtype != np.float64 or sigma.dtype != np.float64 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DistillKacError(f"--ref: {file} has arrays of the wrong type/shape: mu {mu.dtype} {mu.shape}, "
                              f"sigma {sigma.dtype} {sigma.shape}")
    missing = sorted({"count", "resolution", "channels", "weights_sha256", "stats_sha256"} - set(meta))
    if missing:
        raise DistillKacError(f"--ref: {file} lacks the metadata {', '.join(missing)}")
    stats = GaussianStats(mu, sigma, int(meta["count"]))
    if stats.sha256() != meta.get("stats_sha256"):
        raise DistillKacError(f"--ref: {file} is corrupt or was altered: its statistics do not match the "
                              f"stats_sha256 recorded in it")
    return Reference(stats, meta, str(file))


def check_reference_compatible(ref: Reference, weights_id: str,
                               image_shape: tuple[int, ...] | None = None) -> None:
    """Refuse a reference made with other Inception weights or (when given) for images of another shape."""
    name = ref.path or "reference"
    if ref.meta.get("weights_sha256") != weights_id:
        raise DistillKacError(f"--ref: {name} was made with Inception weights "
                              f"{ref.meta.get('weights_sha256')}, but these features use {weights_id}; "
                              f"use the same weights file for both")
    if image_shape is None:
        return
    channels, height, width = image_shape
    if ref.meta.get("resolution") != [height, width]:
        raise DistillKacError(f"--ref: {name} is for {ref.meta.get('resolution')} images, but the images are "
                              f"{[height, width]}; FID compares images at the same resolution")
    if ref.meta.get("channels") != channels:
        raise DistillKacError(f"--ref: {name} is for {ref.meta.get('channels')}-channel images, but the "
                              f"images have {channels} channel(s)")


def fid_against_reference(batches: Iterable[torch.Tensor], ref: Reference, extractor: InceptionFeatures,
                          progress: bool = True, total: int | None = None) -> dict[str, Any]:
    """FID of uint8 image batches ``[B, C, H, W]`` against reference statistics.

    The weights are checked before any image is processed and the image shape on the first batch.
    Returns ``fid_record`` and the images' "resolution".
    """
    check_reference_compatible(ref, extractor.weights_id)
    shapes: list[tuple[int, ...]] = []

    def check_first(shape: tuple[int, ...]) -> None:
        check_reference_compatible(ref, extractor.weights_id, shape)
        shapes.append(shape)

    stats = feature_stats(checked_image_batches(batches, check_first), extractor, progress=progress,
                          total=total, desc="FID features")
    return {**fid_record(stats, ref, extractor.weights_id), "resolution": list(shapes[0][1:])}


def fid_record(stats: GaussianStats, ref: Reference, weights_id: str) -> dict[str, Any]:
    """{"fid", "num_images", "label" (fid_label), "reference_count", "weights_sha256"} of ``stats``."""
    fid = frechet_distance(stats.mu, stats.sigma, ref.stats.mu, ref.stats.sigma)
    return {"fid": fid, "num_images": stats.count, "label": fid_label(stats.count),
            "reference_count": int(ref.stats.count), "weights_sha256": weights_id}


def fid_label(num_images: int) -> str:
    """The name of an FID computed on ``num_images`` samples: "FID-50k", "FID-5k", "FID-1234"."""
    if num_images >= 1000 and num_images % 1000 == 0:
        return f"FID-{num_images // 1000}k"
    return f"FID-{num_images}"
