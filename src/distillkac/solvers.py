"""Time grids and ODE solvers for ``dx/dt = u(x, t)``, integrated from ``t = T`` down to 0 (method.md §3).

A grid ``T = t_0 > t_1 > … > t_N = 0`` has N steps (never ``linspace(T, 0, N)``, which has N-1); a solve may
also cover a segment ``t_0 > … > t_N ≥ 0`` of it, shared by all rows or one per row (distillation targets).
The velocity function takes ``(x, t)`` with ``t`` a ``[B]`` tensor; solvers count its calls exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distillkac.errors import DistillKacError
from distillkac.paths import per_row

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, float | torch.Tensor, torch.Tensor, torch.Tensor], None]

GRID_KINDS = ("uniform", "quadratic")
# Velocity evaluations per step (AB-2 reuses the previous step's evaluation).
EVALUATIONS_PER_STEP = {"euler": 1, "ab2": 1, "ddim": 1, "heun": 2, "midpoint": 2}
SOLVERS = tuple(EVALUATIONS_PER_STEP)


@dataclass
class SolveResult:
    x: torch.Tensor
    evaluations: int


def time_grid(steps: int, T: float = 1.0, kind: str = "uniform") -> torch.Tensor:
    """``steps + 1`` float64 times from ``T`` to 0: uniform ``T(1 - k/N)`` or quadratic ``T(1 - k/N)²``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DistillKacError(f"steps must be a positive integer, got {steps!r}")
    if not T > 0:
        raise DistillKacError(f"T must be > 0, got {T}")
    fraction = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "uniform":
        return T * fraction
    if kind == "quadratic":
        return T * fraction**2
    raise DistillKacError(f"unknown grid {kind!r}; valid: {', '.join(GRID_KINDS)}")


def check_grid(grid, batch: int) -> torch.Tensor:
    """A custom grid as float64: one for every row (``[steps + 1]``) or one per row (``[batch, steps + 1]``),
    finite, strictly decreasing along the steps and non-negative."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() not in (1, 2) or grid.shape[-1] < 2 or (grid.dim() == 2 and grid.shape[0] != batch):
        raise DistillKacError(f"grid must hold at least two times, shared ([steps + 1]) or one row per sample "
                              f"([{batch}, steps + 1]), got shape {list(grid.shape)}")
    if not bool(torch.isfinite(grid).all()) or not bool((grid[..., 1:] < grid[..., :-1]).all()) \
            or bool((grid[..., -1] < 0).any()):
        raise DistillKacError("grid must be finite, strictly decreasing and non-negative")
    return grid


def batch_times(time: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A grid time as the ``[B]`` tensor a velocity takes (``like``'s dtype and device): ``time`` is one
    time for every row (a float) or one per row (a ``[B]`` tensor)."""
    if isinstance(time, torch.Tensor):
        return time.to(dtype=like.dtype, device=like.device)
    return torch.full((like.shape[0],), time, dtype=like.dtype, device=like.device)


def solve(velocity: VelocityFn, x: torch.Tensor, grid, method: str = "ab2", path=None,
          on_step: StepHook | None = None) -> SolveResult:
    """Integrate from ``grid[..., 0]`` to ``grid[..., -1]``, with step sizes ``h_k = t_k - t_{k+1}``.

    ``grid`` is shared by all rows of ``x`` (``[steps + 1]``) or one per row (``[B, steps + 1]``: every row
    takes the same number of steps on its own times; its ``h_k`` is then a per-row tensor in x's dtype).

    - ``euler``: ``x_{k+1} = x_k - h_k·u_k``.
    - ``ab2`` (Adams–Bashforth 2, variable steps, Euler first step):
      ``x_{k+1} = x_k - h_k·[(1 + h_k/(2h_{k-1}))·u_k - (h_k/(2h_{k-1}))·u_{k-1}]``.
    - ``heun``: ``x_{k+1} = x_k - h_k/2·(u_k + u(x_k - h_k·u_k, t_{k+1}))`` (Euler predictor, trapezoidal corrector).
    - ``midpoint``: ``x_{k+1} = x_k - h_k·u(x_k - h_k/2·u_k, t_k - h_k/2)``.
    - ``ddim``: the exact deterministic DDIM update of a :class:`~distillkac.paths.VPPath` (``path``).
    ``on_step(k, t_k, x_k, u_k)`` sees the velocity at each grid point (for diagnostics; ``t_k`` is a float,
    or the rows' ``[B]`` times for a per-row grid).
    """
    if method not in EVALUATIONS_PER_STEP:
        raise DistillKacError(f"unknown solver {method!r}; valid: {', '.join(SOLVERS)}")
    if method == "ddim" and not hasattr(path, "ddim_step"):
        raise DistillKacError("solver 'ddim' needs the VP diffusion path (path kind 'vp')")
    grid = check_grid(grid, x.shape[0])
    times = grid.tolist() if grid.dim() == 1 else list(grid.to(x.device).T)
    evaluations = 0

    def evaluate(state: torch.Tensor, time: float | torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        return velocity(state, batch_times(time, state))

    previous_u, previous_h = None, None
    for k in range(len(times) - 1):
        t, dt = times[k], times[k] - times[k + 1]
        h = dt if isinstance(dt, float) else per_row(dt, x)
        u = evaluate(x, t)
        if on_step is not None:
            on_step(k, t, x, u)
        if method == "euler":
            x = x - h * u
        elif method == "ab2":
            if previous_u is None:
                x = x - h * u
            else:
                ratio = h / (2 * previous_h)
                x = x - h * ((1 + ratio) * u - ratio * previous_u)
            previous_u, previous_h = u, h
        elif method == "heun":
            predicted = x - h * u
            x = x - 0.5 * h * (u + evaluate(predicted, times[k + 1]))
        elif method == "midpoint":
            x = x - h * evaluate(x - 0.5 * h * u, t - 0.5 * dt)
        else:
            x = path.ddim_step(x, batch_times(t, x), batch_times(times[k + 1], x), u)
    return SolveResult(x, evaluations)
