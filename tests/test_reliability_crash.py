"""Reliability (issue #7): crash safety under SIGKILL, exact resume of train / distill / eval / ref,
the run lock with real processes, non-finite guards, a full disk and malicious resume state."""

from __future__ import annotations

import dataclasses
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
from conftest import make_toy_config, run_cli

from distillkac import checkpoint
from distillkac.checkpoint import load_artifact, load_training_state
from distillkac.cli import build_parser, main
from distillkac.cli.train import config_from_args
from distillkac.data import load_dataset
from distillkac.errors import DistillKacError
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
    """A second run on the directory of a live one refuses; the first run and then two more are
    SIGKILLed at random moments (checkpoints every step, so most kills land inside a write); after
    every kill the checkpoint loads, the dead run's lock is taken over, and the final weights equal an
    uninterrupted run bit for bit."""
    steps, run_dir = 40, tmp_path / "killed"
    rng = random.Random(7)
    winner = _launch(_train_args(run_dir, steps))
    _wait_for_step(winner, run_dir, 1)
    winner.send_signal(signal.SIGSTOP)  # holds the lock, frozen, while a second run tries the directory
    try:
        loser = subprocess.run([sys.executable, "-m", "distillkac", *_train_args(run_dir, steps)], env=ENV,
                               capture_output=True, text=True, timeout=120)
    finally:
        winner.send_signal(signal.SIGCONT)
    err = loser.stderr
    assert loser.returncode == 2 and "Traceback" not in err
    assert err.startswith("distillkac: error: run directory:") and "is in use" in err and err.count("\n") == 1
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


def _toy_args(outdir: Path, steps: int) -> list[str]:
    return _train_args(outdir, steps, ckpt_every=2)


# -------------------------------------------------------------------------- recovery after a kill

def test_resume_repairs_what_a_kill_leaves_behind(tmp_path, capsys):
    """A torn stats row, temporaries of killed writers, an artefact moved aside mid-swap (missing) or
    older than the training state: resume cleans up and ends exactly like an uninterrupted run."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert run_cli(_toy_args(straight, 6), capsys)[0] == 0
    assert run_cli(_toy_args(run, 2), capsys)[0] == 0
    old_artifact = run / ".artifact.old-99999"
    os.replace(run / "artifact", old_artifact)  # killed between the two renames of save_artifact
    (run / ".training-state.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    with open(run / "stats.jsonl", "a") as file:
        file.write('{"step": 3, "images": 48, "lo')  # killed inside an append
    assert run_cli(_toy_args(run, 4), capsys)[0] == 0
    assert not old_artifact.exists() and not (run / ".training-state.pt.x1y2.tmp").exists()
    # A kill between the training state and the artefact of checkpoint 4: the artefact says step 2.
    stale = tmp_path / "stale-artifact"
    checkpoint.save_artifact(stale, load_artifact(run / "artifact")[0], {"kind": "teacher", "train_step": 2})
    os.replace(run / "artifact", tmp_path / "discarded")
    os.replace(stale, run / "artifact")
    assert run_cli(_toy_args(run, 4), capsys)[0] == 0  # nothing to train, the artefact is rebuilt
    model, meta = load_artifact(run / "artifact")
    assert meta["train_step"] == 4 and meta["path"]["kind"] == "kac"
    _assert_same_tensors(model.state_dict(), load_training_state(run / "training-state.pt")["ema"])
    assert run_cli(_toy_args(run, 6), capsys)[0] == 0
    _assert_same_training(run, straight)
    assert _losses(run) == _losses(straight)


def test_two_fresh_runs_give_identical_weights(tmp_path):
    for name in ("a", "b"):
        train_teacher(make_toy_config(steps=4, dropout=0.2), tmp_path / name, progress=False)
    _assert_same_training(tmp_path / "a", tmp_path / "b")
    first, second = (load_artifact(tmp_path / name / "artifact")[1] for name in ("a", "b"))
    assert first["weights_sha256"] == second["weights_sha256"]


# ---------------------------------------------------------------------------------- a full disk

class _DiskFillsUp:
    """A file whose write stores half the data, then fails like a full disk."""

    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.file, name)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(_toy_args(run, 2), capsys)[0] == 0
    before = (run / "training-state.pt").read_bytes()
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        return _DiskFillsUp(file) if "training-state.pt" in os.readlink(f"/proc/self/fd/{fd}") else file

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    code, _, err = run_cli(_toy_args(run, 4), capsys)
    monkeypatch.undo()
    assert code == 1
    assert err.startswith(f"distillkac: error: No space left on device: {run / 'training-state.pt'};")
    assert err.count("\n") == 1
    assert "rerun the same command to resume" in err
    assert (run / "training-state.pt").read_bytes() == before
    assert load_artifact(run / "artifact")[1]["train_step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["artifact", "config.json", "log.txt", "samples",
                                                     "stats.jsonl", "training-state.pt"]
    assert run_cli(_toy_args(run, 4), capsys)[0] == 0
    assert load_training_state(run / "training-state.pt")["step"] == 4


def test_oserrors_without_an_errno_keep_their_traceback(monkeypatch):
    """Only real operating-system failures are shortened to one line; anything else is a bug."""
    import distillkac.train

    def broken(*args, **kwargs):
        raise OSError("a library bug dressed as an OSError")

    monkeypatch.setattr(distillkac.train, "train_teacher", broken)
    with pytest.raises(OSError, match="library bug"):
        main(_toy_args(Path("/nonexistent-never-created"), 2))
    monkeypatch.setattr(distillkac.train, "train_teacher", lambda *a, **k: [][1])
    with pytest.raises(IndexError):
        main(_toy_args(Path("/nonexistent-never-created"), 2))


# ------------------------------------------------------------------ a malicious training state

class _Exploit:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_training_state_is_not_executed_by_train_resume(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert run_cli(_toy_args(run, 2), capsys)[0] == 0
    state = load_training_state(run / "training-state.pt")
    torch.save({**state, "payload": _Exploit(marker)}, run / "training-state.pt")
    crafted = (run / "training-state.pt").read_bytes()
    result = subprocess.run([sys.executable, "-m", "distillkac", *_toy_args(run, 4)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("distillkac: error: training state:")
    assert "cannot be loaded safely" in result.stderr and result.stderr.count("\n") == 1
    assert not marker.exists()
    assert (run / "training-state.pt").read_bytes() == crafted and not (run / ".lock").exists()


# ----------------------------------------------------------------------------- non-finite values

class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by +inf (finite loss, Inf gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _Sabotaged:
    """The teacher's loss with an infinite loss or gradient on chosen calls (one call per step)."""

    def __init__(self, inner: TeacherObjective, bad_calls: set[int], kind: str) -> None:
        self.inner, self.bad_calls, self.kind, self.calls = inner, bad_calls, kind, 0

    def per_sample_loss(self, model, x0, y, generator):
        self.calls += 1
        loss = self.inner.per_sample_loss(model, x0, y, generator)
        if self.calls not in self.bad_calls:
            return loss
        return _InfiniteGradient.apply(loss) if self.kind == "inf-gradient" else loss * float("inf")

    def artifact_meta(self):
        return self.inner.artifact_meta()


def _sabotaged_run(run_dir: Path, bad_calls: set[int], kind: str, skip: int):
    config = make_toy_config(steps=6, batch=32, micro_batch=32, ckpt_every=2, skip_nonfinite=skip)
    dataset = load_dataset(config.data, "train")
    config = resolve_config(config, dataset.data_shape, dataset.num_classes)
    model = build_network(config.net, generator=torch.Generator().manual_seed(0))
    objective = _Sabotaged(TeacherObjective(build_path(dataclasses.asdict(config.path)), 16), bad_calls, kind)
    return train(config, run_dir, model, objective, dataset, progress=False)


@pytest.mark.parametrize("kind", ["inf-gradient", "inf-loss"])
def test_a_bad_step_on_a_checkpoint_step_is_never_saved(tmp_path, kind):
    with pytest.raises(DistillKacError, match="non-finite loss or gradient at step 4 .*step 2") as info:
        _sabotaged_run(tmp_path / "stop", {4}, kind, skip=0)
    assert "\n" not in str(info.value)
    state = load_training_state(tmp_path / "stop" / "training-state.pt")
    assert state["step"] == 2 and load_artifact(tmp_path / "stop" / "artifact")[1]["train_step"] == 2
    result = _sabotaged_run(tmp_path / "skip", {4}, kind, skip=1)
    assert (result.step, result.nonfinite_skipped) == (6, 1)
    rows = [json.loads(line) for line in (tmp_path / "skip" / "stats.jsonl").read_text().splitlines()]
    assert [row["nonfinite_skipped"] for row in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["loss"] is None and not np.isfinite(rows[3]["grad_norm"])
    state = load_training_state(tmp_path / "skip" / "training-state.pt")
    assert all(torch.isfinite(t).all() for part in ("model", "ema") for t in state[part].values())
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {5}  # six steps, one of them skipped: the optimiser moved five times
