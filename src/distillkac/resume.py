"""The checkpoint half of the training loop: saving a run, resuming it, and recovering after a kill.

A checkpoint is two atomic writes, ``training-state.pt`` (model, EMA, optimiser, step) and then the
artefact (EMA weights), so the artefact is never newer than the state. Resuming refuses a config that
changed in anything but length, logging and cadence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillkac.checkpoint import (
    Artifact,
    artifact_sha256,
    load_training_state,
    portable_state_dict,
    read_artifact_meta,
    save_artifact,
    save_training_state,
)
from distillkac.config import RESUMABLE_TRAIN_FIELDS, RunConfig, first_difference
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_json, remove_stale_temporaries
from distillkac.runlog import RunLog
from distillkac.runtime import ProcessGroup, environment_record

STATE_FORMAT = "distillkac-training-state"


def check_resume_config(stored: dict[str, Any], config: RunConfig, state_path: Path, images_done: int = 0) -> None:
    """Refuse to resume when the config changed in anything but length, logging and cadence.

    The learning-rate warm-up may differ too when both warm-ups ended within the ``images_done`` already
    trained (the rest of the schedule is the same): a longer ``--steps`` lengthens the warm-up that the
    command line fits to a short run.
    """
    allowed = {f"train.{name}" for name in RESUMABLE_TRAIN_FIELDS}
    warmups = (stored.get("optim", {}).get("warmup_images"), config.optim.warmup_images)
    if all(isinstance(w, int) and w <= images_done for w in warmups):
        allowed.add("optim.warmup_images")
    check_unchanged(stored, config, allowed, f"resume: {state_path} was trained with")


def check_unchanged(stored: dict[str, Any], config: RunConfig, allowed: set[str], what: str) -> None:
    """Refuse (``what`` starts the message) the first setting of ``config`` that differs from ``stored``
    outside the dotted names ``allowed``."""
    difference = first_difference(stored, config.to_dict(), allowed)
    if difference is not None:
        name, old, new = difference
        raise DistillKacError(f"{what} {name} = {old!r}, now {new!r}; use the same settings or another --outdir")


class Checkpointing:
    """Save and resume for the trainer it is mixed into, which sets the attributes declared here."""

    config: RunConfig
    run_dir: Path
    objective: Any  # a distillkac.train.Objective (its artifact_meta goes into the artefact)
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    dist: ProcessGroup
    device: torch.device
    log: RunLog
    step: int
    skipped: int
    resumed_from: int
    last_saved: int

    def resume(self) -> None:
        """Continue from ``training-state.pt`` if there is one (the caller holds the run lock).

        A run killed at any moment is recovered here: rows and temporaries written after the last
        complete checkpoint are dropped, and an artefact older than the training state (the kill came
        between the two writes of a checkpoint) is rewritten from the state's EMA weights.
        """
        state_path = self.run_dir / Artifact.TRAINING_STATE
        if not state_path.is_file():
            self._discard_unsaved_progress(0)
            return
        state = load_training_state(state_path)
        if state.get("format") != STATE_FORMAT:
            raise DistillKacError(f"resume: {state_path} is not a distillkac training state")
        check_resume_config(state["config"], self.config, state_path,
                            int(state["step"]) * self.config.train.batch)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.resumed_from = self.last_saved = int(state["step"])
        self.skipped = int(state["nonfinite_skipped"])
        self._discard_unsaved_progress(self.step)
        if self.dist.is_main and not self._artifact_matches_state():
            self.save_artifact()
        self.log.info(f"resumed from {state_path} at step {self.step}")

    def _discard_unsaved_progress(self, step: int) -> None:
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
            self.log.truncate_stats(step)

    def _artifact_matches_state(self) -> bool:
        try:
            meta = read_artifact_meta(self.run_dir / Artifact.DIR)
            artifact_sha256(self.run_dir / Artifact.DIR)
        except DistillKacError:
            return False
        return meta.get("train_step") == self.step

    def save(self) -> None:
        """Training state, then the artefact (EMA weights), each atomically; main process only."""
        if self.dist.is_main:
            state = {"format": STATE_FORMAT, "version": 1, "step": self.step,
                     "nonfinite_skipped": self.skipped, "config": self.config.to_dict(),
                     "model": portable_state_dict(self.model), "ema": portable_state_dict(self.ema),
                     "optimizer": self.optimizer.state_dict()}
            save_training_state(self.run_dir / Artifact.TRAINING_STATE, state)
            self.save_artifact()
            self.log.info(f"checkpoint at step {self.step}")
        self.last_saved = self.step
        self.dist.barrier()

    def save_artifact(self) -> None:
        meta = {**self.objective.artifact_meta(), "train_step": self.step,
                "train_images": self.step * self.config.train.batch}
        save_artifact(self.run_dir / Artifact.DIR, self.ema, meta)

    def write_config(self) -> None:
        if self.dist.is_main:
            record = {**self.config.to_dict(),
                      "environment": environment_record(self.device, self.dist.world_size)}
            atomic_write_json(self.run_dir / Artifact.RUN_CONFIG, record)
