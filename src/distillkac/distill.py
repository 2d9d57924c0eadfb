"""Endpoint distillation (method.md §4): the stage plan, the frozen teacher and the endpoint loss.

A student with M uniform steps ``t_k = T(1 - k/M)`` makes one Euler step per interval; its frozen teacher
covers the same interval ``[t_{k+1}, t_k]`` with ``N = teacher steps / M`` of its own steps (stage 1: the
guided Kac flow with AB-2, restarted with an Euler step at ``t_k``; later stages: the previous student's
Euler steps). The loss is the endpoint MSE

    ‖ (x_{t_k} - Δ·s_φ(x_{t_k}, t_k, y)) - Teacher_N(x_{t_k}; t_k → t_{k+1}, y) ‖²,   Δ = T/M,

with ``k`` uniform in ``0..M-1`` and ``x_{t_k}`` forward-noised data (or a teacher roll-out from the prior).
Each stage trains a standalone student (kind "student": steps, grid, Euler, baked-in guidance, teacher
hash); stages.py runs, resumes and guards the stages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.errors import DistillKacError
from distillkac.guidance import check_guidance, guided_velocity
from distillkac.paths import per_row
from distillkac.presets import START_STATES
from distillkac.rng import rand
from distillkac.solvers import VelocityFn, solve, time_grid

# ------------------------------------------------------------------------------------------ the plan

def parse_plan(text: str) -> tuple[int, ...]:
    """``"100,20,4,2,1"`` -> ``(100, 20, 4, 2, 1)`` (at least two positive integers)."""
    try:
        plan = tuple(int(part) for part in str(text).split(","))
    except ValueError as err:
        raise DistillKacError(f"--plan: expected comma-separated step counts such as 100,20,4,2,1, "
                              f"got {text!r}") from err
    return plan


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


# -------------------------------------------------------------------------------------- the teacher

@dataclass
class Teacher:
    """A frozen teacher: its network, meta, weights hash, own step count and solver.

    ``forward_guidance`` is the CFG weight applied at each evaluation (stage 1); a student teacher has
    its guidance baked in (``forward_guidance`` 0, ``guidance`` its meta's weight).
    """

    model: nn.Module
    meta: dict[str, Any]
    sha256: str
    steps: int
    solver: str
    guidance: float
    forward_guidance: float
    artifact: Path

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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
                 device: str | torch.device = "cpu") -> Teacher:
    """Load a teacher artefact. A Kac teacher (or baseline) runs guided AB-2 with ``steps`` steps and CFG
    weight ``guidance``; a student runs its own Euler steps (which must equal ``steps``) with its baked-in
    guidance (which must equal ``guidance``)."""
    artifact = Path(artifact)
    model, meta = load_artifact(artifact, device=device)
    model.requires_grad_(False)
    kind = meta.get("kind")
    if kind not in Artifact.KINDS:
        raise DistillKacError(f"--teacher: {artifact} is a {kind!r} artefact; expected one of {Artifact.KINDS}")
    own = Artifact(meta, artifact).baked_sampling()
    if own is not None:
        if own.steps != steps:
            raise DistillKacError(f"--plan: the first step count {steps} must equal the teacher's steps "
                                  f"{own.steps} ({artifact} is a {own.steps}-step student)")
        if guidance != own.guidance:
            raise DistillKacError(f"--guidance: {artifact} is a student with guidance w={own.guidance:g} baked "
                                  f"in; its students keep it (got {guidance:g})")
        return Teacher(model, meta, meta["weights_sha256"], steps, own.solver, own.guidance, own.forward_guidance,
                       artifact)
    weight = check_guidance(guidance, int(meta["num_classes"]))
    return Teacher(model, meta, meta["weights_sha256"], steps, "ab2", weight, weight, artifact)


# ------------------------------------------------------------------------------------------ the loss

class EndpointPair(NamedTuple):
    """One training example: start state and time, end time, the teacher's endpoint, the labels."""

    x_start: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    k: torch.Tensor


class EndpointObjective:
    """The endpoint-distillation loss of one stage (method.md §4) as a train.py Objective."""

    def __init__(self, teacher: Teacher, path, stage: Stage, start_states: str = "data",
                 history: Sequence[dict[str, Any]] = ()) -> None:
        if start_states not in START_STATES:
            raise DistillKacError(f"--start-states: must be one of {', '.join(START_STATES)}, got {start_states!r}")
        if stage.teacher_steps != teacher.steps:
            raise DistillKacError(f"stage {stage.index}: its teacher takes {teacher.steps} steps, "
                                  f"the plan says {stage.teacher_steps}")
        self.teacher, self.path, self.stage, self.start_states = teacher, path, stage, start_states
        self.num_classes = int(teacher.meta["num_classes"])
        self.history = list(history)
        self._teacher_device: torch.device | None = None

    def _teacher_on(self, device: torch.device) -> None:
        if self._teacher_device != device:
            self.teacher.model.to(device)
            self._teacher_device = device

    @torch.no_grad()
    def endpoint_pair(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> EndpointPair:
        """Draw ``k`` and the start state, and run the teacher's N steps from ``t_k`` to ``t_{k+1}`` (row ``b``
        on its own segment of the teacher's grid: times ``k_b·N .. (k_b + 1)·N`` of its M·N steps)."""
        self._teacher_on(x0.device)
        batch, M, N = x0.shape[0], self.stage.student_steps, self.stage.segment
        y = torch.zeros_like(y) if self.num_classes == 0 else y
        k = torch.clamp((rand((batch,), generator, dtype=torch.float64, device=x0.device) * M).long(), max=M - 1)
        segments = k[:, None] * N + torch.arange(N + 1, device=x0.device)
        grid = time_grid(M * N, self.path.T).to(x0.device)[segments]
        t_start, t_end = grid[:, 0].to(x0.dtype), grid[:, -1].to(x0.dtype)
        if self.start_states == "data":
            x_start = self.path.sample(x0, t_start, generator=generator).x_t
        else:
            x_start = self._rollout(x0, y, k, generator)
        target = solve(self._teacher_fn(y), x_start, grid, method=self.teacher.solver).x
        return EndpointPair(x_start, t_start, t_end, target, y, k)

    def _teacher_fn(self, y: torch.Tensor) -> VelocityFn:
        return lambda x, t: self.teacher.velocity(x, t, y)

    def _rollout(self, x0: torch.Tensor, y: torch.Tensor, k: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """The teacher's own solver on its own grid from a prior draw at T; row ``b`` stops at ``t_{k_b}``
        (after ``k_b·N`` of its steps)."""
        x_prior = self.path.prior(tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
        stops = k * self.stage.segment
        longest = int(stops.max())
        if longest == 0:
            return x_prior
        states = torch.empty_like(x_prior)

        def keep(step: int, t: float, x: torch.Tensor, u: torch.Tensor) -> None:
            rows = stops == step
            states[rows] = x[rows]

        grid = time_grid(self.teacher.steps, self.path.T)[:longest + 1]
        final = solve(self._teacher_fn(y), x_prior, grid, method=self.teacher.solver, on_step=keep).x
        rows = stops == longest
        states[rows] = final[rows]
        return states

    def per_sample_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        pair = self.endpoint_pair(x0, y, generator)
        delta = per_row(pair.t_start.double() - pair.t_end.double(), pair.x_start)
        prediction = pair.x_start - delta * model(pair.x_start, pair.t_start, pair.y)
        return (prediction.float() - pair.target.float()).square().flatten(1).mean(dim=1)

    def stage_record(self) -> dict[str, Any]:
        return {"steps": self.stage.student_steps, "teacher_steps": self.teacher.steps,
                "teacher_solver": self.teacher.solver, "teacher_kind": self.teacher.meta.get("kind"),
                "teacher_sha256": self.teacher.sha256, "start_states": self.start_states}

    def artifact_meta(self) -> dict[str, Any]:
        M = self.stage.student_steps
        return {"kind": Artifact.STUDENT, "path": self.path.to_config(), "objective": "endpoint-mse",
                "steps": M, "grid": "uniform", "grid_times": time_grid(M, self.path.T).tolist(),
                "solver": "euler", "guidance": self.teacher.guidance, "teacher_sha256": self.teacher.sha256,
                "teacher_steps": self.teacher.steps, "teacher_solver": self.teacher.solver,
                "start_states": self.start_states, "stages": [*self.history, self.stage_record()]}
