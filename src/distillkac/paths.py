"""Probability paths: the Kac path of the method and two Gaussian baselines, behind one interface.

Every path maps data ``x0`` and times ``t ∈ [0, T]`` to a point ``x_t`` and the regression target
``d x_t / dt`` (the conditional velocity), and draws its prior at ``t = T``. Training regresses the
target; sampling integrates ``dx/dt = u`` from ``T`` down to 0 (method.md §2–3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from distillkac import rng
from distillkac.errors import DistillKacError
from distillkac.kac import KacProcess
from distillkac.rng import GeneratorLike


class PathSample(NamedTuple):
    """A point on the path: ``x_t``, the velocity target ``d x_t/dt`` and the noise that made it."""

    x_t: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per row of ``like`` (``[B]``) as ``[B, 1, …]`` in ``like``'s dtype, to broadcast against it."""
    if values.dim() != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [{like.shape[0]}] (one time per row of x0), got {tuple(values.shape)}")
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# Data-coefficient schedules f(t) with f(0) = 1, f(T) = 0, and their derivatives.
def _f_linear(t, T):
    return 1 - t / T, torch.full_like(t, -1 / T)


def _f_cosine(t, T):
    angle = 0.5 * math.pi * t / T
    value = torch.where(t >= T, torch.zeros_like(t), torch.cos(angle))
    return value, -0.5 * math.pi / T * torch.sin(angle)


# Noise-clock schedules g(t) with g(0) = 0 and their derivatives.
def _g_identity(t, T):
    return t, torch.ones_like(t)


def _g_quadratic(t, T):
    return t * t / T, 2 * t / T


F_SCHEDULES = {"linear": _f_linear, "cosine": _f_cosine}
G_SCHEDULES = {"t": _g_identity, "quadratic": _g_quadratic}


def _choose(name: str, table: dict, what: str):
    if name not in table:
        raise DistillKacError(f"unknown {what} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


@dataclass(frozen=True)
class KacPath:
    """``x_t = f(t)·x0 + τ_{g(t)}`` with ``τ`` the coordinate-wise Kac displacement (method.md §2).

    Target ``u* = f'(t)·x0 + g'(t)·v(τ, g(t))``, with ``v = ±c`` exactly on the atoms. ``x_T`` is pure Kac
    noise on ``[-c·g(T), c·g(T)]^d`` because ``f(T) = 0``.
    """

    process: KacProcess
    T: float = 1.0
    schedule: str = "linear"
    g_schedule: str = "t"
    name = "kac"

    def __post_init__(self):
        if not (math.isfinite(self.T) and self.T > 0):
            raise DistillKacError(f"T must be a finite number > 0, got {self.T}")
        _choose(self.schedule, F_SCHEDULES, "schedule")
        _choose(self.g_schedule, G_SCHEDULES, "g_schedule")

    def coefficients(self, t: torch.Tensor):
        """``f(t), f'(t), g(t), g'(t)``."""
        f, df = F_SCHEDULES[self.schedule](t, self.T)
        g, dg = G_SCHEDULES[self.g_schedule](t, self.T)
        return f, df, g, dg

    def sample(self, x0: torch.Tensor, t: torch.Tensor, generator: GeneratorLike = None) -> PathSample:
        tb = per_row(t, x0)
        f, df, g, dg = self.coefficients(tb)
        tau, is_atom = self.process.sample(g.reshape(-1), x0.shape[1:], generator, validate=False)
        velocity = self.process.velocity(tau, g, is_atom=is_atom, validate=False)
        return PathSample(f * x0 + tau, df * x0 + dg * velocity, tau)

    def prior(self, shape, generator: GeneratorLike = None, device=None, dtype=torch.float32) -> torch.Tensor:
        t_end = torch.full((shape[0],), self.T, dtype=dtype, device=device)
        _, _, g_end, _ = self.coefficients(t_end)
        tau, _ = self.process.sample(g_end, shape[1:], generator, validate=False)
        return tau

    def to_config(self) -> dict:
        return {"kind": "kac", "kac_a": self.process.a, "kac_c": self.process.c, "T": self.T,
                "schedule": self.schedule, "g_schedule": self.g_schedule}


@dataclass(frozen=True)
class FlowPath:
    """Flow matching / rectified flow: ``x_t = (1-t)·x0 + t·ε``, target ``ε - x0``, ``T = 1``."""

    T: float = 1.0
    name = "flow"

    def sample(self, x0: torch.Tensor, t: torch.Tensor, generator: GeneratorLike = None) -> PathSample:
        tb = per_row(t, x0) / self.T
        noise = rng.randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
        return PathSample((1 - tb) * x0 + tb * noise, (noise - x0) / self.T, noise)

    def prior(self, shape, generator: GeneratorLike = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return rng.randn(shape, generator, dtype=dtype, device=device)

    def to_config(self) -> dict:
        return {"kind": "flow", "T": self.T}


@dataclass(frozen=True)
class VPPath:
    """VP diffusion with the cosine schedule of Nichol & Dhariwal (2021), in continuous time ``t ∈ [0, 1]``.

    ``ᾱ(t) = cos²(θ(t)) / cos²(θ(0))``, ``θ(t) = (t + s)/(1 + s)·π/2``; ``x_t = α·x0 + σ·ε`` with
    ``α = √ᾱ``, ``σ = √(1 - ᾱ)``. The target is ``α'·x0 + σ'·ε``, whose conditional mean given ``x_t`` is
    the probability-flow ODE velocity, so the same solvers apply and DDIM is :meth:`ddim_step`.
    ``σ'`` grows like ``t^{-1/2}`` near the data: ``t`` is floored at ``t_min`` when training.
    """

    T: float = 1.0
    s: float = 0.008
    t_min: float = 1e-4
    name = "vp"

    def alpha_sigma(self, t: torch.Tensor):
        """``α, σ, α', σ'`` at ``t`` (``α(T) = 0`` exactly)."""
        scale = 0.5 * math.pi / (1 + self.s)
        theta = (t / self.T + self.s) * scale
        cos0 = math.cos(self.s * scale)
        alpha = torch.where(t >= self.T, torch.zeros_like(t), torch.cos(theta) / cos0)
        sigma = torch.sqrt(torch.clamp(1 - alpha * alpha, min=0.0))
        dalpha = -torch.sin(theta) * scale / (cos0 * self.T)
        dsigma = -alpha * dalpha / torch.clamp(sigma, min=torch.finfo(t.dtype).tiny)
        return alpha, sigma, dalpha, dsigma

    def sample(self, x0: torch.Tensor, t: torch.Tensor, generator: GeneratorLike = None) -> PathSample:
        tb = torch.clamp(per_row(t, x0), min=self.t_min)
        alpha, sigma, dalpha, dsigma = self.alpha_sigma(tb)
        noise = rng.randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
        return PathSample(alpha * x0 + sigma * noise, dalpha * x0 + dsigma * noise, noise)

    def prior(self, shape, generator: GeneratorLike = None, device=None, dtype=torch.float32) -> torch.Tensor:
        return rng.randn(shape, generator, dtype=dtype, device=device)

    def predict(self, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor):
        """Recover ``(x̂0, ε̂)`` from a state and its velocity by inverting ``[x; u] = [[α, σ], [α', σ']]·[x0; ε]``.

        The determinant ``α σ' - σ α' = -α'/σ`` (since ``α² + σ² = 1``) is non-zero for ``t ∈ (0, T]``.
        """
        alpha, sigma, dalpha, dsigma = self.alpha_sigma(per_row(t, x))
        det = alpha * dsigma - sigma * dalpha
        return (dsigma * x - sigma * u) / det, (alpha * u - dalpha * x) / det

    def ddim_step(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The exact deterministic DDIM update from ``t`` to ``s < t``: ``x_s = α_s·x̂0 + σ_s·ε̂``."""
        x0_hat, eps_hat = self.predict(x, t, u)
        alpha_s, sigma_s, _, _ = self.alpha_sigma(per_row(s, x))
        return alpha_s * x0_hat + sigma_s * eps_hat

    def to_config(self) -> dict:
        return {"kind": "vp", "T": self.T, "s": self.s, "t_min": self.t_min}


PATH_KINDS = ("kac", "flow", "vp")


@dataclass
class PathConfig:
    """The probability path of a run (method.md §2): Kac constants ``a, c``, horizon ``T`` and the schedules
    ``f`` (``schedule``) and ``g`` (``g_schedule``); ``kind`` "flow" and "vp" are the Gaussian baselines."""

    kind: str = "kac"
    kac_a: float = 9.0
    kac_c: float = 3.0
    T: float = 1.0
    schedule: str = "linear"
    g_schedule: str = "t"

    @classmethod
    def from_config(cls, config: dict) -> PathConfig:
        """The fields of a path's ``to_config()`` dict (a VP path's ``s`` and ``t_min`` are not among them)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})

    def validate(self) -> None:
        """Raise DistillKacError (one line, naming the field) for a nonsense value."""
        if self.kind not in PATH_KINDS:
            _refuse("kind", f"must be one of {', '.join(PATH_KINDS)}", self.kind)
        for name in ("kac_a", "kac_c", "T"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                _refuse(name, "must be a finite number > 0", value)
        if self.kind != "kac" and self.T != 1.0:
            _refuse("T", f"the {self.kind} baseline is defined on [0, 1]; T must be 1", self.T)
        if self.schedule not in F_SCHEDULES:
            _refuse("schedule", f"must be one of {', '.join(sorted(F_SCHEDULES))}", self.schedule)
        if self.g_schedule not in G_SCHEDULES:
            _refuse("g_schedule", f"must be one of {', '.join(sorted(G_SCHEDULES))}", self.g_schedule)

    def build(self) -> KacPath | FlowPath | VPPath:
        """The path (a VP path with its default ``s`` and ``t_min``)."""
        T = float(self.T)
        if self.kind == "kac":
            return KacPath(KacProcess(self.kac_a, self.kac_c), T, self.schedule, self.g_schedule)
        if self.kind == "flow":
            return FlowPath(T)
        if self.kind == "vp":
            return VPPath(T)
        raise DistillKacError(f"unknown path kind {self.kind!r}; valid: {', '.join(PATH_KINDS)}")


def _refuse(name: str, rule: str, value) -> None:
    raise DistillKacError(f"path.{name}: {rule}, got {value!r}")


def build_path(config: PathConfig | dict) -> KacPath | FlowPath | VPPath:
    """A path from a PathConfig or from a path's ``to_config()`` dict (as artefacts store it)."""
    if isinstance(config, PathConfig):
        return config.build()
    if config.get("kind") == "vp":
        return VPPath(float(config.get("T", 1.0)), float(config.get("s", 0.008)), float(config.get("t_min", 1e-4)))
    return PathConfig.from_config(config).build()
