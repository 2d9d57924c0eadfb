"""Run configurations: dataclasses for every part of a run, their JSON round trip and validation.

A ``RunConfig`` is what a run directory's ``config.json`` holds (plus an ``"environment"`` record
written by the training loop); ``validate()`` rejects nonsense with a one-line ``DistillKacError`` naming
the field. A ``DistillConfig`` describes a whole distillation; each of its stages is a RunConfig with the
teacher's network and path. The per-dataset values of these configs are in presets.py.

Batch sizes are GLOBAL (EDM practice): ``train.batch`` images per optimiser step whatever the number
of processes, cut into fixed micro-batches of ``train.micro_batch`` images (see train.py for why this
makes a run independent of the process count). EMA is given as a half-life in images, so its meaning
does not change with the batch size: ``beta = 0.5 ** (batch / ema_halflife_images)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from distillkac.data import DataConfig
from distillkac.errors import DistillKacError
from distillkac.fields import dataclass_from_dict, is_int, is_number, require
from distillkac.nets import MLPConfig, NetworkConfig, UNetConfig, network_config_from_dict
from distillkac.paths import PathConfig
from distillkac.runtime import PRECISIONS

CHANNELS_LAST = ("auto", "on", "off")
PREVIEW_SOLVERS = ("euler", "ab2", "heun", "midpoint", "ddim")
START_STATES = ("data", "rollout", "mix")
STAGE1_TARGETS = ("ab2-restart", "ab2-carried", "euler")
LOSS_FORMS = ("endpoint", "velocity")


def ema_halflife_for_decay(decay: float, batch: int) -> float:
    """The half-life ``B ln(0.5) / ln(d)`` in images of an EMA decay ``d`` per step of ``B = batch`` images."""
    return batch * math.log(0.5) / math.log(decay)


@dataclass
class OptimConfig:
    """AdamW with a linear learning-rate warm-up over ``warmup_images`` images and gradient clipping
    at global norm ``grad_clip`` (0 = no clipping)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_images: int = 640_000
    grad_clip: float = 1.0
    eps: float = 1e-8

    def validate(self) -> None:
        require(is_number(self.lr) and self.lr > 0, "optim.lr", "must be a finite number > 0", self.lr)
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        require(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "optim.betas",
                "must be two numbers in [0, 1)", self.betas)
        require(is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                "must be a finite number >= 0", self.weight_decay)
        require(is_int(self.warmup_images) and self.warmup_images >= 0, "optim.warmup_images",
                "must be an integer >= 0", self.warmup_images)
        require(is_number(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip",
                "must be a finite number >= 0 (0 = no clipping)", self.grad_clip)
        require(is_number(self.eps) and self.eps > 0, "optim.eps", "must be a finite number > 0", self.eps)


@dataclass
class TrainConfig:
    """The training loop's settings (train.py). ``batch`` is global; ``ema_rampup`` (EDM's ramp-up
    ratio, None = off) caps the EMA half-life at ``ema_rampup * images_seen`` early in training.
    Previews (``samples/step-*.png``): ``preview_num`` images (toy2d: points) of ``preview_steps`` solver
    steps every ``sample_every`` steps and at the end, each after that step's checkpoint; 0 in any of
    the three turns previews off."""

    steps: int = 400_000
    batch: int = 128
    micro_batch: int = 32
    ema_halflife_images: float = 887_000.0
    ema_rampup: float | None = 0.05
    label_dropout: float = 0.1
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 10_000
    sample_every: int = 10_000
    preview_num: int = 64
    preview_steps: int = 100
    preview_solver: str = "ab2"
    preview_guidance: float = 1.0
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    device: str = "auto"
    skip_nonfinite: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch", "micro_batch", "log_every", "ckpt_every"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"train.{name}", "must be an integer > 0", value)
        for name in ("sample_every", "preview_num", "preview_steps"):
            value = getattr(self, name)
            require(is_int(value) and value >= 0, f"train.{name}", "must be an integer >= 0 (0 = no previews)", value)
        require(self.batch % self.micro_batch == 0, "train.micro_batch", f"must divide train.batch = {self.batch}",
                self.micro_batch)
        require(is_number(self.ema_halflife_images) and self.ema_halflife_images > 0, "train.ema_halflife_images",
                "must be a finite number > 0", self.ema_halflife_images)
        require(self.ema_rampup is None or (is_number(self.ema_rampup) and self.ema_rampup > 0), "train.ema_rampup",
                "must be a number > 0 or null (no ramp-up)", self.ema_rampup)
        require(is_number(self.label_dropout) and 0 <= self.label_dropout < 1, "train.label_dropout",
                "must be in [0, 1)", self.label_dropout)
        require(is_int(self.seed) and 0 <= self.seed < 2**63, "train.seed", "must be an integer in [0, 2**63)",
                self.seed)
        require(self.preview_solver in PREVIEW_SOLVERS, "train.preview_solver",
                f"must be one of {', '.join(PREVIEW_SOLVERS)}", self.preview_solver)
        require(is_number(self.preview_guidance) and self.preview_guidance >= 0, "train.preview_guidance",
                "must be a finite number >= 0", self.preview_guidance)
        for name, allowed in (("precision", PRECISIONS), ("channels_last", CHANNELS_LAST)):
            value = getattr(self, name)
            require(value in allowed, f"train.{name}", f"must be one of {', '.join(allowed)}", value)
        require(isinstance(self.compile, bool), "train.compile", "must be true or false", self.compile)
        require(isinstance(self.device, str) and bool(self.device), "train.device",
                "must be 'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        require(is_int(self.skip_nonfinite) and self.skip_nonfinite >= 0, "train.skip_nonfinite",
                "must be an integer >= 0", self.skip_nonfinite)


#: Fields of ``train`` a resumed run may change: length, logging, previews and checkpoint cadence.
RESUMABLE_TRAIN_FIELDS = ("steps", "log_every", "ckpt_every", "sample_every", "preview_num", "preview_steps",
                          "preview_solver", "preview_guidance")


@dataclass
class DistillConfig:
    """A distillation (stages.py): the plan of step counts (teacher first), the CFG weight baked into the
    students, where the start states ``x_{t_k}`` come from, the optimiser steps of each stage (one count
    for all, or one per stage), the prior draws of the path-closeness curve, and the optimiser and loop
    that every stage shares. A stage runs ``train`` at its own length (``train.steps`` is not used).

    The method's choices (distill.py): ``target`` is the stage-1 teacher endpoint (``ab2-restart``: AB-2
    restarted with an Euler step in every segment; ``ab2-carried``: read off the teacher's uninterrupted
    AB-2 roll-outs in the trajectory pool; ``euler``: Euler steps); ``start_states`` are forward-noised
    ``data``, pooled teacher ``rollout`` states, or a 50/50 ``mix``; ``student_dropout`` (None: the
    teacher's); ``loss`` is the ``endpoint`` MSE or the ``velocity`` form (the same divided by Δ²). The pool
    is rebuilt every ``pool_refresh`` optimiser steps with enough roll-outs that each pooled pair is used
    ``pool_reuse`` times on average. ``teacher_precision`` is what the teacher's network runs in while it
    makes the targets and roll-outs (auto, fp32, bf16; None: the loop's ``train.precision``)."""

    plan: tuple[int, ...] = (100, 20, 4, 2, 1)
    guidance: float = 0.0
    start_states: str = "data"
    target: str = "ab2-restart"
    student_dropout: float | None = None
    loss: str = "endpoint"
    pool_refresh: int = 20
    pool_reuse: float = 1.0
    teacher_precision: str | None = None
    steps_per_stage: int | tuple[int, ...] = 10_000
    closeness_samples: int = 256
    optim: OptimConfig = field(default_factory=partial(OptimConfig, lr=1e-4, warmup_images=0))
    train: TrainConfig = field(default_factory=partial(TrainConfig, ema_halflife_images=100_000.0,
                                                       ckpt_every=1000, sample_every=1000))

    def validate(self) -> DistillConfig:
        """Refuse nonsense in the distillation's own fields (``optim`` and ``train`` are validated with
        each stage's RunConfig); returns self."""
        require(self.start_states in START_STATES, "--start-states", f"must be one of {', '.join(START_STATES)}",
                self.start_states)
        require(self.target in STAGE1_TARGETS, "--target", f"must be one of {', '.join(STAGE1_TARGETS)}", self.target)
        if self.target == "ab2-carried" and self.start_states == "data":
            raise DistillKacError("--target: ab2-carried reads the teacher's roll-outs; use it with --start-states "
                                  "rollout or mix")
        require(self.loss in LOSS_FORMS, "--loss", f"must be one of {', '.join(LOSS_FORMS)}", self.loss)
        require(self.student_dropout is None or (is_number(self.student_dropout) and 0 <= self.student_dropout < 1),
                "--student-dropout", "must be in [0, 1)", self.student_dropout)
        require(is_int(self.pool_refresh) and self.pool_refresh >= 1, "--pool-refresh", "must be a positive integer",
                self.pool_refresh)
        require(is_number(self.pool_reuse) and self.pool_reuse > 0, "--pool-reuse", "must be a number > 0",
                self.pool_reuse)
        require(self.teacher_precision is None or self.teacher_precision in PRECISIONS, "--teacher-precision",
                f"must be one of {', '.join(PRECISIONS)}", self.teacher_precision)
        require(is_int(self.closeness_samples) and self.closeness_samples >= 1, "--closeness-samples",
                "must be a positive integer", self.closeness_samples)
        require(is_number(self.guidance) and self.guidance >= 0, "--guidance", "must be a finite number >= 0",
                self.guidance)
        counts = self.steps_per_stage if isinstance(self.steps_per_stage, tuple) else (self.steps_per_stage,)
        if isinstance(self.steps_per_stage, tuple) and len(counts) != len(self.plan) - 1:
            raise DistillKacError(f"--steps-per-stage: give one count, or one per stage ({len(self.plan) - 1} for "
                                  f"the plan {','.join(map(str, self.plan))}), got {len(counts)}")
        require(all(is_int(n) and n >= 1 for n in counts), "--steps-per-stage", "must be positive integers",
                self.steps_per_stage)
        return self

    def stage_steps(self, stage) -> int:
        """Optimiser steps of ``stage`` (a :class:`distillkac.distill.Stage`, numbered from 1)."""
        if isinstance(self.steps_per_stage, tuple):
            return self.steps_per_stage[stage.index - 1]
        return self.steps_per_stage

    def with_changes(self, changes: Mapping[str, Any]) -> DistillConfig:
        """A copy with ``changes`` applied; a key is a field name, or ``optim.<name>`` / ``train.<name>``."""
        parts: dict[str, dict[str, Any]] = {"": {}, "optim": {}, "train": {}}
        for name, value in changes.items():
            part, _, key = name.rpartition(".")
            parts[part][key] = value
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, **parts["optim"]),
                                   train=dataclasses.replace(self.train, **parts["train"]), **parts[""])


@dataclass
class RunConfig:
    """Everything that defines a run: data, network, path, optimiser, loop (and, for a distillation stage,
    its record: stage, step counts, guidance, start states and the teacher's identity)."""

    data: DataConfig
    net: NetworkConfig
    path: PathConfig = field(default_factory=PathConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists when dumped)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Inverse of ``to_dict`` (a run directory's ``"environment"`` record is ignored)."""
        if not isinstance(values, dict):
            raise DistillKacError(f"config: expected a JSON object, got {type(values).__name__}")
        allowed = {"data", "net", "path", "optim", "train", "distill", "environment"}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise DistillKacError(f"config: unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
        for required in ("data", "net"):
            if required not in values:
                raise DistillKacError(f"config: missing key {required!r}")
        distill = values.get("distill")
        if distill is not None and not isinstance(distill, dict):
            raise DistillKacError(f"config.distill: expected a JSON object or null, "
                                  f"got {type(distill).__name__}")
        return cls(data=DataConfig.from_dict(values["data"]), net=network_config_from_dict(values["net"]),
                   path=dataclass_from_dict(PathConfig, values.get("path", {}), "path"),
                   optim=dataclass_from_dict(OptimConfig, values.get("optim", {}), "optim"),
                   train=dataclass_from_dict(TrainConfig, values.get("train", {}), "train"),
                   distill=distill)

    def validate(self) -> RunConfig:
        """Raise DistillKacError (one line, naming the field) for any nonsense value; returns self."""
        require(isinstance(self.data, DataConfig), "data", "must be a DataConfig", type(self.data).__name__)
        require(isinstance(self.net, UNetConfig | MLPConfig), "net", "must be a UNetConfig or MLPConfig",
                type(self.net).__name__)
        self.net.validate()
        self.path.validate()
        self.optim.validate()
        self.train.validate()
        require((self.data.name == "toy2d") == isinstance(self.net, MLPConfig), "net.kind",
                "toy2d data needs the mlp network and images need the unet", self.net.kind)
        if isinstance(self.net, UNetConfig):
            require(self.data.resolution in (None, self.net.resolution), "net.resolution",
                    f"must equal data.resolution = {self.data.resolution}", self.net.resolution)
            require(self.data.channels in (None, self.net.image_channels), "net.image_channels",
                    f"must equal data.channels = {self.data.channels}", self.net.image_channels)
        return self


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted name, old value, new value)`` of each field that differs between two nested dicts, by name."""
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{name}.")
        elif _normalise(a) != _normalise(b):
            yield name, a, b


def first_difference(stored: dict[str, Any], current: dict[str, Any], ignored: Collection[str] = ()
                     ) -> tuple[str, Any, Any] | None:
    """``(dotted name, stored value, current value)`` of the first field (by dotted name) that differs between
    two ``RunConfig.to_dict()`` dicts and is not in ``ignored``; None if none."""
    return next((difference for difference in _differences(stored, current) if difference[0] not in ignored), None)


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def fit_to_run(optim: OptimConfig, train: TrainConfig, run_images: int, *, fit_micro_batch: bool,
               fit_warmup: bool) -> tuple[OptimConfig, TrainConfig, list[str]]:
    """Fix two preset values that trap short runs (those the user did not set), with a line saying what
    changed: with ``fit_micro_batch`` a micro-batch that does not divide the batch becomes the batch's largest
    divisor below it, and with ``fit_warmup`` a learning-rate warm-up longer than a fifth of the run's
    ``run_images`` is cut to that fifth."""
    notes = []
    batch, micro = train.batch, train.micro_batch
    if fit_micro_batch and is_int(batch) and is_int(micro) and 0 < batch and 0 < micro and batch % micro:
        fitted = max(d for d in range(1, min(batch, micro) + 1) if batch % d == 0)
        notes.append(f"micro-batch lowered from {micro} to {fitted} to divide --batch {batch} "
                     f"(set --micro-batch to choose)")
        train = dataclasses.replace(train, micro_batch=fitted)
    limit = max(run_images, 0) // 5
    if fit_warmup and is_int(optim.warmup_images) and optim.warmup_images > limit:
        notes.append(f"learning-rate warm-up shortened from {optim.warmup_images:,} to {limit:,} images, a fifth "
                     f"of this run's {run_images:,} (set --warmup-images to choose)")
        optim = dataclasses.replace(optim, warmup_images=limit)
    return optim, train, notes
