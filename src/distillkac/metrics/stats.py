"""Gaussian fits of features: streaming, mergeable moments, their statistics and the Fréchet distance.

``Moments`` holds the count, mean and centred scatter of feature rows in float64. Parts made from
separate batches or processes merge exactly (Chan et al.), so FID features of 50k images are folded in
batch by batch, never held in memory, and the result does not depend on how the rows were split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distillkac.errors import DistillKacError


@dataclass
class GaussianStats:
    """Mean ``mu`` float64 [D] and covariance ``sigma`` float64 [D, D] (divisor N - 1) of N = ``count``."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> GaussianStats:
        """One-shot statistics of a feature matrix ``[N, D]`` (N >= 2), in float64."""
        rows = torch.as_tensor(features).detach()
        if rows.ndim != 2 or rows.shape[0] < 2:
            raise DistillKacError(f"features: need at least 2 rows of [N, D] features, got shape "
                                  f"{list(rows.shape)}")
        return Moments.from_features(rows).stats()

    def sha256(self) -> str:
        """Digest of the arrays: little-endian float64 bytes of mu, then of sigma (row-major)."""
        digest = hashlib.sha256()
        for array in (self.mu, self.sigma):
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return digest.hexdigest()


@dataclass
class Moments:
    """Count, mean ``[D]`` and centred scatter ``Σ (f - m)(f - m)ᵀ`` ``[D, D]`` of feature rows (float64).

    Parts merge exactly: ``N = Σ n_i``, ``m = Σ n_i m_i / N``, ``S = Σ S_i + Σ n_i (m_i - m)(m_i - m)ᵀ``.
    A batch is centred on its own mean before its outer products are summed, so a large offset against
    a small spread loses no digits to cancellation.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor) -> Moments:
        """The moments of feature rows ``[N, D]`` (N may be 0), on their device."""
        rows = features.detach().to(torch.float64)
        if rows.dim() != 2:
            raise ValueError(f"features must be [N, D], got {list(rows.shape)}")
        if rows.shape[0] == 0:
            dim = rows.shape[1]
            return cls(0, rows.new_zeros(dim), rows.new_zeros((dim, dim)))
        mean = rows.mean(dim=0)
        centred = rows - mean
        return cls(rows.shape[0], mean, centred.T @ centred)

    @staticmethod
    def merge(parts: Sequence[Moments]) -> Moments:
        """The moments of all the parts' rows together (on the first non-empty part's device; a single
        non-empty part is returned as it is)."""
        filled = [part for part in parts if part.count > 0]
        if not filled:
            if not parts:
                raise ValueError("Moments.merge needs at least one part")
            return parts[0]
        if len(filled) == 1:
            return filled[0]
        device = filled[0].mean.device
        counts = [part.count for part in filled]
        total = sum(counts)
        means = [part.mean.to(device) for part in filled]
        mean = sum(n * m for n, m in zip(counts, means)) / total
        scatter = sum(part.scatter.to(device) + n * torch.outer(m - mean, m - mean)
                      for part, n, m in zip(filled, counts, means))
        return Moments(total, mean, scatter)

    @classmethod
    def empty(cls) -> Moments:
        """No rows yet: merges as nothing; ``add`` the first batch to it."""
        return cls(0, torch.zeros(0, dtype=torch.float64), torch.zeros((0, 0), dtype=torch.float64))

    def add(self, features: torch.Tensor) -> Moments:
        """These moments with the rows ``features`` merged in, on the features' device."""
        batch = Moments.from_features(features)
        return Moments.merge([self.to(batch.mean.device), batch])

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count, self.mean.to(device), self.scatter.to(device))

    def stats(self) -> GaussianStats:
        """Mean and covariance (divisor N - 1) as float64 numpy arrays."""
        if self.count < 2:
            raise DistillKacError(f"images: the statistics need at least 2 images, got {self.count}")
        sigma = self.scatter / (self.count - 1)
        sigma = (sigma + sigma.T) / 2
        return GaussianStats(self.mean.cpu().numpy(), sigma.cpu().numpy(), self.count)

    def arrays(self) -> dict[str, np.ndarray]:
        """The exact float64 values for a side file; ``from_arrays`` restores them bit for bit."""
        return {"count": np.asarray(self.count, dtype=np.int64), "mean": self.mean.cpu().numpy(),
                "scatter": self.scatter.cpu().numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Moments | None:
        """Moments saved by ``arrays`` (also the shifted sums ``shift``, ``sum``, ``outer`` of older
        reference progress files); None unless they are the float64 moments of at least one row."""
        count = int(arrays["count"])
        if "shift" in arrays and "mean" not in arrays:
            shift, sums, outer = (arrays.get(key) for key in ("shift", "sum", "outer"))
            if count < 1 or any(a is None or a.dtype != np.float64 for a in (shift, sums, outer)):
                return None
            offset = sums / count
            arrays = {"mean": shift + offset, "scatter": outer - count * np.outer(offset, offset)}
        mean, scatter = arrays.get("mean"), arrays.get("scatter")
        if (count < 1 or mean is None or scatter is None or mean.dtype != np.float64
                or scatter.dtype != np.float64 or mean.ndim != 1 or scatter.shape != (mean.shape[0],) * 2):
            return None
        return cls(count, torch.from_numpy(mean), torch.from_numpy(scatter))


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


def labelled_accuracy(predicted: torch.Tensor, requested: torch.Tensor, num_classes: int) -> float | None:
    """Fraction of rows whose prediction equals the requested label, over rows with a real label
    (0..num_classes-1; the null label num_classes is left out); None when no row has one."""
    labelled = (requested >= 0) & (requested < num_classes)
    if not bool(labelled.any()):
        return None
    return float((predicted[labelled] == requested[labelled]).double().mean())
