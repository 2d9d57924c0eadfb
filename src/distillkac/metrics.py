"""Evaluation metrics: FID on torch-fidelity's Inception features, reference statistics, small-data metrics.

FID (method.md §6) follows the standard protocol: uint8 images at their own resolution go into
torch-fidelity's ``inception-v3-compat`` network (the TF Inception v3 "2015-12-05" graph), which resizes
them to 299x299 internally with TF1-style bilinear interpolation; nothing is pre-resized here. The
pool3 (2048-d) features are streamed into float64 sums, so 50k samples never sit in memory, and

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

Reference statistics are ``.npz`` files with the mean, the covariance and JSON metadata (dataset,
split, count, resolution, preprocessing, the sha256 of the Inception weights and of the arrays).

The CPU-sized datasets have their own metrics, never called FID: for the 8x8 digits a Fréchet
distance in the features of a small CNN classifier trained here ("fd_digits") and in pixel space
("fd_pixels") plus the classifier's agreement with the requested labels; for the 2-D Gaussian
mixture the exact log-likelihood, a sliced Wasserstein distance, mode coverage and mode accuracy.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from distillkac.checkpoint import atomic_write_bytes, sha256_file
from distillkac.data import to_uint8
from distillkac.errors import DistillKacError

WEIGHTS_ENV = "DISTILLKAC_INCEPTION_WEIGHTS"
CACHE_ENV = "DISTILLKAC_CACHE"
DEFAULT_WEIGHTS_ID = "torch-fidelity-default"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
FEATURE_DIM = 2048
REFERENCE_FORMAT = "distillkac-fid-reference"
REFERENCE_VERSION = 1
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg")
PREPROCESSING = ("uint8 images at their own resolution (float [-1, 1] converted by round((x + 1) * 127.5)); "
                 "1-channel images repeated to 3 channels; torch-fidelity inception-v3-compat resizes to "
                 "299x299 (TF1 bilinear) internally; pool3 2048-d features")
_WEIGHTS_HINT = ("pass --inception-weights PATH or set DISTILLKAC_INCEPTION_WEIGHTS "
                 "(the standard pt_inception-2015-12-05 pool3 weights)")


# ------------------------------------------------------------------------------------- small helpers

def fid_label(num_images: int) -> str:
    """The name of an FID computed on ``num_images`` samples: "FID-50k", "FID-5k", "FID-1234"."""
    if num_images >= 1000 and num_images % 1000 == 0:
        return f"FID-{num_images // 1000}k"
    return f"FID-{num_images}"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; other names as torch reads them."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise DistillKacError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DistillKacError(f"--device: {device} was asked for but CUDA is not available; use auto or cpu")
    return resolved


# ----------------------------------------------------------------------------- Inception features

def resolve_inception_weights(path: str | os.PathLike | None) -> str | None:
    """The Inception weights file to use: ``path``, else ``$DISTILLKAC_INCEPTION_WEIGHTS``, else None.

    None means torch-fidelity's own copy (downloaded once into the torch hub cache). A named file
    that does not exist is an error.
    """
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
    ``weights_id`` is the sha256 of the weights file, or "torch-fidelity-default".
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


# --------------------------------------------------------------------------- Gaussian statistics

@dataclass
class GaussianStats:
    """Mean ``mu`` float64 [D] and covariance ``sigma`` float64 [D, D] (divisor N - 1) of N = ``count``."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> GaussianStats:
        """One-shot statistics of a feature matrix ``[N, D]`` (N >= 2), in float64."""
        rows = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] < 2:
            raise DistillKacError(f"features: need at least 2 rows of [N, D] features, got shape "
                                  f"{list(rows.shape)}")
        return cls(rows.mean(axis=0), np.cov(rows, rowvar=False).reshape(rows.shape[1], rows.shape[1]),
                   rows.shape[0])

    def sha256(self) -> str:
        """Digest of the arrays: little-endian float64 bytes of mu, then of sigma (row-major)."""
        digest = hashlib.sha256()
        for array in (self.mu, self.sigma):
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return digest.hexdigest()


class MomentAccumulator:
    """Streaming mean and covariance of feature rows, accumulated in float64.

    Rows are shifted by the first batch's mean before the sums and outer products are accumulated,
    so the covariance (sum of outer products minus n * mean mean^T) does not lose digits to
    cancellation. Sums stay on the device of the features.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        rows = features.detach().to(torch.float64)
        if rows.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(rows.shape)}")
        if rows.shape[0] == 0:
            return
        if self._shift is not None and self._shift.device != rows.device:  # restored on another device
            self._shift, self._sum, self._outer = (t.to(rows.device) for t in (self._shift, self._sum,
                                                                               self._outer))
        if self._shift is None:
            self._shift = rows.mean(dim=0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float64, device=rows.device)
        centred = rows - self._shift
        self._sum += centred.sum(dim=0)
        self._outer += centred.T @ centred
        self.count += rows.shape[0]

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The exact float64 sums (for a progress file); ``from_state_arrays`` restores them bit for bit."""
        if self._shift is None:
            return {"count": np.asarray(0, dtype=np.int64)}
        return {"count": np.asarray(self.count, dtype=np.int64), "shift": self._shift.cpu().numpy(),
                "sum": self._sum.cpu().numpy(), "outer": self._outer.cpu().numpy()}

    @classmethod
    def from_state_arrays(cls, arrays: dict[str, np.ndarray]) -> MomentAccumulator:
        accumulator = cls()
        accumulator.count = int(arrays["count"])
        if accumulator.count:
            accumulator._shift, accumulator._sum, accumulator._outer = (
                torch.from_numpy(np.array(arrays[key], dtype=np.float64)) for key in ("shift", "sum", "outer"))
        return accumulator

    def stats(self) -> GaussianStats:
        if self.count < 2:
            raise DistillKacError(f"images: the statistics need at least 2 images, got {self.count}")
        mean_shifted = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mean_shifted, mean_shifted)) / (self.count - 1)
        sigma = (sigma + sigma.T) / 2
        mu = self._shift + mean_shifted
        return GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy(), self.count)


def checked_image_batches(batches: Iterable[torch.Tensor], on_first_shape=None) -> Iterator[torch.Tensor]:
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
            if on_first_shape is not None:
                on_first_shape(shape)
        elif shape != first_shape:
            raise DistillKacError(f"images: all images must share one shape; got {list(first_shape)} and "
                                  f"then {list(shape)}")
        yield batch


def feature_stats(batches: Iterable[torch.Tensor], extractor, progress: bool = True,
                  total: int | None = None, desc: str = "Inception features") -> GaussianStats:
    """Gaussian statistics of ``extractor`` features over uint8 image batches, streamed in float64.

    ``extractor`` maps a batch to features ``[B, D]`` (an InceptionFeatures); ``total`` is the number
    of images, for the progress bar only.
    """
    accumulator = MomentAccumulator()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            accumulator.update(extractor(batch))
            bar.update(int(batch.shape[0]))
    return accumulator.stats()


def _psd_eigenvalues(name: str, eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off removed.

    Values below ``dim * eps * largest`` (numpy's matrix_rank tolerance) cannot be told from 0 in
    float64 and are set to 0: left in, the square roots of ~1e-16 noise in a rank-deficient matrix (a
    2048-d covariance of a few hundred images) add up to a visible error. A value below -1e-6 times
    the largest is not round-off: the matrix is not a covariance.
    """
    largest = float(np.abs(eigenvalues).max(initial=0.0))
    if eigenvalues.min(initial=0.0) < -1e-6 * largest:
        raise DistillKacError(f"{name}: not a covariance matrix (eigenvalue {eigenvalues.min():.3g} < 0)")
    tolerance = largest * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula), in float64.

    tr((S1 S2)^{1/2}) is computed as the trace of the square root of the symmetric PSD matrix
    S1^{1/2} S2 S1^{1/2} (similar to S1 S2), from symmetric eigen-decompositions: no complex
    arithmetic, so there are no imaginary parts to drop. Round-off eigenvalues (tiny or slightly
    negative) are set to 0, the counterpart of keeping the real part of sqrtm in the usual code;
    see ``_psd_eigenvalues``.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise DistillKacError(f"statistics: shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma "
                              f"{sigma1.shape} / {sigma2.shape}")
    if np.diag(sigma2).min(initial=0.0) < 0:
        raise DistillKacError("sigma2: not a covariance matrix (negative variance on the diagonal)")
    values1, vectors1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    values1 = _psd_eigenvalues("sigma1", values1)
    root1 = (vectors1 * np.sqrt(values1)) @ vectors1.T
    middle = root1 @ sigma2 @ root1
    middle_values = _psd_eigenvalues("sigma2", np.linalg.eigvalsh((middle + middle.T) / 2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(middle_values).sum())


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


PROGRESS_FORMAT = "distillkac-fid-reference-progress"


def compute_reference(dataset, split: str, extractor: InceptionFeatures, batch_size: int | None = None,
                      limit: int | None = None, seed: int = 0, progress: bool = True,
                      progress_file: str | os.PathLike | None = None, save_every: int = 20) -> Reference:
    """Reference statistics of ``dataset`` (a distillkac.data dataset of images), unflipped.

    With ``limit`` a subset of ``limit`` images is used, chosen by a permutation from a generator
    seeded with ``seed`` (sorted, so the order of the files does not matter).

    With ``progress_file`` the exact float64 moment sums are written there (atomically) every
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
                   "indices_sha256": hashlib.sha256(indices.numpy().astype("<i8").tobytes()).hexdigest(),
                   "batch_size": int(step), "weights_sha256": extractor.weights_id}
    accumulator, done = MomentAccumulator(), 0
    if progress_file is not None:
        accumulator, done = _resume_moments(Path(progress_file), fingerprint)
    with tqdm(total=len(indices), initial=min(done * step, len(indices)), desc=f"reference {split}",
              unit="img", disable=not progress) as bar:
        for number, start in enumerate(starts[done:], start=done + 1):
            batch = to_uint8(dataset.get_batch(indices[start:start + step])[0])
            accumulator.update(extractor(batch))
            bar.update(int(batch.shape[0]))
            if progress_file is not None and number % save_every == 0 and number < len(starts):
                _save_moments(Path(progress_file), accumulator, number, fingerprint)
    stats = accumulator.stats()
    subset = {"subset": {"limit": int(limit), "seed": int(seed)}} if len(indices) < len(dataset) else {}
    meta = reference_meta(dataset.describe(), split, stats.count, dataset.data_shape, extractor.weights_id,
                          **subset)
    return Reference(stats, meta)


def _save_moments(file: Path, accumulator: MomentAccumulator, batches_done: int,
                  fingerprint: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, batches_done=np.asarray(batches_done, dtype=np.int64),
             fingerprint=np.array(json.dumps(fingerprint, sort_keys=True)), **accumulator.state_arrays())
    atomic_write_bytes(file, buffer.getvalue())


def _resume_moments(file: Path, fingerprint: dict[str, Any]) -> tuple[MomentAccumulator, int]:
    """(accumulator, batches done) from a progress file of the same job; a fresh start (with a note on
    stderr) when there is none, or it belongs to other settings, or it cannot be read."""
    if not file.is_file():
        return MomentAccumulator(), 0
    try:
        arrays = read_npz(file, ("batches_done", "fingerprint", "count"), "progress file")
        same = json.loads(str(arrays["fingerprint"])) == json.loads(json.dumps(fingerprint, sort_keys=True))
        if same and int(arrays["count"]) > 0:
            arrays.update(read_npz(file, ("shift", "sum", "outer"), "progress file"))
            return MomentAccumulator.from_state_arrays(arrays), int(arrays["batches_done"])
    except (DistillKacError, ValueError):
        pass
    tqdm.write(f"distillkac: {file} belongs to other settings or is unreadable; starting over", file=sys.stderr)
    return MomentAccumulator(), 0


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


def read_npz(file: Path, keys: tuple[str, ...], problem: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an .npz archive, loaded without pickles; ``problem`` starts any error."""
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DistillKacError(f"{problem} ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DistillKacError(f"{problem} (a single .npy array, not an .npz archive)")
    with loaded:
        missing = [key for key in keys if key not in loaded.files]
        if missing:
            raise DistillKacError(f"{problem} (no array {', '.join(missing)}; it has "
                                  f"{', '.join(loaded.files) or 'none'})")
        try:
            return {key: loaded[key] for key in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DistillKacError(f"{problem} ({type(err).__name__}: {err})") from err


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
    Returns {"fid", "num_images", "label" (fid_label), "reference_count", "resolution", "weights_sha256"}.
    """
    check_reference_compatible(ref, extractor.weights_id)
    shapes: list[tuple[int, ...]] = []

    def check_first(shape: tuple[int, ...]) -> None:
        check_reference_compatible(ref, extractor.weights_id, shape)
        shapes.append(shape)

    stats = feature_stats(checked_image_batches(batches, check_first), extractor, progress=progress,
                          total=total, desc="FID features")
    fid = frechet_distance(stats.mu, stats.sigma, ref.stats.mu, ref.stats.sigma)
    return {"fid": fid, "num_images": stats.count, "label": fid_label(stats.count),
            "reference_count": ref.stats.count, "resolution": list(shapes[0][1:]),
            "weights_sha256": extractor.weights_id}


# ------------------------------------------------------------------------- images from files

def _layout_nchw(images: np.ndarray, file: Path) -> np.ndarray:
    """[N, C, H, W] view of a uint8 image array stored as [N, C, H, W] or [N, H, W, C] (C = 1 or 3)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DistillKacError(f"--images: {file} key 'images' must be uint8 [N, C, H, W] or [N, H, W, C], "
                              f"got {images.dtype} {list(images.shape)}")
    if images.shape[1] in (1, 3):
        return images
    if images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise DistillKacError(f"--images: {file} key 'images' has no channel axis of size 1 or 3: "
                          f"{list(images.shape)}")


def _read_image(file: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DistillKacError(f"--images: cannot read {file} as an image ({err})") from err
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_file_batches(path: str | os.PathLike, batch_size: int, channels: int = 3
                       ) -> tuple[int, Iterator[torch.Tensor]]:
    """(number of images, iterator of uint8 [B, C, H, W] batches) for a folder of PNG/JPEG files or an .npz.

    A folder is read recursively in sorted order (hidden files left out), each file converted to
    ``channels`` (RGB or L) like torch-fidelity's loader; an .npz needs the key ``images``.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DistillKacError(f"--images: {source} does not exist")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_FILE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not files:
            raise DistillKacError(f"--images: no PNG/JPEG files in {source}")

        def from_files() -> Iterator[torch.Tensor]:
            for start in range(0, len(files), batch_size):
                arrays = [_read_image(f, channels) for f in files[start:start + batch_size]]
                shapes = {a.shape for a in arrays}
                if len(shapes) > 1:
                    raise DistillKacError(f"--images: images in {source} differ in size: {sorted(shapes)}")
                yield torch.from_numpy(np.stack(arrays))

        return len(files), from_files()
    images = read_npz(source, ("images",), f"--images: {source} is not a folder of images or an .npz "
                                           f"with the key 'images'")["images"]
    tensor = torch.from_numpy(np.ascontiguousarray(_layout_nchw(images, source)))
    return tensor.shape[0], (tensor[i:i + batch_size] for i in range(0, tensor.shape[0], batch_size))


# --------------------------------------------------------------------------------------- digits

DIGITS_FEATURE_DIM = 64
DIGITS_MIN_ACCURACY = 0.95
_DIGITS_FORMAT = "distillkac-digits-classifier"
_DIGITS_VERSION = 1
_DIGITS_TRAINING = {"epochs": 15, "batch_size": 64, "lr": 2e-3}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distillkac").expanduser()


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits: 3x3 convolutions (16, 32 channels), 2x2 max-pool, 64-d hidden, 10 logits.

    Inputs are float images in [-1, 1], ``[N, 1, 8, 8]``. ``features`` is the 64-d penultimate layer
    (after its ReLU) used for the "fd_digits" Fréchet distance. ``test_accuracy`` is the accuracy on
    the held-out digits split measured when it was trained.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, DIGITS_FEATURE_DIM)
        self.out = nn.Linear(DIGITS_FEATURE_DIM, 10)
        self.test_accuracy = float("nan")
        self.from_cache = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> DigitsClassifier:
        """The classifier cached under ``cache_dir`` (default ``$DISTILLKAC_CACHE`` or ~/.cache/distillkac),
        trained on the digits train split (deterministic given ``seed``) when no valid cached copy exists.

        The cache is keyed by the seed, the training settings and the sha256 of the training images;
        the JSON sidecar records the held-out accuracy and the weights' sha256 (checked on load).
        """
        train, test = _digits_split("train"), _digits_split("test")
        train_bytes = train.data.numpy().tobytes() + train.labels.numpy().tobytes()
        settings = {"format": _DIGITS_FORMAT, "version": _DIGITS_VERSION, "seed": int(seed),
                    **_DIGITS_TRAINING, "train_sha256": hashlib.sha256(train_bytes).hexdigest()}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(cache_dir or default_cache_dir()).expanduser()
        weights_file = folder / f"digits-classifier-{key}.safetensors"
        sidecar_file = weights_file.with_suffix(".json")
        cached = _load_cached_classifier(weights_file, sidecar_file, settings)
        if cached is not None:
            return cached
        with _single_thread():
            model = _train_digits_classifier(train, seed)
        model.test_accuracy = _accuracy(model, test)
        weights = save_safetensors(model.state_dict())
        atomic_write_bytes(weights_file, weights)
        sidecar = {**settings, "test_accuracy": model.test_accuracy, "test_count": len(test),
                   "weights_sha256": hashlib.sha256(weights).hexdigest()}
        atomic_write_bytes(sidecar_file, json.dumps(sidecar, indent=2, sort_keys=True).encode())
        return model


def digits_reference_images() -> torch.Tensor:
    """The held-out digits (the fixed test split of distillkac.data), float [-1, 1] ``[297, 1, 8, 8]``."""
    test = _digits_split("test")
    return test.get_batch(torch.arange(len(test)))[0]


def _digits_split(split: str):
    from distillkac.data import DataConfig, load_dataset

    return load_dataset(DataConfig(name="digits"), split)


def _load_cached_classifier(weights_file: Path, sidecar_file: Path, settings: dict[str, Any]
                            ) -> DigitsClassifier | None:
    """The cached classifier when the sidecar matches ``settings`` and the weights hash; else None."""
    if not (weights_file.is_file() and sidecar_file.is_file()):
        return None
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except (OSError, ValueError):
        return None
    if any(sidecar.get(k) != v for k, v in settings.items()) or sidecar.get("weights_sha256") != sha256_file(
            weights_file):
        return None
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(weights_file)))
    model.eval()
    model.test_accuracy = float(sidecar["test_accuracy"])
    model.from_cache = True
    return model


def _init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """He-uniform weights (bound sqrt(6 / fan_in)) and zero biases, drawn from ``generator``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                bound = (6.0 / fan_in) ** 0.5
                module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)
                module.bias.zero_()


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run a tiny model on one CPU thread (extra threads only spin on a shared machine), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_digits_classifier(train, seed: int) -> DigitsClassifier:
    """Adam on cross-entropy over the train split, shuffled and initialised from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    _init_parameters(model, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=_DIGITS_TRAINING["lr"])
    images, labels = train.get_batch(torch.arange(len(train)))
    batch = _DIGITS_TRAINING["batch_size"]
    model.train()
    for _ in range(_DIGITS_TRAINING["epochs"]):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(model(images[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def _accuracy(model: DigitsClassifier, dataset) -> float:
    images, labels = dataset.get_batch(torch.arange(len(dataset)))
    return float((model.predict(images) == labels).double().mean())


def _labelled_accuracy(predicted: torch.Tensor, requested: torch.Tensor, num_classes: int) -> float | None:
    """Fraction of rows whose prediction equals the requested label, over rows with a real label
    (0..num_classes-1; the null label num_classes is left out); None when no row has one."""
    labelled = (requested >= 0) & (requested < num_classes)
    if not bool(labelled.any()):
        return None
    return float((predicted[labelled] == requested[labelled]).double().mean())


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, requested_labels: torch.Tensor, classifier: DigitsClassifier,
                   reference: torch.Tensor) -> dict[str, Any]:
    """Metrics for 8x8 digit samples (float [-1, 1], ``[N, 1, 8, 8]``) against held-out real digits.

    "class_accuracy": fraction of labelled samples the classifier assigns to the requested label (null
    labels left out; None if none); "fd_digits": Fréchet distance between Gaussian fits of the
    classifier's 64-d penultimate features of the samples and of ``reference``; "fd_pixels": the same
    in pixel space (64-d, pixel values in [-1, 1]). These are not FIDs (no Inception network).
    """
    for name, images in (("samples", samples), ("reference", reference)):
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8) or images.shape[0] < 2:
            raise DistillKacError(f"{name}: digits metrics need at least 2 images [N, 1, 8, 8], got "
                                  f"{list(images.shape)}")
    requested = torch.as_tensor(requested_labels, dtype=torch.long).reshape(-1).cpu()
    if requested.shape[0] != samples.shape[0]:
        raise DistillKacError(f"requested_labels: got {requested.shape[0]} labels for {samples.shape[0]} "
                              f"samples")
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    samples, reference = samples.float().to(device), reference.float().to(device)
    sample_features = GaussianStats.from_features(classifier.features(samples))
    reference_features = GaussianStats.from_features(classifier.features(reference))
    sample_pixels = GaussianStats.from_features(samples.flatten(1))
    reference_pixels = GaussianStats.from_features(reference.flatten(1))
    return {
        "class_accuracy": _labelled_accuracy(classifier.predict(samples).cpu(), requested, 10),
        "fd_digits": frechet_distance(sample_features.mu, sample_features.sigma, reference_features.mu,
                                      reference_features.sigma),
        "fd_pixels": frechet_distance(sample_pixels.mu, sample_pixels.sigma, reference_pixels.mu,
                                      reference_pixels.sigma),
        "num_samples": int(samples.shape[0]),
        "num_reference": int(reference.shape[0]),
    }


# ---------------------------------------------------------------------------------------- toy2d

COVERAGE_RADIUS_STD = 3.0
COVERAGE_MIN_SHARE = 0.1


def _mixture_parts(mixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means [K, 2], stds [K], weights [K]) in float64 from (means, std scalar or [K], weights)."""
    means, std, weights = mixture
    means = torch.as_tensor(means, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    stds = torch.as_tensor(std, dtype=torch.float64).expand(means.shape[0])
    if means.ndim != 2 or weights.shape != (means.shape[0],):
        raise DistillKacError(f"mixture: need means [K, D] and weights [K], got {list(means.shape)} and "
                              f"{list(weights.shape)}")
    return means, stds, weights / weights.sum()


def mixture_log_joint(x: torch.Tensor, mixture) -> torch.Tensor:
    """log(w_k N(x; m_k, s_k^2 I)) for every row and mode: float64 ``[N, K]``."""
    means, stds, weights = _mixture_parts(mixture)
    points = torch.as_tensor(x, dtype=torch.float64).cpu()
    dim = means.shape[1]
    squared = torch.cdist(points, means).square()
    return (weights.log() - dim * (stds.log() + 0.5 * np.log(2 * np.pi))) - squared / (2 * stds.square())


def sample_mixture(mixture, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` exact draws (float64 [count, D]) from the Gaussian mixture and their modes (long [count])."""
    means, stds, weights = _mixture_parts(mixture)
    modes = torch.multinomial(weights, count, replacement=True, generator=generator)
    noise = torch.randn((count, means.shape[1]), generator=generator, dtype=torch.float64)
    return means[modes] + stds[modes, None] * noise, modes


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int,
                       generator: torch.Generator) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets ``[N, D]``.

    SW_2 = sqrt(mean over directions theta of W_2^2(theta.a, theta.b)); each 1-D W_2^2 between two
    empirical laws with N points is the mean squared difference of the sorted projections. The
    directions are Gaussian draws from ``generator``, normalised to the unit sphere.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"sliced_wasserstein needs two [N, D] sets of one shape, got {list(a.shape)} and "
                         f"{list(b.shape)}")
    directions = torch.randn((a.shape[1], num_projections), generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    project_a = (directions.T @ a.to(torch.float64).T).sort(dim=1).values
    project_b = (directions.T @ b.to(torch.float64).T).sort(dim=1).values
    return float((project_a - project_b).square().mean().sqrt())


@torch.no_grad()
def toy2d_metrics(samples: torch.Tensor, labels: torch.Tensor | None, mixture, num_projections: int = 256,
                  seed: int = 0) -> dict[str, Any]:
    """Metrics for 2-D samples from a model of the Gaussian mixture ``(means [K, 2], std, weights [K])``.

    - "log_likelihood": mean log-density of the samples under the exact mixture
      ("reference_log_likelihood": the same for exact draws, for comparison);
    - "sliced_wasserstein": SW_2 against as many exact mixture draws (generator seeded with ``seed``;
      ``num_projections`` directions from the same generator);
    - "mode_coverage": fraction of modes k that are covered, where covered means that at least
      COVERAGE_MIN_SHARE (10%) of the expected count w_k * N of samples lies within
      COVERAGE_RADIUS_STD (3) standard deviations (Euclidean distance) of the mean m_k;
    - "class_accuracy": over samples with a requested mode (labels 0..K-1; the null label K and
      ``labels=None`` are left out), the fraction whose most probable mode (largest w_k N(x; m_k, s_k^2))
      is the requested one; None when no sample is labelled.
    """
    points = torch.as_tensor(samples, dtype=torch.float64).cpu()
    means, stds, weights = _mixture_parts(mixture)
    if points.ndim != 2 or points.shape[1] != means.shape[1] or points.shape[0] < 1:
        raise DistillKacError(f"samples: need [N, {means.shape[1]}] points, got {list(points.shape)}")
    log_joint = mixture_log_joint(points, mixture)
    generator = torch.Generator().manual_seed(seed)
    reference, _ = sample_mixture(mixture, points.shape[0], generator)
    inside = torch.cdist(points, means) <= COVERAGE_RADIUS_STD * stds
    covered = inside.sum(dim=0).double() >= COVERAGE_MIN_SHARE * weights * points.shape[0]
    accuracy = None
    if labels is not None:
        requested = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if requested.shape[0] != points.shape[0]:
            raise DistillKacError(f"labels: got {requested.shape[0]} labels for {points.shape[0]} samples")
        accuracy = _labelled_accuracy(log_joint.argmax(dim=1), requested, means.shape[0])
    reference_log_density = torch.logsumexp(mixture_log_joint(reference, mixture), dim=1)
    return {
        "log_likelihood": float(torch.logsumexp(log_joint, dim=1).mean()),
        "reference_log_likelihood": float(reference_log_density.mean()),
        "sliced_wasserstein": sliced_wasserstein(points, reference, num_projections, generator),
        "mode_coverage": float(covered.double().mean()),
        "class_accuracy": accuracy,
        "num_samples": int(points.shape[0]),
    }
