"""--precision fp32|bf16|auto: resolved per device, honoured by sampling (bf16 autocast works on the CPU),
recorded in sample metadata and eval rows; evaluation defaults to fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config

from distillkac.checkpoint import save_artifact
from distillkac.cli import main
from distillkac.errors import DistillKacError
from distillkac.evaluate import evaluate
from distillkac.nets import build_network
from distillkac.runtime import autocast, resolve_precision
from distillkac.sampling import sample_artifact

KAC = {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    model = build_network(tiny_unet_config(10), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a fresh network predicts exactly 0 (zero output layer): perturb it
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("models") / "teacher"
    save_artifact(directory, model.eval(), {"kind": "teacher", "path": KAC})
    return str(directory)


def test_precision_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(cpu, p) for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert [resolve_precision(cuda, p) for p in ("auto", "fp32", "bf16")] == ["bf16", "fp32", "bf16"]
    with pytest.raises(DistillKacError, match=r"^--precision: must be one of auto, fp32, bf16, got 'fp16'$"):
        resolve_precision(cpu, "fp16")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_sampling_runs_on_the_cpu_close_to_fp32(teacher):
    kwargs = dict(seeds=range(6), labels=torch.arange(6) % 3, steps=3, guidance=1.0)
    fp32 = sample_artifact(teacher, precision="fp32", **kwargs)
    bf16 = sample_artifact(teacher, precision="bf16", **kwargs)
    auto = sample_artifact(teacher, **kwargs)
    assert (fp32.precision, bf16.precision, auto.precision) == ("fp32", "bf16", "fp32")
    assert torch.equal(auto.samples, fp32.samples)
    assert bf16.samples.dtype == torch.float32 and torch.isfinite(bf16.samples).all()
    difference = (bf16.samples - fp32.samples).abs().max().item()
    assert 0 < difference < 0.1  # bf16 keeps 8 mantissa bits: close, but not the fp32 numbers
    with pytest.raises(DistillKacError, match="^--precision: must be one of"):
        sample_artifact(teacher, precision="half", **kwargs)


def test_sample_command_records_its_precision(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--checkpoint", teacher, "--steps", "2", "--num", "4", "--device", "cpu"]
    assert main([*argv, "--precision", "bf16", "--out", str(out)]) == 0
    assert ", bf16 ->" in capsys.readouterr().err
    with np.load(out / "samples.npz") as npz:
        assert json.loads(str(npz["meta"]))["precision"] == "bf16"
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    with np.load(tmp_path / "default" / "samples.npz") as npz:
        assert json.loads(str(npz["meta"]))["precision"] == "fp32"  # auto on the CPU
    capsys.readouterr()
    try:
        code = main([*argv, "--precision", "fp16", "--out", str(tmp_path / "bad")])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "invalid choice: 'fp16'" in err and err.count("\n") == 1


def test_eval_defaults_to_fp32_and_records_bf16(teacher):
    args = ([teacher], [2], ["euler"], [1.0], "digits", 10)
    (default,) = evaluate(*args, device="cpu", progress=False)
    (bf16,) = evaluate(*args, device="cpu", progress=False, precision="bf16")
    assert (default["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert default["value"] != bf16["value"]
    (auto,) = evaluate(*args, device="cpu", progress=False, precision="auto")
    assert auto["precision"] == "fp32" and auto["value"] == default["value"]


def test_the_distillation_teacher_runs_in_its_own_precision(teacher):
    """--teacher-precision: the teacher's network runs in its precision also inside the training step's
    bf16 autocast (fp32 targets for a bf16 student); None follows the enclosing precision."""
    from distillkac.distill import load_teacher

    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    t, y = torch.full((4,), 0.5), torch.arange(4) % 3
    reference = load_teacher(teacher, 4, 1.0).velocity(x, t, y)
    assert reference.dtype == torch.float32
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        inherited = load_teacher(teacher, 4, 1.0).velocity(x, t, y)
        exact = load_teacher(teacher, 4, 1.0, precision="fp32").velocity(x, t, y)
    assert torch.equal(exact, reference)
    assert not torch.equal(inherited.float(), reference)  # the network ran in bf16
    rounded = load_teacher(teacher, 4, 1.0, precision="bf16").velocity(x, t, y)
    assert torch.equal(rounded.float(), inherited.float())


def test_distill_cli_records_the_teacher_precision(tmp_path, capsys):
    from conftest import make_toy_config

    from distillkac.config import DistillConfig
    from distillkac.train import train_teacher

    config = make_toy_config(steps=2, batch=16, micro_batch=16, hidden=8, depth=1, log_every=1, ckpt_every=2,
                             sample_every=2)
    train_teacher(config, tmp_path / "teacher", progress=False)
    argv = ["distill", "--teacher", str(tmp_path / "teacher"), "--outdir", str(tmp_path / "out"), "--plan", "4,2",
            "--dry-run"]
    assert main([*argv, "--teacher-precision", "fp32", "--precision", "bf16"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)
    assert stage["distill"]["teacher_precision"] == "fp32" and stage["train"]["precision"] == "bf16"
    assert main(argv) == 0
    (stage,) = json.loads(capsys.readouterr().out)
    assert "teacher_precision" not in stage["distill"]
    with pytest.raises(DistillKacError, match="^--teacher-precision: must be one of auto, fp32, bf16, got 'fp16'$"):
        DistillConfig(teacher_precision="fp16").validate()
