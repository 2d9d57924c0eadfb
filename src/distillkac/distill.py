"""Endpoint distillation (method.md §4): the stage plan, the frozen teacher and the endpoint loss.

A student with M uniform steps ``t_k = T(1 - k/M)`` makes one Euler step per interval; its frozen teacher
covers the same interval ``[t_{k+1}, t_k]`` with ``N = teacher steps / M`` of its own steps (stage 1: the
guided Kac flow with AB-2, restarted with an Euler step at ``t_k``; later stages: the previous student's
Euler steps). The loss is the endpoint MSE

    ‖ (x_{t_k} - Δ·s_φ(x_{t_k}, t_k, y)) - Teacher_N(x_{t_k}; t_k → t_{k+1}, y) ‖²,   Δ = T/M,

with ``k`` uniform in ``0..M-1`` and ``x_{t_k}`` forward-noised data, a teacher roll-out state, or either
with probability 1/2 (``mix``). The ``velocity`` loss form divides the endpoint MSE by Δ², so every stage's
loss is on the scale of a velocity error (Δ goes from T/20 to T over the plan).

Roll-out start states come from a :class:`TrajectoryPool`: the teacher's UNINTERRUPTED solver (stage 1:
AB-2 over its whole grid; later: the previous student's Euler steps) run once per prior draw, its states
kept at the student's grid times, so one roll-out yields M training pairs ``(x_{t_k}, x_{t_{k+1}})``; the
stage-1 target ``ab2-carried`` is the pooled ``x_{t_{k+1}}`` itself (AB-2's history carried across
segments), ``ab2-restart`` restarts AB-2 with an Euler step at ``t_k`` (the paper's per-segment solve) and
``euler`` takes Euler steps. Later stages' teachers are Euler students, for which all three coincide.
Each stage trains a standalone student (kind "student": steps, grid, Euler, baked-in guidance, teacher
hash); stages.py runs, resumes and guards the stages.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distillkac.checkpoint import Artifact, Sampling, load_artifact
from distillkac.config import DistillConfig
from distillkac.errors import DistillKacError
from distillkac.guidance import check_guidance, guided_velocity
from distillkac.paths import per_row
from distillkac.rng import rand
from distillkac.runtime import autocast
from distillkac.solvers import solve, time_grid
from distillkac.train import derive_seed


def parse_plan(text: str) -> tuple[int, ...]:
    """``"100,20,4,2,1"`` -> ``(100, 20, 4, 2, 1)`` (at least two positive integers)."""
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError as err:
        raise DistillKacError(f"--plan: expected comma-separated step counts such as 100,20,4,2,1, "
                              f"got {text!r}") from err


def validate_plan(plan: Sequence[int], teacher_steps: int | None = None) -> tuple[int, ...]:
    """Strictly decreasing positive step counts, each dividing the previous one; the first equal to
    ``teacher_steps`` (when given). Refused with a one-line message naming the failing pair."""
    plan = tuple(plan)
    if len(plan) < 2:
        raise DistillKacError(f"--plan: need the teacher's steps and at least one student, got {list(plan)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in plan):
        raise DistillKacError(f"--plan: step counts must be positive integers, got {list(plan)}")
    for previous, steps in zip(plan, plan[1:]):
        if steps >= previous:
            raise DistillKacError(f"--plan: not strictly decreasing at {previous} -> {steps}")
        if previous % steps:
            raise DistillKacError(f"--plan: {steps} does not divide {previous} ({previous} -> {steps})")
    if teacher_steps is not None and plan[0] != teacher_steps:
        raise DistillKacError(f"--plan: the first step count {plan[0]} must equal the teacher's steps "
                              f"{teacher_steps}")
    return plan


@dataclass(frozen=True)
class Stage:
    """Stage ``index`` (1-based): a ``teacher_steps`` teacher distilled into a ``student_steps`` student."""

    index: int
    teacher_steps: int
    student_steps: int

    @property
    def name(self) -> str:
        return f"stage-{self.student_steps}step"

    @property
    def segment(self) -> int:
        """Teacher steps per student step, N."""
        return self.teacher_steps // self.student_steps


def plan_stages(plan: Sequence[int]) -> list[Stage]:
    return [Stage(i + 1, teacher, student) for i, (teacher, student) in enumerate(zip(plan, plan[1:]))]


@dataclass
class Teacher:
    """A frozen teacher: its network, meta, weights hash, own step count and solver.

    ``forward_guidance`` is the CFG weight applied at each evaluation (stage 1); a student teacher has
    its guidance baked in (``forward_guidance`` 0, ``guidance`` its meta's weight). ``precision`` (auto,
    fp32, bf16) is what its network runs in; None: the enclosing one (the training step's).
    """

    model: nn.Module
    meta: dict[str, Any]
    sha256: str
    steps: int
    solver: str
    guidance: float
    forward_guidance: float
    artifact: Path
    precision: str | None = None

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with contextlib.nullcontext() if self.precision is None else autocast(x.device, self.precision):
            return guided_velocity(self.model, x, t, y, self.forward_guidance)

    def record(self) -> dict[str, Any]:
        """What a stage stores about its teacher (compared when a stage is resumed or skipped)."""
        return teacher_record(self.meta, self.steps, self.guidance)


def teacher_record(meta: dict[str, Any], steps: int, guidance: float) -> dict[str, Any]:
    """A teacher artefact's identity as a stage stores it: weights hash, kind, steps, solver, guidance,
    path (Kac constants and schedules), data shape, class count and network."""
    return {"sha256": meta["weights_sha256"], "kind": meta.get("kind"), "steps": int(steps),
            "solver": Artifact(meta).sampling().solver, "guidance": float(guidance),
            "path": meta["path"], "data_shape": list(meta["data_shape"]), "num_classes": int(meta["num_classes"]),
            "net": meta["net"]}


def load_teacher(artifact: str | os.PathLike, steps: int, guidance: float,
                 device: str | torch.device = "cpu", precision: str | None = None) -> Teacher:
    """Load a teacher artefact. A Kac teacher (or baseline) runs guided AB-2 with ``steps`` steps and CFG
    weight ``guidance``; a student runs its own Euler steps (which must equal ``steps``) with its baked-in
    guidance (which must equal ``guidance``). ``precision``: see :class:`Teacher`."""
    artifact = Path(artifact)
    model, meta = load_artifact(artifact, device=device)
    model.requires_grad_(False)
    kind = meta.get("kind")
    if kind not in Artifact.KINDS:
        raise DistillKacError(f"--teacher: {artifact} is a {kind!r} artefact; expected one of {Artifact.KINDS}")
    own = Artifact(meta).baked_sampling()
    if own is None:
        own = Sampling(steps, "ab2", check_guidance(guidance, int(meta["num_classes"])))
    elif own.steps != steps:
        raise DistillKacError(f"--plan: the first step count {steps} must equal the teacher's steps "
                              f"{own.steps} ({artifact} is a {own.steps}-step student)")
    elif guidance != own.guidance:
        raise DistillKacError(f"--guidance: {artifact} is a student with guidance w={own.guidance:g} baked "
                              f"in; its students keep it (got {guidance:g})")
    return Teacher(model, meta, meta["weights_sha256"], steps, own.solver, own.guidance, own.forward_guidance,
                   artifact, precision)


class EndpointPair(NamedTuple):
    """One training example: start state and time, end time, the teacher's endpoint, the labels."""

    x_start: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    k: torch.Tensor


def uniform_indices(count: int, high: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` integers uniform in ``0..high-1``, from float64 uniforms of ``generator``."""
    draws = rand((count,), generator, dtype=torch.float64, device=device)
    return torch.clamp((draws * high).long(), max=high - 1)


def pool_size(batch: int, refresh: int, student_steps: int, reuse: float) -> int:
    """Roll-outs per pool so that each of its ``size · M`` pairs is drawn ``reuse`` times on average over
    the ``refresh`` optimiser steps of ``batch`` pairs it serves."""
    return max(1, math.ceil(batch * refresh / (student_steps * reuse)))


@dataclass(frozen=True)
class PoolSettings:
    """``size`` roll-outs per pool, a new pool every ``refresh`` optimiser steps, seeded from ``seed``, rolled out
    ``chunk`` at a time (a micro-batch: the teacher's memory) in the training step's precision (the pool is
    built inside it; the teacher's own ``precision``, if set, applies within)."""

    size: int
    refresh: int
    seed: int
    chunk: int = 256


class TrajectoryPool:
    """The teacher's roll-outs at the student's grid times, rebuilt every ``refresh`` optimiser steps.

    Pool ``r`` serves steps ``r·refresh .. (r+1)·refresh - 1``; its prior draws and labels come from a
    generator seeded from ``(seed, "pool", stage, r)``, so a resumed stage rebuilds exactly the pool it had.
    ``states[i, j]`` is roll-out ``i`` at ``t_j`` (``j = 0..M``), after ``j·N`` teacher steps.
    """

    def __init__(self, teacher: Teacher, path, stage: Stage, num_classes: int, settings: PoolSettings) -> None:
        self.teacher, self.path, self.stage, self.num_classes = teacher, path, stage, num_classes
        self.settings = settings
        self.index = 0
        self._built: tuple | None = None
        self.states = self.labels = torch.empty(0)

    def select(self, step: int) -> None:
        """Use the pool that serves optimiser step ``step`` (0-based)."""
        self.index = step // self.settings.refresh

    def ensure(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
        key = (self.index, tuple(shape), device, dtype)
        if self._built != key:
            self.states, self.labels = self.rollouts(tuple(shape), device, dtype)
            self._built = key

    @torch.no_grad()
    def rollouts(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the teacher out from ``size`` prior draws with its own solver over its whole grid."""
        size, M, N = self.settings.size, self.stage.student_steps, self.stage.segment
        seed = derive_seed(self.settings.seed, "pool", self.stage.index, self.index)
        generator = torch.Generator(device=device).manual_seed(seed)
        prior = self.path.prior((size, *shape), generator=generator, device=device, dtype=dtype)
        labels = (uniform_indices(size, self.num_classes, generator, device) if self.num_classes
                  else torch.zeros(size, dtype=torch.long, device=device))
        states = torch.empty((size, M + 1, *shape), dtype=dtype, device=device)
        grid = time_grid(M * N, self.path.T).to(device)
        for start in range(0, size, self.settings.chunk):
            rows = slice(start, start + self.settings.chunk)
            self._roll_out(prior[rows], labels[rows], grid, states[rows])
        return states, labels

    def _roll_out(self, prior: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor, out: torch.Tensor) -> None:
        """Fill ``out[:, j]`` with the roll-out from ``prior`` after ``j·N`` teacher steps."""
        N = self.stage.segment

        def keep(step: int, t: float, x: torch.Tensor, u: torch.Tensor) -> None:
            if step % N == 0:
                out[:, step // N] = x

        final = solve(lambda x, t: self.teacher.velocity(x, t, labels), prior, grid, method=self.teacher.solver,
                      on_step=keep).x
        out[:, -1] = final.to(out.dtype)


class EndpointObjective:
    """The endpoint-distillation loss of one stage (method.md §4) as a train.py Objective.

    ``start_states`` and ``target`` are as in :class:`distillkac.config.DistillConfig`; ``pool`` sizes the
    trajectory pool (needed unless the start states are ``data``). The training loop calls
    :meth:`prepare_step` before each optimiser step, which selects the pool serving that step.
    """

    def __init__(self, teacher: Teacher, path, stage: Stage, start_states: str = "data",
                 history: Sequence[dict[str, Any]] = (), *, target: str = "ab2-restart", loss: str = "endpoint",
                 pool: PoolSettings | None = None) -> None:
        DistillConfig(start_states=start_states, target=target, loss=loss).validate()
        if stage.teacher_steps != teacher.steps:
            raise DistillKacError(f"stage {stage.index}: its teacher takes {teacher.steps} steps, "
                                  f"the plan says {stage.teacher_steps}")
        self.teacher, self.path, self.stage, self.start_states = teacher, path, stage, start_states
        self.target, self.loss = target, loss
        self.num_classes = int(teacher.meta["num_classes"])
        self.history = list(history)
        self.pool = None if start_states == "data" else TrajectoryPool(
            teacher, path, stage, self.num_classes, pool or PoolSettings(size=64, refresh=20, seed=0))
        self._teacher_device: torch.device | None = None

    def prepare_step(self, step: int) -> None:
        """Called by the training loop before optimiser step ``step`` (0-based)."""
        if self.pool is not None:
            self.pool.select(step)

    def _segment_solver(self) -> str:
        return "euler" if self.target == "euler" else self.teacher.solver

    def _carried_target_is_requested(self) -> bool:
        """Whether the pooled endpoint is the requested target: ``ab2-carried``, or a teacher whose solver has
        no history to restart (Euler), unless Euler is asked of an AB-2 teacher."""
        return self.target == "ab2-carried" or self._segment_solver() == self.teacher.solver == "euler"

    @torch.no_grad()
    def endpoint_pair(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> EndpointPair:
        """Draw ``k`` and the start state, and the teacher's endpoint at ``t_{k+1}`` (row ``b`` on its own
        segment of the teacher's grid: times ``k_b·N .. (k_b + 1)·N`` of its M·N steps). Draw order: ``k``;
        then (mix) which rows are pooled; then (pool) the roll-out of each pooled row; then (data) the
        path's noise."""
        if self._teacher_device != x0.device:
            self.teacher.model.to(x0.device)
            self._teacher_device = x0.device
        batch, M, N = x0.shape[0], self.stage.student_steps, self.stage.segment
        y = torch.zeros_like(y) if self.num_classes == 0 else y
        k = uniform_indices(batch, M, generator, x0.device)
        segments = k[:, None] * N + torch.arange(N + 1, device=x0.device)
        grid = time_grid(M * N, self.path.T).to(x0.device)[segments]
        t_start, t_end = grid[:, 0].to(x0.dtype), grid[:, -1].to(x0.dtype)
        pooled = self._pooled_rows(batch, generator, x0.device)
        x_start, target = torch.empty_like(x0), torch.empty_like(x0)
        if pooled.any():
            self.pool.ensure(x0.shape[1:], x0.device, x0.dtype)
            rows = uniform_indices(int(pooled.sum()), self.pool.settings.size, generator, x0.device)
            x_start[pooled] = self.pool.states[rows, k[pooled]]
            target[pooled] = self.pool.states[rows, k[pooled] + 1]
            y = y.clone()
            y[pooled] = self.pool.labels[rows]
        if not pooled.all():
            x_start[~pooled] = self.path.sample(x0, t_start, generator=generator).x_t[~pooled]
        solved = ~pooled if self._carried_target_is_requested() else torch.ones_like(pooled)
        if solved.any():
            labels = y[solved]
            target[solved] = solve(lambda x, t: self.teacher.velocity(x, t, labels), x_start[solved], grid[solved],
                                   method=self._segment_solver()).x
        return EndpointPair(x_start, t_start, t_end, target, y, k)

    def _pooled_rows(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.start_states != "mix":
            return torch.full((batch,), self.start_states == "rollout", dtype=torch.bool, device=device)
        return rand((batch,), generator, dtype=torch.float64, device=device) < 0.5

    def per_sample_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        pair = self.endpoint_pair(x0, y, generator)
        delta = pair.t_start.double() - pair.t_end.double()
        prediction = pair.x_start - per_row(delta, pair.x_start) * model(pair.x_start, pair.t_start, pair.y)
        loss = (prediction.float() - pair.target.float()).square().flatten(1).mean(dim=1)
        return loss / delta.square().to(loss.dtype) if self.loss == "velocity" else loss

    def stage_record(self) -> dict[str, Any]:
        return {"steps": self.stage.student_steps, "teacher_steps": self.teacher.steps,
                "teacher_solver": self.teacher.solver, "teacher_kind": self.teacher.meta.get("kind"),
                "teacher_sha256": self.teacher.sha256, "start_states": self.start_states, "target": self.target,
                "loss": self.loss}

    def artifact_meta(self) -> dict[str, Any]:
        M = self.stage.student_steps
        return {"kind": Artifact.STUDENT, "path": self.path.to_config(), "objective": f"{self.loss}-mse",
                "steps": M, "grid": "uniform", "grid_times": time_grid(M, self.path.T).tolist(),
                "solver": "euler", "guidance": self.teacher.guidance, "teacher_sha256": self.teacher.sha256,
                "teacher_steps": self.teacher.steps, "teacher_solver": self.teacher.solver,
                "start_states": self.start_states, "stages": [*self.history, self.stage_record()]}
