"""The one training loop: teacher training now, endpoint distillation stages later.

What the loop owns and an objective does not: data batches, micro-batching and gradient accumulation, DDP, mixed
precision, AdamW with warm-up, gradient clipping, EMA, non-finite guards, logging, previews, checkpoints and exact
resume (:mod:`distillkac.resume`). An :class:`Objective` only turns a micro-batch into per-sample losses.

Determinism that does not depend on the number of processes (EDM practice, made exact):

* the GLOBAL batch of step ``s`` is the index draw of a generator seeded from ``(seed, s)``;
* it is cut into fixed micro-batches of ``train.micro_batch`` images; micro-batch ``j`` draws its
  augmentation, times, noise and label dropout from a generator seeded from ``(seed, s, j)``;
* micro-batches go round-robin to the DDP ranks; each rank accumulates ``sum(loss) * world / batch``
  (DDP averages over ranks), so the all-reduced gradient is the global mean whatever the world size.

So 1 or N processes compute the same update up to floating-point summation order, and a run stopped
after k steps and resumed equals the uninterrupted run bit for bit (on the CPU): all randomness is a
function of ``(seed, step, micro-batch)``, so no RNG state needs saving.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from distillkac import preemption
from distillkac.checkpoint import Artifact
from distillkac.config import RunConfig
from distillkac.data import load_dataset
from distillkac.errors import DistillKacError
from distillkac.files import RunLock
from distillkac.nets import build_network
from distillkac.paths import build_path
from distillkac.preemption import Interrupted, Preempted
from distillkac.previews import Preview, save_preview, teacher_preview
from distillkac.resume import Checkpointing
from distillkac.rng import rand
from distillkac.runlog import RunLog, StatsWindow, run_summary, speed_line
from distillkac.runtime import autocast, init_distributed, world_size


class Objective(Protocol):
    """What the loop trains: per-sample losses of a micro-batch, and the artefact's metadata."""

    def per_sample_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        """Loss per sample ``[B]`` (no reduction); every random draw comes from ``generator``."""

    def artifact_meta(self) -> dict[str, Any]:
        """Merged into the artefact's config.json (kind, path, guidance, steps, ...)."""

    # Optional: ``prepare_step(step)`` is called before optimiser step ``step`` (0-based), e.g. to select
    # the distillation's trajectory pool; it must depend on ``step`` only (resume replays it).


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    resumed_from: int
    artifact_dir: Path
    last_loss: float | None
    nonfinite_skipped: int
    wall_seconds: float


class TeacherObjective:
    """Velocity regression on a path (method.md §2): ``t ~ U(0, T)``, ``x_t`` and target ``u*`` from the
    path, labels dropped to the null label with probability ``label_dropout`` per sample,
    loss ``mean over coordinates of (u_theta(x_t, t, y) - u*)^2``."""

    def __init__(self, path, num_classes: int, label_dropout: float = 0.1) -> None:
        self.path = path
        self.num_classes = int(num_classes)
        self.label_dropout = float(label_dropout)

    def per_sample_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        batch = x0.shape[0]
        t = rand((batch,), generator, device=x0.device) * self.path.T
        point = self.path.sample(x0, t, generator=generator)
        drop = rand((batch,), generator, device=x0.device) < self.label_dropout
        y = torch.where(drop, torch.full_like(y, self.num_classes), y) if self.num_classes else torch.zeros_like(y)
        prediction = model(point.x_t, t, y)
        return (prediction.float() - point.target.float()).square().flatten(1).mean(dim=1)

    def artifact_meta(self) -> dict[str, Any]:
        kind = Artifact.TEACHER if self.path.name == "kac" else Artifact.BASELINE
        return {"kind": kind, "path": self.path.to_config(), "objective": "velocity-mse",
                "label_dropout": self.label_dropout}


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``(seed, step, micro_batch)`` (sha256, so nearby tuples give
    unrelated streams)."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_indices(seed: int, step: int, batch: int, dataset_size: int) -> torch.Tensor:
    """The global batch of step ``step`` (0-based): uniform indices with replacement."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "batch", step))
    return torch.randint(dataset_size, (batch,), generator=generator)


def micro_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "micro", step, micro))


@contextlib.contextmanager
def network_rng(seed: int, step: int, micro: int, device: torch.device) -> Iterator[None]:
    """Seed the global torch RNG from ``(seed, step, micro)`` for the duration of one micro-batch.

    This is the ONE place the library touches the global RNG: ``nn.Dropout`` (inside the networks)
    draws its masks from it and takes no generator. ``fork_rng`` saves and restores the caller's state,
    so nothing leaks out, and the masks depend on (seed, step, micro-batch) only, which keeps
    runs resumable bit for bit and independent of the process count.
    """
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "dropout", step, micro))
        yield


class _PreviewStopped(Exception):
    """A stop signal came while a preview was being drawn (the preview is dropped; its step is saved)."""


class _Trainer(Checkpointing):
    def __init__(self, config: RunConfig, run_dir: Path, model: nn.Module, objective: Objective, dataset,
                 preview: Preview | None, progress: bool, notes: tuple[str, ...] = ()) -> None:
        self.config, self.run_dir, self.objective, self.dataset = config, run_dir, objective, dataset
        self.preview, self.progress, self.notes = preview, progress, notes
        self.micro_count = config.train.batch // config.train.micro_batch
        processes = world_size()
        if self.micro_count % processes:
            raise DistillKacError(f"train.micro_batch: {self.micro_count} micro-batches per step "
                                  f"(batch {config.train.batch} / micro-batch {config.train.micro_batch}) "
                                  f"cannot be shared by {processes} processes; choose a multiple")
        self.dist, self.device = init_distributed(config.train.device)
        setting = config.train.channels_last
        self.channels_last = getattr(model.config, "kind", None) == "unet" and (
            setting == "on" or (setting == "auto" and self.device.type == "cuda"))
        self.model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else None)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay)
        self.step, self.skipped, self.resumed_from, self.last_saved = 0, 0, 0, 0
        self.log = RunLog(run_dir, self.dist.is_main, self._echo)
        self.bar = None

    def _echo(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.progress:
            print(message, file=sys.stderr)

    def learning_rate(self) -> float:
        optim = self.config.optim
        if optim.warmup_images == 0:
            return optim.lr
        return optim.lr * min(1.0, (self.step + 1) * self.config.train.batch / optim.warmup_images)

    def ema_beta(self) -> float:
        """``0.5 ** (batch / half-life)``, the half-life capped at ``ema_rampup * images seen`` (EDM)."""
        train = self.config.train
        halflife = train.ema_halflife_images
        if train.ema_rampup is not None:
            halflife = min(halflife, (self.step + 1) * train.batch * train.ema_rampup)
        return 0.5 ** (train.batch / max(halflife, 1e-8))

    def accumulate_gradients(self, network: nn.Module) -> torch.Tensor:
        """Forward/backward of this rank's micro-batches; returns the summed loss (float64)."""
        train = self.config.train
        indices = batch_indices(train.seed, self.step, train.batch, len(self.dataset))
        mine = list(range(self.dist.rank, self.micro_count, self.dist.world_size))
        scale = self.dist.world_size / train.batch
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for position, micro in enumerate(mine):
            generator = micro_generator(train.seed, self.step, micro, self.device)
            rows = indices[micro * train.micro_batch:(micro + 1) * train.micro_batch]
            x0, y = self.dataset.get_batch(rows, generator)
            x0 = x0.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
            y = y.to(self.device)
            last = position == len(mine) - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else network.no_sync()
            with sync, network_rng(train.seed, self.step, micro, self.device):
                with autocast(self.device, self.config.train.precision):
                    losses = self.objective.per_sample_loss(network, x0, y, generator)
                loss_sum = losses.float().sum()
                (loss_sum * scale).backward()
            total += loss_sum.detach().double()
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        return total

    def update_ema(self, beta: float) -> None:
        with torch.no_grad():
            for ema_param, param in zip(self.ema.parameters(), self.model.parameters()):
                ema_param.lerp_(param.detach(), 1.0 - beta)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers()):
                ema_buffer.copy_(buffer)

    def train_step(self, network: nn.Module) -> tuple[float, float, bool]:
        """One optimiser step; returns (mean loss, pre-clip gradient norm, whether it was applied)."""
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        prepare = getattr(self.objective, "prepare_step", None)
        if prepare is not None:
            prepare(self.step)
        loss = float(self.accumulate_gradients(network)) / self.config.train.batch
        clip = self.config.optim.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                         clip if clip > 0 else math.inf))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.update_ema(self.ema_beta())
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, finite

    def handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count a bad step; past ``train.skip_nonfinite`` of them, stop (nothing poisoned is saved)."""
        self.skipped += 1
        what = f"loss {loss}, gradient norm {grad_norm}"
        if self.skipped > self.config.train.skip_nonfinite:
            kept = (f"the last good checkpoint (step {self.last_saved}) is kept in {self.run_dir}"
                    if self.last_saved else "no checkpoint had been written yet")
            raise DistillKacError(f"non-finite loss or gradient at step {self.step + 1} ({what}); {kept}; "
                                  f"lower --lr or allow skips with --skip-nonfinite")
        self.log.info(f"step {self.step + 1}: non-finite {what}; update skipped "
                      f"({self.skipped} of at most {self.config.train.skip_nonfinite})")

    def wrap(self) -> nn.Module:
        network = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            network = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if self.config.train.compile:
            network = torch.compile(network)
        return network

    def run(self) -> TrainResult:
        train = self.config.train
        start_time = time.perf_counter()
        if self.step >= train.steps:
            self.log.info(f"already trained for {self.step} >= {train.steps} steps; nothing to do")
            return self.result(None, start_time)
        network = self.wrap()
        for note in self.notes:
            self.log.info(note)
        self.log.info(f"training steps {self.step + 1}..{train.steps} on {self.device} "
                      f"x{self.dist.world_size}, batch {train.batch} in {self.micro_count} "
                      f"micro-batches of {train.micro_batch}")
        self.model.train()
        window = StatsWindow(self.step, time.perf_counter())
        loss, step_seconds = None, []
        if self.progress and self.dist.is_main:
            self.bar = tqdm(total=train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                            desc=self.run_dir.name)
        try:
            while self.step < train.steps:
                step_start = time.perf_counter()
                loss, grad_norm, finite = self.train_step(network)
                if not finite:
                    self.handle_nonfinite(loss, grad_norm)
                self.step += 1
                if len(step_seconds) < 3:  # the first step pays for warming up: log the speed after the third
                    step_seconds.append(time.perf_counter() - step_start)
                    if len(step_seconds) == 3:
                        self.log.info(speed_line(step_seconds, train.batch, train.steps - self.step, str(self.device)))
                window.add(loss if finite else None)
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                self.after_step(window, grad_norm, start_time)
                if self.step < train.steps and self.stop_requested():
                    self.stop()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        self.log.info(f"done: step {self.step}, last loss {loss:.5f}")
        return self.result(loss, start_time)

    def stop_requested(self) -> bool:
        """Whether a stop signal came (to any process: they agree, so all stop after the same step)."""
        wanted = preemption.requested() is not None
        if self.dist.world_size == 1:
            return wanted
        flag = torch.tensor([float(wanted)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self) -> None:
        """Checkpoint the step just taken (unless it is saved already) and raise :class:`Preempted`."""
        if self.last_saved != self.step:
            self.save()
        message = (f"stopped by {preemption.requested() or 'a stop signal'} after step {self.step} of "
                   f"{self.config.train.steps}; checkpoint written to {self.run_dir}; rerun the same command "
                   f"to resume")
        self.log.info(message, echo=False)
        raise Preempted(message)

    def kept(self) -> str:
        """What an interruption now leaves behind, for the message the command line prints."""
        train = self.config.train
        done = f"after {self.step} of {train.steps} steps"
        if self.last_saved:
            return (f"{done}; the checkpoint of step {self.last_saved} in {self.run_dir} is kept, rerun the same "
                    f"command to resume")
        first = min(train.ckpt_every, train.steps)
        return f"{done}; nothing was saved yet (the first checkpoint comes at step {first})"

    def after_step(self, window: StatsWindow, grad_norm: float, start_time: float) -> None:
        """Stats row, checkpoint and then preview grid when their cadence (or the last step) comes."""
        train = self.config.train
        final = self.step == train.steps
        if self.step % train.log_every == 0 or final:
            now = time.perf_counter()
            self.log.stats({"step": self.step, "images": self.step * train.batch, "loss": window.mean_loss(),
                            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                            "images_per_s": window.images_per_second(self.step, train.batch, now),
                            "nonfinite_skipped": self.skipped, "wall_s": now - start_time})
            window.reset(self.step, now)
        if self.step % train.ckpt_every == 0 or final:
            self.save()
        if self.preview is not None and train.sample_every and (self.step % train.sample_every == 0 or final):
            self.save_preview()

    def save_preview(self) -> None:
        """Draw and write the preview of this step, with a progress bar; a stop signal drops it."""
        if not self.dist.is_main:
            return
        with tqdm(total=self.config.train.preview_steps, desc=f"preview at step {self.step}", unit="step",
                  leave=False, disable=self.bar is None) as bar:
            def on_step() -> None:
                if preemption.requested() is not None:
                    raise _PreviewStopped
                bar.update(1)

            try:
                samples = self.preview(self.ema, self.step, on_step=on_step)
            except _PreviewStopped:
                self.log.info(f"preview of step {self.step} left out: {preemption.requested()} received")
                return
        save_preview(samples, self.run_dir, self.step)

    def result(self, loss: float | None, start_time: float) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, step=self.step, resumed_from=self.resumed_from,
                           artifact_dir=self.run_dir / Artifact.DIR, last_loss=loss,
                           nonfinite_skipped=self.skipped, wall_seconds=time.perf_counter() - start_time)


def train(config: RunConfig, run_dir: str | os.PathLike, model: nn.Module, objective: Objective, dataset, *,
          preview: Preview | None = None, progress: bool = True, notes: tuple[str, ...] = ()) -> TrainResult:
    """Train ``model`` on ``objective`` over ``dataset`` into ``run_dir``, resuming from its training state.

    ``model`` must be freshly initialised (from ``config.train.seed``); on resume its weights are replaced by
    the stored ones. ``notes`` go to log.txt (and, with ``progress``, to stderr) before the first step. Runs
    under torchrun (DDP) or in a single process. SIGTERM or SIGUSR1 stops the run after the current step and
    its checkpoint (:class:`Preempted`); Ctrl-C stops at once (:class:`Interrupted`, naming the checkpoint kept).
    """
    config.validate()
    run_dir = Path(run_dir)
    joined_here = not dist.is_initialized()
    try:
        trainer = _Trainer(config, run_dir, model, objective, dataset, preview, progress, tuple(notes))
        lock = RunLock(run_dir) if trainer.dist.is_main else contextlib.nullcontext()  # creates run_dir
        with lock, preemption.preemptible():
            trainer.dist.barrier()
            trainer.resume()
            trainer.write_config()
            try:
                return trainer.run()
            except KeyboardInterrupt as err:
                raise Interrupted(trainer.kept()) from err
    finally:
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def time_train_steps(config: RunConfig, model: nn.Module, objective: Objective, dataset, count: int) -> list[float]:
    """Wall seconds of each of ``count`` optimiser steps of this loop (``train_step``) on a fresh ``model``,
    single-process; writes nothing (the run directory is ``os.devnull``, so any write would fail)."""
    trainer = _Trainer(config, Path(os.devnull), model, objective, dataset, preview=None, progress=False)
    network = trainer.wrap()
    trainer.model.train()
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        trainer.train_step(network)
        trainer.step += 1
        seconds.append(time.perf_counter() - start)
    return seconds


def resolve_config(config: RunConfig, data_shape: tuple[int, ...], num_classes: int) -> RunConfig:
    """Fill the network's shape and class count from the dataset (the "resolved" config of a run)."""
    shape = ({"image_channels": data_shape[0], "resolution": data_shape[-1]} if config.net.kind == "unet"
             else {"dim": data_shape[0]})
    net = dataclasses.replace(config.net, num_classes=num_classes, **shape)
    return dataclasses.replace(config, net=net).validate()


def train_teacher(config: RunConfig, run_dir: str | os.PathLike, *, progress: bool = True,
                  dataset=None, notes: tuple[str, ...] = ()) -> TrainResult:
    """Load the data, build the network (weights from ``train.seed``) and the path, and train; ``notes``
    (e.g. what the command line adjusted) go to log.txt before the run's summary."""
    dataset = dataset if dataset is not None else load_dataset(config.data, "train", progress)
    config = resolve_config(config, tuple(dataset.data_shape), dataset.num_classes)
    path = build_path(dataclasses.asdict(config.path))
    init = torch.Generator().manual_seed(derive_seed(config.train.seed, "init"))
    model = build_network(config.net, generator=init)
    objective = TeacherObjective(path, dataset.num_classes, config.train.label_dropout)
    preview = teacher_preview(config, path, dataset.num_classes)
    return train(config, run_dir, model, objective, dataset, preview=preview, progress=progress,
                 notes=(*notes, *run_summary(config, dataset)))
