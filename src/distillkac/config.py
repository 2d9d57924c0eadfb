"""Run configurations: dataclasses for every part of a run, their JSON round trip and validation.

A ``RunConfig`` is what a run directory's ``config.json`` holds (plus an ``"environment"`` record
written by the training loop); ``to_dict()`` / ``from_dict()`` round-trip it through JSON and
``validate()`` rejects nonsense with a one-line ``DistillKacError`` naming the field. A ``DistillConfig``
describes a whole distillation; each of its stages is a RunConfig with the teacher's network and path.
The per-dataset values of these configs are in presets.py.

Batch sizes are GLOBAL (EDM practice): ``train.batch`` images per optimiser step whatever the number
of processes, cut into fixed micro-batches of ``train.micro_batch`` images (see train.py for why this
makes a run independent of the process count). EMA is given as a half-life in images, so its meaning
does not change with the batch size: ``beta = 0.5 ** (batch / ema_halflife_images)``. An EMA decay
``d`` per step of ``B`` images has the half-life ``B * ln(0.5) / ln(d)`` images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from distillkac.data import DataConfig
from distillkac.errors import DistillKacError
from distillkac.fields import dataclass_from_dict
from distillkac.nets import MLPConfig, NetworkConfig, UNetConfig, network_config_from_dict
from distillkac.paths import PathConfig
from distillkac.runtime import PRECISIONS

CHANNELS_LAST = ("auto", "on", "off")
PREVIEW_SOLVERS = ("euler", "ab2", "heun", "midpoint", "ddim")
START_STATES = ("data", "rollout", "mix")
STAGE1_TARGETS = ("ab2-restart", "ab2-carried", "euler")
LOSS_FORMS = ("endpoint", "velocity")


def ema_halflife_for_decay(decay: float, batch: int) -> float:
    """The EMA half-life in images equivalent to a per-step decay ``decay`` at batch size ``batch``."""
    return batch * math.log(0.5) / math.log(decay)


def _fail(field_name: str, rule: str, value: Any) -> None:
    raise DistillKacError(f"{field_name}: {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
        if not (_is_number(self.lr) and self.lr > 0):
            _fail("optim.lr", "must be a finite number > 0", self.lr)
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            _fail("optim.betas", "must be two numbers in [0, 1)", self.betas)
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            _fail("optim.weight_decay", "must be a finite number >= 0", self.weight_decay)
        if not (_is_int(self.warmup_images) and self.warmup_images >= 0):
            _fail("optim.warmup_images", "must be an integer >= 0", self.warmup_images)
        if not (_is_number(self.grad_clip) and self.grad_clip >= 0):
            _fail("optim.grad_clip", "must be a finite number >= 0 (0 = no clipping)", self.grad_clip)
        if not (_is_number(self.eps) and self.eps > 0):
            _fail("optim.eps", "must be a finite number > 0", self.eps)


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
            if not (_is_int(value) and value > 0):
                _fail(f"train.{name}", "must be an integer > 0", value)
        for name in ("sample_every", "preview_num", "preview_steps"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                _fail(f"train.{name}", "must be an integer >= 0 (0 = no previews)", value)
        if self.batch % self.micro_batch:
            _fail("train.micro_batch", f"must divide train.batch = {self.batch}", self.micro_batch)
        if not (_is_number(self.ema_halflife_images) and self.ema_halflife_images > 0):
            _fail("train.ema_halflife_images", "must be a finite number > 0", self.ema_halflife_images)
        if self.ema_rampup is not None and not (_is_number(self.ema_rampup) and self.ema_rampup > 0):
            _fail("train.ema_rampup", "must be a number > 0 or null (no ramp-up)", self.ema_rampup)
        if not (_is_number(self.label_dropout) and 0 <= self.label_dropout < 1):
            _fail("train.label_dropout", "must be in [0, 1)", self.label_dropout)
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            _fail("train.seed", "must be an integer in [0, 2**63)", self.seed)
        if self.preview_solver not in PREVIEW_SOLVERS:
            _fail("train.preview_solver", f"must be one of {', '.join(PREVIEW_SOLVERS)}", self.preview_solver)
        if not (_is_number(self.preview_guidance) and self.preview_guidance >= 0):
            _fail("train.preview_guidance", "must be a finite number >= 0", self.preview_guidance)
        if self.precision not in PRECISIONS:
            _fail("train.precision", f"must be one of {', '.join(PRECISIONS)}", self.precision)
        if self.channels_last not in CHANNELS_LAST:
            _fail("train.channels_last", f"must be one of {', '.join(CHANNELS_LAST)}", self.channels_last)
        if not isinstance(self.compile, bool):
            _fail("train.compile", "must be true or false", self.compile)
        if not isinstance(self.device, str) or not self.device:
            _fail("train.device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if not (_is_int(self.skip_nonfinite) and self.skip_nonfinite >= 0):
            _fail("train.skip_nonfinite", "must be an integer >= 0", self.skip_nonfinite)


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
        if self.start_states not in START_STATES:
            raise DistillKacError(f"--start-states: must be one of {', '.join(START_STATES)}, "
                                  f"got {self.start_states!r}")
        if self.target not in STAGE1_TARGETS:
            raise DistillKacError(f"--target: must be one of {', '.join(STAGE1_TARGETS)}, got {self.target!r}")
        if self.target == "ab2-carried" and self.start_states == "data":
            raise DistillKacError("--target: ab2-carried reads the teacher's roll-outs; use it with --start-states "
                                  "rollout or mix")
        if self.loss not in LOSS_FORMS:
            raise DistillKacError(f"--loss: must be one of {', '.join(LOSS_FORMS)}, got {self.loss!r}")
        if self.student_dropout is not None and not (_is_number(self.student_dropout)
                                                     and 0 <= self.student_dropout < 1):
            raise DistillKacError(f"--student-dropout: must be in [0, 1), got {self.student_dropout!r}")
        if not (_is_int(self.pool_refresh) and self.pool_refresh >= 1):
            raise DistillKacError(f"--pool-refresh: must be a positive integer, got {self.pool_refresh!r}")
        if not (_is_number(self.pool_reuse) and self.pool_reuse > 0):
            raise DistillKacError(f"--pool-reuse: must be a number > 0, got {self.pool_reuse!r}")
        if self.teacher_precision is not None and self.teacher_precision not in PRECISIONS:
            raise DistillKacError(f"--teacher-precision: must be one of {', '.join(PRECISIONS)}, "
                                  f"got {self.teacher_precision!r}")
        if not (isinstance(self.closeness_samples, int) and self.closeness_samples >= 1):
            raise DistillKacError(f"--closeness-samples: must be a positive integer, got {self.closeness_samples!r}")
        if not (isinstance(self.guidance, int | float) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise DistillKacError(f"--guidance: must be a finite number >= 0, got {self.guidance!r}")
        counts = self.steps_per_stage if isinstance(self.steps_per_stage, tuple) else (self.steps_per_stage,)
        if isinstance(self.steps_per_stage, tuple) and len(counts) != len(self.plan) - 1:
            raise DistillKacError(f"--steps-per-stage: give one count, or one per stage ({len(self.plan) - 1} for "
                                  f"the plan {','.join(map(str, self.plan))}), got {len(counts)}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise DistillKacError(f"--steps-per-stage: must be positive integers, got {self.steps_per_stage!r}")
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
        return {"data": dataclasses.asdict(self.data), "net": self.net.to_dict(),
                "path": dataclasses.asdict(self.path), "optim": dataclasses.asdict(self.optim),
                "train": dataclasses.asdict(self.train), "distill": self.distill}

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
        if not isinstance(self.data, DataConfig):
            _fail("data", "must be a DataConfig", type(self.data).__name__)
        if not isinstance(self.net, UNetConfig | MLPConfig):
            _fail("net", "must be a UNetConfig or MLPConfig", type(self.net).__name__)
        self.net.validate()
        self.path.validate()
        self.optim.validate()
        self.train.validate()
        is_toy = self.data.name == "toy2d"
        if is_toy != isinstance(self.net, MLPConfig):
            _fail("net.kind", "toy2d data needs the mlp network and images need the unet", self.net.kind)
        if isinstance(self.net, UNetConfig):
            if self.data.resolution is not None and self.data.resolution != self.net.resolution:
                _fail("net.resolution", f"must equal data.resolution = {self.data.resolution}",
                      self.net.resolution)
            if self.data.channels is not None and self.data.channels != self.net.image_channels:
                _fail("net.image_channels", f"must equal data.channels = {self.data.channels}",
                      self.net.image_channels)
        return self


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two ``RunConfig.to_dict()`` dicts."""
    differing = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing.extend(config_differences(a, b, f"{name}."))
        elif _normalise(a) != _normalise(b):
            differing.append(name)
    return differing


def first_difference(stored: dict[str, Any], current: dict[str, Any], ignored: Collection[str] = ()
                     ) -> tuple[str, Any, Any] | None:
    """``(dotted name, stored value, current value)`` of the first field (in ``config_differences``
    order) that differs between two ``RunConfig.to_dict()`` dicts and is not in ``ignored``; None if none."""
    for name in config_differences(stored, current):
        if name not in ignored:
            return name, _lookup(stored, name), _lookup(current, name)
    return None


def _lookup(values: Any, dotted: str) -> Any:
    """The value at a dotted name (``"train.batch"``) of nested dicts; None where a part is missing."""
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


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
    if fit_micro_batch and _is_int(batch) and _is_int(micro) and 0 < batch and 0 < micro and batch % micro:
        fitted = max(d for d in range(1, min(batch, micro) + 1) if batch % d == 0)
        notes.append(f"micro-batch lowered from {micro} to {fitted} to divide --batch {batch} "
                     f"(set --micro-batch to choose)")
        train = dataclasses.replace(train, micro_batch=fitted)
    limit = max(run_images, 0) // 5
    if fit_warmup and _is_int(optim.warmup_images) and optim.warmup_images > limit:
        notes.append(f"learning-rate warm-up shortened from {optim.warmup_images:,} to {limit:,} images, a fifth "
                     f"of this run's {run_images:,} (set --warmup-images to choose)")
        optim = dataclasses.replace(optim, warmup_images=limit)
    return optim, train, notes
