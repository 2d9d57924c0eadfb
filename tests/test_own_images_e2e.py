"""Acceptance of issue 12: from a folder of your own images to a 1-step student and its FID, as a new user runs
it (the README's "Train on your own images" recipe at a tiny budget): `train` without a preset, `distill`,
`sample`, `ref`, `fid`, each a real `python -m distillkac` process that must exit 0; then a second `ref` to
the same file without --overwrite must exit 2 and leave the first file byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path(os.environ.get("DISTILLKAC_INCEPTION_WEIGHTS")
               or ROOT.parent / "shared/data/inception/pt_inception-2015-12-05-pool3-nanfc.pth")
CLASSES = ("red-squares", "green-discs", "blue-stripes")


def make_shapes(root: Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """One sub-folder per class of ``size``x``size`` PNGs on a dark noisy background: red squares, green
    discs and blue vertical stripes, at random places and sizes."""
    generator = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            image = generator.integers(10, 40, size=(size, size, 3), dtype=np.uint8)
            row, col = generator.integers(4, size - 4, size=2)
            radius = int(generator.integers(2, 5))
            if name == "red-squares":
                image[row - radius:row + radius, col - radius:col + radius] = (230, 30, 30)
            elif name == "green-discs":
                image[(rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2] = (30, 220, 30)
            else:
                image[(cols + int(generator.integers(0, 4))) % 4 < 2] = (30, 30, 230)
            Image.fromarray(image).save(root / name / f"{index:04d}.png")
    return root


def distillkac(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distillkac", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    return result


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"offline Inception weights not found at {WEIGHTS}")
def test_from_a_folder_of_images_to_a_one_step_student_and_its_fid(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=70)
    run, students, samples, ref = tmp_path / "run", tmp_path / "students", tmp_path / "samples", tmp_path / "ref.npz"
    weights = ("--inception-weights", str(WEIGHTS))

    ok(distillkac("train", "--data", str(data), "--outdir", str(run), "--steps", "8", "--batch", "16",
                  "--device", "cpu", "--no-progress"))
    teacher = json.loads((run / "artifact" / "config.json").read_text())
    assert teacher["num_classes"] == 3 and teacher["data_shape"] == [3, 16, 16]

    ok(distillkac("distill", "--teacher", str(run), "--outdir", str(students), "--plan", "2,1",
                  "--steps-per-stage", "2", "--batch", "8", "--device", "cpu", "--no-progress"))
    student = json.loads((students / "stage-1step" / "artifact" / "config.json").read_text())
    assert student["kind"] == "student" and student["steps"] == 1 and student["num_classes"] == 3

    ok(distillkac("sample", "--checkpoint", str(students / "stage-1step"), "--num", "12", "--out", str(samples),
                  "--device", "cpu", "--no-progress"))
    assert sorted(p.name for p in (samples / "images").iterdir()) == [f"{i:06d}.png" for i in range(12)]

    made = json.loads(ok(distillkac("ref", "--data", str(data), "--out", str(ref), "--limit", "24", *weights,
                                    "--device", "cpu", "--no-progress")).stdout)
    assert (made["count"], made["resolution"], made["channels"]) == (24, [16, 16], 3)

    result = json.loads(ok(distillkac("fid", "--images", str(samples / "images"), "--ref", str(ref), *weights,
                                      "--device", "cpu", "--no-progress")).stdout)
    assert result["num_images"] == 12 and result["fid"] > 0 and result["resolution"] == [16, 16]

    first = ref.read_bytes()
    again = distillkac("ref", "--data", str(data), "--out", str(ref), "--limit", "30", *weights, "--no-progress")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert ref.read_bytes() == first
