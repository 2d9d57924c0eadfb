"""Reliability (issue #7): crash safety under SIGKILL, exact resume of train / distill / eval / ref,
the run lock with real processes, non-finite guards, a full disk and malicious resume state."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_config
from PIL import Image

import distillkac.metrics
from distillkac import checkpoint
from distillkac.checkpoint import load_artifact, load_training_state
from distillkac.cli import build_parser, main
from distillkac.cli.train import config_from_args
from distillkac.data import load_dataset
from distillkac.errors import DistillKacError
from distillkac.metrics import load_reference
from distillkac.nets import build_network
from distillkac.paths import build_path
from distillkac.train import TeacherObjective, resolve_config, train, train_teacher

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("single_thread")


def _train_args(outdir: Path, steps: int, ckpt_every: int = 1) -> list[str]:
    return ["train", "--preset", "toy2d", "--outdir", str(outdir), "--steps", str(steps), "--batch", "16",
            "--micro-batch", "16", "--ckpt-every", str(ckpt_every), "--log-every", "1",
            "--sample-every", "100000", "--device", "cpu", "--no-progress"]


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distillkac", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _assert_same_training(run_a: Path, run_b: Path) -> None:
    a, b = (load_training_state(run / "training-state.pt") for run in (run_a, run_b))
    assert a["step"] == b["step"]
    for key in ("model", "ema", "optimizer"):
        _assert_same_tensors(a[key], b[key], key)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the run's checkpoint, checking that it is complete and loadable (0 if none yet).

    The artefact is never newer than the training state; a kill inside the artefact's directory swap
    leaves the previous artefact moved aside (``.artifact.old-PID``), complete, for resume to replace.
    """
    state_path = run_dir / "training-state.pt"
    if not state_path.exists():
        return 0
    state = load_training_state(state_path)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    artifacts = [run_dir / "artifact"] if (run_dir / "artifact").exists() else \
        sorted(run_dir.glob(".artifact.old-*"))
    if artifacts:
        _, meta = load_artifact(artifacts[0])
        assert meta["train_step"] <= state["step"]
    return int(state["step"])


def _last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "stats.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except ValueError:
            continue
    return 0


def _wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120.0) -> None:
    """Until stats.jsonl has a row for ``step`` (the loop writes it just before that step's checkpoint)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and _last_logged_step(run_dir) < step:
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.002)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Two runs race for one directory (the loser refuses); the winner and then two more runs are
    SIGKILLed at random moments (checkpoints every step, so most kills land inside a write); after
    every kill the checkpoint loads, the dead run's lock is taken over, and the final weights equal an
    uninterrupted run bit for bit."""
    steps, run_dir = 40, tmp_path / "killed"
    rng = random.Random(7)
    first, second = _launch(_train_args(run_dir, steps)), _launch(_train_args(run_dir, steps))
    deadline = time.monotonic() + 120
    while first.poll() is None and second.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    loser, winner = (first, second) if first.poll() is not None else (second, first)
    _, err = loser.communicate()
    assert loser.returncode == 2 and "Traceback" not in err
    assert err.startswith("distillkac: error: run directory:") and "is in use" in err and err.count("\n") == 1
    assert winner.poll() is None, "the winner must still be running for the race to mean anything"
    steps_seen, inside_a_write, process = [], 0, winner
    for _ in range(3):
        # The stats row of a step is written just before its checkpoint: a kill a few ms later
        # usually lands inside the checkpoint write.
        target = max(_checkpoint_step(run_dir), _last_logged_step(run_dir)) + rng.randint(2, 6)
        _wait_for_step(process, run_dir, target)
        time.sleep(rng.uniform(0.0, 0.03))
        assert process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.communicate()
        inside_a_write += any(p.name.endswith(".tmp") or ".old-" in p.name for p in run_dir.iterdir())
        steps_seen.append(_checkpoint_step(run_dir))
        if steps_seen[-1] < steps:
            assert (run_dir / ".lock").exists()  # left behind by the killed holder: stale from now on
        process = _launch(_train_args(run_dir, steps))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    print(f"checkpoint steps after each kill: {steps_seen}; kills inside a write: {inside_a_write}")
    assert steps_seen == sorted(steps_seen) and steps_seen[0] >= 1
    assert not (run_dir / ".lock").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or ".old-" in p.name]

    config = config_from_args(build_parser().parse_args(_train_args(tmp_path / "straight", steps, 1000)))
    train_teacher(config, tmp_path / "straight", progress=False)
    _assert_same_training(run_dir, tmp_path / "straight")
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    model, meta = load_artifact(run_dir / "artifact")
    assert meta["train_step"] == steps
    _assert_same_tensors(model.state_dict(), load_training_state(run_dir / "training-state.pt")["ema"])
