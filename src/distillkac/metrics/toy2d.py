"""Metrics for samples of the 2-D Gaussian mixture: the exact log-likelihood, a sliced Wasserstein
distance, mode coverage and mode accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distillkac.errors import DistillKacError
from distillkac.metrics.stats import labelled_accuracy

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
        accuracy = labelled_accuracy(log_joint.argmax(dim=1), requested, means.shape[0])
    return {
        "log_likelihood": float(torch.logsumexp(log_joint, dim=1).mean()),
        "reference_log_likelihood": float(torch.logsumexp(mixture_log_joint(reference, mixture), dim=1).mean()),
        "sliced_wasserstein": sliced_wasserstein(points, reference, num_projections, generator),
        "mode_coverage": float(covered.double().mean()),
        "class_accuracy": accuracy,
        "num_samples": int(points.shape[0]),
    }
