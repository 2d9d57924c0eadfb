"""Reliability (issue #7): bad input gives ONE line naming the problem, exit code 2, no traceback, and
writes nothing. A handful of cases run as real processes (``python -m distillkac``) to prove that no
traceback reaches stderr; the rest go through ``distillkac.cli.main`` in-process (faster)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_config

from distillkac.checkpoint import save_artifact
from distillkac.cli import main
from distillkac.metrics.fid import GaussianStats, reference_meta, save_reference
from distillkac.nets import MLPConfig, build_network

SRC = str(Path(__file__).resolve().parents[1] / "src")
KAC = {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(outdir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "toy2d", "--outdir", str(outdir), "--steps", "2", "--batch", "16",
            "--micro-batch", "16", "--device", "cpu", "--no-progress", "--sample-every", "1000", *extra]


def _image_train(preset: str, data: Path, outdir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", preset, "--data", str(data), "--outdir", str(outdir), "--steps", "1",
            "--device", "cpu", "--no-progress", *extra]


def _unconditional_teacher(run: Path) -> Path:
    """A teacher run directory (artefact + run config) whose model has no classes."""
    net = build_network(MLPConfig(dim=2, hidden=8, depth=1, num_classes=0),
                        generator=torch.Generator().manual_seed(0))
    save_artifact(run / "artifact", net, {"kind": "teacher", "path": KAC})
    (run / "config.json").write_text(json.dumps(make_toy_config().to_dict()))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory, single_thread) -> Path:
    """Every input the cases need, made once; the tests check that none of it changes."""
    root = tmp_path_factory.mktemp("world")
    assert main(_train(root / "teacher")) == 0
    _unconditional_teacher(root / "uncond")
    (root / "a-file").write_text("not a directory")
    (root / "empty").mkdir()
    (root / "corrupt-images").mkdir()
    for index in range(3):
        (root / "corrupt-images" / f"{index}.png").write_bytes(b"\x89PNG but not really" * 3)
    (root / "corrupt-cifar" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / "corrupt-cifar" / "cifar-10-batches-py" / name).write_bytes(b"garbage")
    shutil.copytree(root / "teacher" / "artifact", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    shutil.copytree(root / "teacher" / "artifact", root / "other-net")
    meta = json.loads((root / "other-net" / "config.json").read_text())
    meta["net"]["hidden"] *= 2
    (root / "other-net" / "config.json").write_text(json.dumps(meta))
    (root / "weights.pth").write_bytes(b"these Inception weights")
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "images.npz", images=images)
    stats = GaussianStats(np.zeros(4), np.eye(4), 10)
    save_reference(root / "ref-other-weights.npz", stats,
                   reference_meta({"name": "folder"}, "train", 10, (3, 8, 8), "sha256-of-other-weights"))
    (root / "garbage-ref.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# (argv from the world directory and the new output path "out", message fragment, run as a process)
CASES = {
    "unknown preset": (lambda w, o: ["train", "--preset", "mnist", "--outdir", str(o)],
                       "argument --preset: invalid choice: 'mnist'", True),
    "unknown solver": (lambda w, o: ["sample", "--checkpoint", str(w / "teacher"), "--out", str(o),
                                     "--solver", "rk4"], "argument --solver: invalid choice: 'rk4'", False),
    "unknown schedule": (lambda w, o: _train(o, "--schedule", "cubic"),
                         "argument --schedule: invalid choice: 'cubic'", False),
    "zero steps": (lambda w, o: _train(o, "--steps", "0"), "--steps: must be an integer > 0, got 0", False),
    "negative steps": (lambda w, o: _train(o, "--steps", "-3"), "--steps: must be an integer > 0", True),
    "zero batch": (lambda w, o: _train(o, "--batch", "0"), "--batch: must be an integer > 0, got 0", False),
    "zero learning rate": (lambda w, o: _train(o, "--lr", "0"), "--lr: must be a finite number > 0", False),
    "negative learning rate": (lambda w, o: _train(o, "--lr=-1e-3"), "--lr: must be a finite number > 0",
                               False),
    "zero Kac a": (lambda w, o: _train(o, "--kac-a", "0"), "--kac-a: must be a finite number > 0", False),
    "negative Kac c": (lambda w, o: _train(o, "--kac-c", "-3"), "--kac-c: must be a finite number > 0",
                       False),
    "negative seed": (lambda w, o: _train(o, "--seed", "-1"), "--seed: must be an integer in [0, 2**63)",
                      False),
    "negative skip-nonfinite": (lambda w, o: _train(o, "--skip-nonfinite", "-1"),
                                "--skip-nonfinite: must be an integer >= 0", False),
    "unknown device": (lambda w, o: _train(o, "--device", "banana"), "--device: unknown device 'banana'",
                       False),
    "sample zero steps": (lambda w, o: ["sample", "--checkpoint", str(w / "teacher"), "--out", str(o),
                                        "--steps", "0"], "--steps: must be a positive integer, got 0", False),
    "sample zero batch": (lambda w, o: ["sample", "--checkpoint", str(w / "teacher"), "--out", str(o),
                                        "--batch", "0"], "--batch: must be a positive integer, got 0", False),
    "plan that does not divide": (lambda w, o: ["distill", "--teacher", str(w / "teacher"), "--outdir", str(o),
                                                "--plan", "20,8"], "--plan: 8 does not divide 20", True),
    "zero steps per stage": (lambda w, o: ["distill", "--teacher", str(w / "teacher"), "--outdir", str(o),
                                           "--plan", "4,2", "--steps-per-stage", "0"],
                             "--steps-per-stage: must be positive integers", False),
    "guidance on an unconditional model (sample)": (
        lambda w, o: ["sample", "--checkpoint", str(w / "uncond"), "--out", str(o), "--guidance", "1"],
        "guidance needs a class-conditional model", True),
    "guidance on an unconditional model (distill)": (
        lambda w, o: ["distill", "--teacher", str(w / "uncond"), "--outdir", str(o), "--plan", "4,2",
                      "--guidance", "1"], "guidance needs a class-conditional model", False),
    "class label out of range": (lambda w, o: ["sample", "--checkpoint", str(w / "teacher"), "--out", str(o),
                                               "--class", "3,99"],
                                 "--class: label 99 is out of range; this model has classes 0..15", False),
    "missing dataset": (lambda w, o: _image_train("celeba64", w / "nowhere", o),
                        "--data: ", False),
    "empty dataset": (lambda w, o: _image_train("celeba64", w / "empty", o), "--data: no images", False),
    "corrupt image dataset": (lambda w, o: _image_train("celeba64", w / "corrupt-images", o),
                              "--data: none of the 3 image files", False),
    "corrupt CIFAR-10 batches": (lambda w, o: _image_train("cifar10", w / "corrupt-cifar", o),
                                 "is not a CIFAR-10 python batch", False),
    "wrong-resolution dataset": (lambda w, o: ["distill", "--teacher", str(w / "teacher"), "--outdir", str(o),
                                               "--plan", "4,2", "--data", "digits", "--steps-per-stage", "6"],
                                 "--data: the dataset's shape [1, 8, 8] differs from the teacher's [2]", False),
    "resume with other Kac constants": (lambda w, o: _train(w / "teacher", "--kac-a", "5"),
                                        "was trained with --kac-a = 9.0, now 5.0", True),
    "checkpoint of a different model": (lambda w, o: ["sample", "--checkpoint", str(w / "other-net"),
                                                      "--out", str(o)],
                                        "does not fit the network: embedding", False),
    "truncated weights": (lambda w, o: ["sample", "--checkpoint", str(w / "truncated"), "--out", str(o)],
                          "model.safetensors does not match the sha256", True),
    "output directory is a file": (lambda w, o: _train(w / "a-file"), "--outdir: ", False),
    "output directory under a file (train)": (lambda w, o: _train(w / "a-file" / "run"),
                                              "is a file, not a directory", False),
    "output directory under a file (sample)": (lambda w, o: ["sample", "--checkpoint", str(w / "teacher"),
                                                             "--out", str(w / "a-file" / "samples")],
                                               "--out: cannot create", False),
    "reference from other Inception weights": (
        lambda w, o: ["fid", "--images", str(w / "images.npz"), "--ref", str(w / "ref-other-weights.npz"),
                      "--inception-weights", str(w / "weights.pth")],
        "was made with Inception weights sha256-of-other-weights", False),
    "corrupt reference file": (lambda w, o: ["fid", "--images", str(w / "images.npz"), "--ref",
                                             str(w / "garbage-ref.npz")],
                               "is not a distillkac reference statistics file", False),
    "ref output is a directory": (lambda w, o: ["ref", "--dataset", "folder", "--data", str(w / "empty"),
                                                "--resolution", "8", "--out", str(w / "empty")],
                                  "--out: ", False),
    "ref subset of one image": (lambda w, o: ["ref", "--dataset", "folder", "--data", str(w / "empty"),
                                              "--resolution", "8", "--out", str(o), "--limit", "1"],
                                "--limit: must be at least 2, got 1", False),
    "unknown metric": (lambda w, o: ["eval", "--checkpoint", str(w / "teacher"), "--metric", "banana",
                                     "--num", "4", "--out", str(o)], "--metric: unknown metric 'banana'", False),
}


def _check_one_line(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("distillkac: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, world, capsys):
    make_argv, message, as_process = CASES[case]
    out = world / "out"
    argv = make_argv(world, out)
    before = _snapshot(world)
    if as_process:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "distillkac", *argv], capture_output=True, text=True,
                                env=env, timeout=120)
        code, err = result.returncode, result.stderr
        assert result.stdout == ""
    else:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
    _check_one_line(code, err, message)
    assert not out.exists()
    assert _snapshot(world) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes through any permission bits; the under-a-file cases cover root")
def test_an_unwritable_output_directory_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(_train(locked / "run"))
        _check_one_line(code, capsys.readouterr().err, "--outdir: cannot write to")
        assert not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_there_are_at_least_25_cases_and_several_run_as_processes():
    assert len(CASES) >= 25 and sum(process for _, _, process in CASES.values()) >= 5
