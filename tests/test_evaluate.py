"""The NFE table (eval): NFE, students, resume, sharding, FID rows, errors; velocity diagnostics."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config

import distillkac.evaluate as evaluate_module
from distillkac.checkpoint import save_artifact
from distillkac.cli import main
from distillkac.data import DataConfig, toy_mixture
from distillkac.diagnostics import analytic_velocity_profile, plot_velocity_profiles, velocity_profile
from distillkac.errors import DistillKacError
from distillkac.evaluate import Setting, evaluate, evaluate_shard, nfe_per_sample, plan_settings, shard_indices
from distillkac.kac import KacProcess
from distillkac.metrics.context import MetricContext
from distillkac.metrics.stats import Moments
from distillkac.metrics.toy2d import toy2d_metrics
from distillkac.nets import MLPConfig, build_network
from distillkac.nfe_table import append_result, paired_rows, read_results, render_table
from distillkac.npz import SideFile
from distillkac.paths import FlowPath, KacPath, VPPath, build_path
from distillkac.rng import seeded_generators
from distillkac.sampling import sample_artifact
from distillkac.solvers import time_grid
from distillkac.stats import mean_interval

KAC = {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}
INCEPTION = Path(os.environ.get("DISTILLKAC_INCEPTION_WEIGHTS") or Path(__file__).resolve().parents[2]
                 / "shared/data/inception/pt_inception-2015-12-05-pool3-nanfc.pth")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _perturbed(model: torch.nn.Module, seed: int = 11, scale: float = 0.1) -> torch.nn.Module:
    """A fresh network predicts exactly 0 (zero output layer); perturb it so that steps matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _tiny_unet() -> torch.nn.Module:
    return build_network(tiny_unet_config(3), generator=torch.Generator().manual_seed(0))


def _toy_net() -> torch.nn.Module:
    config = MLPConfig(dim=2, hidden=16, depth=1, num_classes=16)
    return _perturbed(build_network(config, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    net = _toy_net()
    save_artifact(root / "teacher", net, {"kind": "teacher", "path": KAC})
    save_artifact(root / "student", _perturbed(_toy_net(), seed=12),
                  {"kind": "student", "path": KAC, "steps": 2, "grid": "uniform", "solver": "euler",
                   "guidance": 1.5, "teacher_sha256": "ab" * 32})
    return {"teacher": root / "teacher", "student": root / "student"}


# ---------------------------------------------------------------------------------------- NFE table

def test_nfe_accounting():
    assert nfe_per_sample(4, "ab2", 1.0) == 8
    assert nfe_per_sample(4, "euler", 0.0) == 4
    assert nfe_per_sample(4, "heun", 0.0) == 8
    assert nfe_per_sample(4, "midpoint", 2.0) == 16
    assert nfe_per_sample(100, "ab2", 1.0) == 200
    assert Setting(4, "euler", 1.5, baked=True).nfe == 4


def test_eval_cli_rows_table_plot_and_resume(toy_models, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(toy_models["teacher"]), "--checkpoint", str(toy_models["student"]),
            "--steps", "4,2", "--solver", "ab2,euler,heun", "--guidance", "0,1", "--metric", "toy2d",
            "--num", "16", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    rows = read_results(out)
    teacher = [r for r in rows if r["kind"] == "teacher"]
    assert len(teacher) == 2 * 3 * 2
    nfe = {(r["steps"], r["solver"], r["guidance"]): r["nfe"] for r in teacher}
    assert nfe[(4, "ab2", 1.0)] == 8
    assert nfe[(4, "euler", 0.0)] == 4
    assert nfe[(4, "heun", 0.0)] == 8
    assert nfe[(4, "heun", 1.0)] == 16
    assert nfe[(2, "euler", 1.0)] == 4
    assert all(r["num"] == 16 and r["seed"] == 0 and r["label"] == "sliced_wasserstein" for r in rows)
    # The student: one row, at its own 2 Euler steps with its baked-in guidance, 1 NFE per step.
    (student,) = [r for r in rows if r["kind"] == "student"]
    assert (student["steps"], student["solver"], student["guidance"], student["nfe"]) == (2, "euler", 1.5, 2)
    table = (out / "table.md").read_text()
    assert table.startswith("| model | kind | steps | NFE | solver | guidance | metric |")
    assert table.count("\n| teacher |") == 12 and "| student † |" in table
    assert "Skipped for student (distilled student: evaluated only at its own 2 steps" in table
    assert (out / "metric_vs_nfe.png").read_bytes()[:8] == PNG_MAGIC
    # Rerun with one more guidance weight: only the 6 new teacher rows are computed and appended.
    lines_before = (out / "results.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main([*argv[:10], "0,1,2", *argv[11:]]) == 0
    lines_after = (out / "results.jsonl").read_text().splitlines()
    assert lines_after[:len(lines_before)] == lines_before
    added = [json.loads(line) for line in lines_after[len(lines_before):]]
    assert len(added) == 6 and {r["guidance"] for r in added} == {2.0}
    assert "6 new row(s), 13 already in results.jsonl; 19 row(s) in" in capsys.readouterr().err
    assert main(argv) == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines_after
    assert "0 new row(s), 13 already in results.jsonl; 19 row(s) in" in capsys.readouterr().err


def test_rows_are_the_seeded_samples_metric(toy_models):
    """A row's value is the metric of images 0..num-1 drawn with seeds S+i and labels i mod 16."""
    (row,) = evaluate([toy_models["teacher"]], [3], ["ab2"], [1.0], "toy2d", 24, seed=5, batch_size=7,
                      device="cpu", progress=False)
    labels = torch.arange(24) % 16
    samples = sample_artifact(toy_models["teacher"], seeds=range(5, 29), labels=labels, steps=3, solver="ab2",
                              guidance=1.0).samples
    expected = toy2d_metrics(samples, labels, toy_mixture(DataConfig(name="toy2d", toy="grid")))
    assert row["nfe"] == 6 and row["evaluations"] == 3
    for key in ("sliced_wasserstein", "log_likelihood", "mode_coverage", "class_accuracy"):
        assert row["values"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9)


def test_results_file_survives_a_torn_last_line(tmp_path):
    append_result(tmp_path, {"a": 1})
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"a": 2, "b"')  # an append cut short
    assert read_results(tmp_path) == [{"a": 1}]
    append_result(tmp_path, {"a": 3})
    assert read_results(tmp_path) == [{"a": 1}, {"a": 3}]
    (tmp_path / "results.jsonl").write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(DistillKacError, match="line 2 is not JSON"):
        read_results(tmp_path)


def test_plan_settings_skips_what_a_model_cannot_do():
    meta = {"kind": "baseline", "path": {"kind": "flow"}, "num_classes": 0}
    keep, skipped = plan_settings(meta, [4], ["euler", "ddim"], [0.0, 1.0])
    assert keep == [Setting(4, "euler", 0.0)]
    assert [(s.solver, s.guidance) for s, _ in skipped] == [("euler", 1.0), ("ddim", 0.0), ("ddim", 1.0)]
    vp = {"kind": "baseline", "path": {"kind": "vp"}, "num_classes": 10}
    assert len(plan_settings(vp, [4, 2], ["ddim"], [0.0, 1.0])[0]) == 4
    student = {"kind": "student", "path": KAC, "num_classes": 10, "steps": 4, "guidance": 2.0}
    keep, skipped = plan_settings(student, [4, 20], ["euler", "ab2"], [2.0])
    assert keep == [Setting(4, "euler", 2.0, baked=True)] and len(skipped) == 3
    table = render_table([{"model": "s", "kind": "student", "steps": 20, "solver": "ab2", "guidance": 2.0,
                           "metric": "fid", "skipped": "why"}])
    assert "Skipped for s (why): 20/ab2/w=2." in table


# ------------------------------------------------------------------------------------------ shards

@pytest.mark.parametrize("num, world_size", [(0, 1), (1, 3), (10, 1), (10, 3), (17, 4), (5, 8)])
def test_shards_cover_every_image_once(num, world_size):
    shards = [list(shard_indices(num, rank, world_size)) for rank in range(world_size)]
    flat = sorted(itertools.chain.from_iterable(shards))
    assert flat == list(range(num))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_shard_arguments_are_checked():
    for rank, world_size in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(DistillKacError, match="rank"):
            shard_indices(4, rank, world_size)


def test_moments_merge_in_any_order_equals_one_pass():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn((23, 5), generator=generator, dtype=torch.float64) * 3 + 7
    reference = np.cov(features.numpy(), rowvar=False)
    for world_size in (1, 2, 3, 5, 30):
        parts = [Moments.from_features(features[list(shard_indices(23, r, world_size))])
                 for r in range(world_size)]
        for order in (parts, parts[::-1]):
            stats = Moments.merge(order).stats()
            assert stats.count == 23
            np.testing.assert_allclose(stats.mu, features.mean(0).numpy(), rtol=0, atol=1e-12)
            np.testing.assert_allclose(stats.sigma, reference, rtol=1e-12, atol=1e-12)


def test_simulated_ranks_give_the_single_process_result(toy_models):
    """Shards made by ranks 0..W-1 (in any order) merge into the one-process samples and metric."""
    from distillkac.checkpoint import load_artifact

    model, meta = load_artifact(toy_models["teacher"])
    setting = Setting(3, "euler", 1.0)
    context = MetricContext("toy2d", ref=None, inception_weights=None, batch_size=4,
                            device=torch.device("cpu"), progress=False)
    kwargs = dict(num=11, seed=3, batch_size=4, device=torch.device("cpu"))
    single = evaluate_shard(model, meta, setting, context, rank=0, world_size=1, **kwargs)
    world_size = 3
    parts = {rank: evaluate_shard(model, meta, setting, context, rank=rank, world_size=world_size, **kwargs)
             for rank in (2, 0, 1)}
    shards = [shard_indices(11, r, world_size) for r in range(world_size)]
    merged = context.finish([parts[r] for r in range(world_size)], shards, 16)
    alone = context.finish([single], [shard_indices(11, 0, 1)], 16)
    for rank in range(world_size):  # each shard holds exactly the one-process images of its seeds
        torch.testing.assert_close(parts[rank]["samples"], single["samples"][list(shards[rank])],
                                   atol=1e-6, rtol=0)
        assert torch.equal(parts[rank]["labels"], single["labels"][list(shards[rank])])
    assert merged["sliced_wasserstein"] == pytest.approx(alone["sliced_wasserstein"], rel=1e-5)
    assert merged["log_likelihood"] == pytest.approx(alone["log_likelihood"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- FID

def _fake_reference(path: Path, resolution: list[int], weights_id: str = "torch-fidelity-default") -> None:
    from distillkac.metrics.fid import GaussianStats, save_reference

    stats = GaussianStats(np.zeros(4), np.eye(4), 10)
    meta = {"dataset": {"name": "fake"}, "split": "train", "resolution": resolution, "channels": 1,
            "weights_sha256": weights_id}
    save_reference(path, stats, meta)


class PixelFeatures:
    """Stands in for the Inception network: the pixels as 64 float64 features (8x8 gray images)."""

    batch_sizes: list[int] = []

    def __init__(self, weights_path, device, batch_size) -> None:
        self.weights_id, self.batch_size = "torch-fidelity-default", batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        PixelFeatures.batch_sizes.append(images.shape[0])
        return images.flatten(1).to(torch.float64)


def test_fid_rows_stream_batches_into_the_statistics(tmp_path, monkeypatch):
    """FID rows with the pixel stand-in for Inception: the value is the Fréchet distance of the
    statistics of the seeded images (seed i, label i mod 3), fed batch by batch."""
    import distillkac.metrics.fid as metrics

    monkeypatch.delenv("DISTILLKAC_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(metrics, "InceptionFeatures", PixelFeatures)
    save_artifact(tmp_path / "unet", _perturbed(_tiny_unet(), scale=0.05), {"kind": "teacher", "path": KAC})
    real = torch.rand((40, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference_stats = metrics.GaussianStats.from_features(metrics.to_uint8(real).flatten(1).double())
    meta = {"dataset": {"name": "noise"}, "split": "train", "resolution": [8, 8], "channels": 1,
            "weights_sha256": "torch-fidelity-default"}
    metrics.save_reference(tmp_path / "ref.npz", reference_stats, meta)
    monkeypatch.setattr(PixelFeatures, "batch_sizes", [])
    rows = evaluate([tmp_path / "unet"], [2, 1], ["euler", "heun"], [0.0, 1.5], "fid", 10,
                    ref=tmp_path / "ref.npz", batch_size=4, device="cpu", progress=False)
    assert len(rows) == 8 and {r["label"] for r in rows} == {"FID-10"}
    assert PixelFeatures.batch_sizes == [4, 4, 2] * 8  # generated batches go straight to the features
    assert {(r["steps"], r["solver"], r["guidance"]): r["nfe"] for r in rows}[(2, "heun", 1.5)] == 8
    for row in rows:
        samples = sample_artifact(tmp_path / "unet", seeds=range(10), labels=torch.arange(10) % 3, batch_size=4,
                                  steps=row["steps"], solver=row["solver"], guidance=row["guidance"]).samples
        images = metrics.to_uint8(samples)
        stats = metrics.GaussianStats.from_features(images.flatten(1).double())
        expected = metrics.frechet_distance(stats.mu, stats.sigma, reference_stats.mu, reference_stats.sigma)
        assert row["value"] == pytest.approx(expected, rel=1e-9)
    assert len({round(r["value"], 6) for r in rows}) == 8


@pytest.mark.slow
@pytest.mark.skipif(not INCEPTION.is_file(), reason=f"offline Inception weights not found at {INCEPTION}")
def test_fid_row_against_a_small_reference(tmp_path, monkeypatch):
    """One real FID row: 10 images through Inception on the CPU and one 2048-d Fréchet distance (slow:
    ~20 s for the distance alone on 2 loaded cores)."""
    import distillkac.metrics.fid as metrics
    from distillkac.data import load_dataset

    save_artifact(tmp_path / "unet", _perturbed(_tiny_unet(), scale=0.05), {"kind": "teacher", "path": KAC})
    extractor = metrics.InceptionFeatures(INCEPTION, "cpu", batch_size=8)
    digits = load_dataset(DataConfig(name="digits"), "test")
    reference = metrics.compute_reference(digits, "test", extractor, limit=6, progress=False)
    metrics.save_reference(tmp_path / "ref.npz", reference.stats, reference.meta)
    distances, frechet_distance = [], metrics.frechet_distance

    def recording_distance(mu1, sigma1, mu2, sigma2):
        distances.append((mu1, sigma1, mu2, sigma2, frechet_distance(mu1, sigma1, mu2, sigma2)))
        return distances[-1][-1]

    monkeypatch.setattr(metrics, "frechet_distance", recording_distance)
    args = ([tmp_path / "unet"], [2], ["euler"], [1.0], "fid", 4)
    kwargs = dict(ref=tmp_path / "ref.npz", inception_weights=str(INCEPTION), batch_size=3, device="cpu",
                  out=tmp_path / "eval", progress=False)
    (row,) = evaluate(*args, **kwargs)
    assert (row["steps"], row["nfe"], row["label"], row["num"], row["guidance"]) == (2, 4, "FID-4", 4, 1.0)
    assert row["reference"]["stats_sha256"] == reference.stats.sha256()
    assert row["values"]["weights_sha256"] == extractor.weights_id
    (mu1, sigma1, mu2, sigma2, value) = distances[0]
    assert row["value"] == value and math.isfinite(value) and value > 0
    # The streamed moments equal metrics' own statistics of the same seeded images (seed i, label i mod 3).
    images = metrics.to_uint8(sample_artifact(tmp_path / "unet", seeds=range(4), labels=torch.arange(4) % 3,
                                              steps=2, solver="euler", guidance=1.0).samples)
    direct = metrics.feature_stats([images], extractor, progress=False)
    np.testing.assert_allclose(mu1, direct.mu, rtol=0, atol=1e-6 * np.abs(direct.mu).max())
    np.testing.assert_allclose(sigma1, direct.sigma, rtol=0, atol=1e-6 * np.abs(direct.sigma).max())
    assert np.array_equal(mu2, reference.stats.mu) and np.array_equal(sigma2, reference.stats.sigma)
    # Rerun: the row is found in results.jsonl, nothing is recomputed.
    (again,) = evaluate(*args, **kwargs)
    assert again["resumed"] and again["value"] == row["value"] and len(distances) == 1
    assert len(read_results(tmp_path / "eval")) == 1


def test_fid_needs_a_reference_of_the_same_resolution(toy_models, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILLKAC_INCEPTION_WEIGHTS", raising=False)
    save_artifact(tmp_path / "unet", _tiny_unet(), {"kind": "teacher", "path": KAC})
    with pytest.raises(DistillKacError, match="--ref: the fid metric needs reference statistics"):
        evaluate([tmp_path / "unet"], [1], ["euler"], [0.0], "fid", 4, device="cpu")
    _fake_reference(tmp_path / "ref16.npz", [16, 16])
    with pytest.raises(DistillKacError, match=r"is for \[16, 16\] images, but the images are \[8, 8\]"):
        evaluate([tmp_path / "unet"], [1], ["euler"], [0.0], "fid", 4, ref=tmp_path / "ref16.npz",
                 device="cpu")
    _fake_reference(tmp_path / "ref8.npz", [8, 8])
    with pytest.raises(DistillKacError, match="not images"):
        evaluate([toy_models["teacher"]], [1], ["euler"], [0.0], "fid", 4, ref=tmp_path / "ref8.npz",
                 device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"--metric": "inception"}, "--metric: unknown metric 'inception'"),
    ({"--solver": "euler,rk4"}, "--solver: unknown solver 'rk4'"),
    ({"--steps": "4,0"}, "--steps: need positive integers"),
    ({"--steps": "4,x"}, "argument --steps: expected comma-separated integers"),
    ({"--metric": "fid"}, "--ref: the fid metric needs reference statistics"),
    ({"--metric": "digits"}, "--metric digits:"),
    ({"--num": "0"}, "--num: the toy2d metric needs at least 1 samples"),
    ({"--save-every": "0"}, "--save-every: must be a positive number of batches, got 0"),
    ({"--checkpoint": "/nonexistent/model"}, "checkpoint: /nonexistent/model is not a directory"),
])
def test_cli_errors_are_one_line_with_exit_2(toy_models, tmp_path, capsys, change, message):
    options = {"--checkpoint": str(toy_models["teacher"]), "--steps": "2", "--solver": "euler",
               "--metric": "toy2d", "--num": "4", "--out": str(tmp_path / "eval"), "--device": "cpu"}
    options.update(change)
    argv = ["eval", *itertools.chain.from_iterable(options.items())]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("distillkac: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "eval" / "results.jsonl").exists()


# ------------------------------------------------------------------------------ resume inside a row

class CountingSampler:
    """``evaluate.sample_artifact`` recording the seeds of every batch it generates; with ``stop_at``,
    batch number ``stop_at`` raises KeyboardInterrupt instead (a run killed partway through a row)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.seeds: list[list[int]] = []

    def __call__(self, *args, **kwargs):
        if self.stop_at is not None and len(self.seeds) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.seeds.append(list(kwargs["seeds"]))
        return sample_artifact(*args, **kwargs)


def _run(monkeypatch, sampler: CountingSampler, *args, **kwargs) -> list[dict]:
    monkeypatch.setattr(evaluate_module, "sample_artifact", sampler)
    return evaluate(*args, **kwargs)


def _side_files(out: Path) -> list[Path]:
    return sorted(out.glob(".partial-*"))


def _chunks(values: range, size: int) -> list[list[int]]:
    values = list(values)
    return [values[i:i + size] for i in range(0, len(values), size)]


TOY_ROW = dict(num=24, seed=3, batch_size=4, device="cpu", progress=False, save_every=2)


def _toy_row(toy_models, monkeypatch, out: Path, sampler: CountingSampler) -> list[dict]:
    args = ([toy_models["teacher"]], [3], ["euler"], [1.0], "toy2d")
    return _run(monkeypatch, sampler, *args, out=out, **TOY_ROW)


@pytest.mark.parametrize("stop_at, saved", [(5, 4), (4, 2)])
def test_toy2d_row_continues_from_its_side_file(toy_models, tmp_path, monkeypatch, capsys, stop_at, saved):
    """24 images in 6 batches of 4, saved every 2 batches; killed at batch ``stop_at``: the rerun makes
    only the batches after the last save and gives the uninterrupted row's values exactly."""
    (reference,) = _toy_row(toy_models, monkeypatch, tmp_path / "whole", whole := CountingSampler())
    assert whole.seeds == _chunks(range(3, 27), 4)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        _toy_row(toy_models, monkeypatch, out, CountingSampler(stop_at=stop_at))
    assert not (out / "results.jsonl").exists() and not (out / ".lock").exists()
    (side,) = _side_files(out)
    assert re.fullmatch(r"\.partial-[0-9a-f]{64}-rank0of1\.npz", side.name)
    side_bytes = side.read_bytes()
    with np.load(side, allow_pickle=False) as arrays:
        assert int(arrays["done"]) == 4 * saved and arrays["samples"].shape == (4 * saved, 2)
        assert arrays["labels"].tolist() == [i % 16 for i in range(4 * saved)]
    capsys.readouterr()
    (row,) = _toy_row(toy_models, monkeypatch, out, rest := CountingSampler())
    assert rest.seeds == _chunks(range(3 + 4 * saved, 27), 4)  # only the missing batches
    assert f"{4 * saved} of this process's 24 images are done" in capsys.readouterr().err
    assert row["value"] == reference["value"] and row["values"] == reference["values"]
    assert _side_files(out) == [] and read_results(out) == [row]
    # A side file left behind (stopped between the append and the clean-up) goes when the row is found.
    side.write_bytes(side_bytes)
    (again,) = _toy_row(toy_models, monkeypatch, out, none := CountingSampler())
    assert again["resumed"] and none.seeds == [] and _side_files(out) == []


def test_fid_row_continues_from_its_side_file(tmp_path, monkeypatch):
    """FID with the pixel stand-in: 10 images in batches [4, 4, 2], saved after every batch, killed at
    the third: the rerun streams only images 8 and 9 and gives the uninterrupted FID exactly."""
    import distillkac.metrics.fid as metrics

    monkeypatch.delenv("DISTILLKAC_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(metrics, "InceptionFeatures", PixelFeatures)
    save_artifact(tmp_path / "unet", _perturbed(_tiny_unet(), scale=0.05), {"kind": "teacher", "path": KAC})
    real = torch.rand((40, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference_stats = metrics.GaussianStats.from_features(metrics.to_uint8(real).flatten(1).double())
    meta = {"dataset": {"name": "noise"}, "split": "train", "resolution": [8, 8], "channels": 1,
            "weights_sha256": "torch-fidelity-default"}
    metrics.save_reference(tmp_path / "ref.npz", reference_stats, meta)
    args = ([tmp_path / "unet"], [2], ["heun"], [1.5], "fid", 10)
    kwargs = dict(ref=tmp_path / "ref.npz", batch_size=4, device="cpu", progress=False, save_every=1)
    (whole,) = _run(monkeypatch, CountingSampler(), *args, out=tmp_path / "whole", **kwargs)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, CountingSampler(stop_at=3), *args, out=out, **kwargs)
    (side,) = _side_files(out)
    with np.load(side, allow_pickle=False) as arrays:
        assert int(arrays["done"]) == 8 and int(arrays["count"]) == 8 and arrays["scatter"].shape == (64, 64)
    monkeypatch.setattr(PixelFeatures, "batch_sizes", [])
    (row,) = _run(monkeypatch, rest := CountingSampler(), *args, out=out, **kwargs)
    assert rest.seeds == [[8, 9]] and PixelFeatures.batch_sizes == [2]
    assert row["label"] == "FID-10" and row["values"]["num_images"] == 10
    assert row["value"] == whole["value"]
    assert _side_files(out) == [] and read_results(out) == [row]


@pytest.mark.parametrize("change", [{"seed": 4}, {"num": 25}, {"key": "another row"}, {"world_size": 2},
                                    {"done": 28}, {"labels": np.zeros(3, dtype=np.int64)}, "not an npz"])
def test_a_side_file_of_other_settings_is_ignored(toy_models, tmp_path, monkeypatch, capsys, change):
    out = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt):
        _toy_row(toy_models, monkeypatch, out, CountingSampler(stop_at=5))
    (side,) = _side_files(out)
    with np.load(side, allow_pickle=False) as loaded:
        arrays = dict(loaded)
    other = tmp_path / "other"
    other.mkdir()
    if isinstance(change, str):
        (other / side.name).write_text(change)
    else:
        np.savez(other / side.name, **{**arrays, **change})
    capsys.readouterr()
    (row,) = _toy_row(toy_models, monkeypatch, other, whole := CountingSampler())
    assert "belongs to other settings or is unreadable; ignoring it" in capsys.readouterr().err
    assert whole.seeds == _chunks(range(3, 27), 4)  # the row starts over
    (reference,) = _toy_row(toy_models, monkeypatch, tmp_path / "whole", CountingSampler())
    assert row["value"] == reference["value"] and _side_files(other) == []


def test_a_rank_continues_its_own_shard(toy_models, tmp_path, monkeypatch):
    """Rank 1 of 3 with 11 images makes images 1, 4, 7, 10; killed after its first batch of 2, it
    continues with images 7 and 10 and returns the uninterrupted shard exactly."""
    from distillkac.checkpoint import load_artifact

    model, meta = load_artifact(toy_models["teacher"])
    context = MetricContext("toy2d", ref=None, inception_weights=None, batch_size=2,
                            device=torch.device("cpu"), progress=False)
    partial = SideFile(tmp_path / "side.npz", {"key": "row", "num": 11, "seed": 3, "rank": 1, "world_size": 3})
    kwargs = dict(num=11, seed=3, rank=1, world_size=3, batch_size=2, device=torch.device("cpu"))
    whole = evaluate_shard(model, meta, Setting(3, "euler", 1.0), context, **kwargs)
    monkeypatch.setattr(evaluate_module, "sample_artifact", CountingSampler(stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        evaluate_shard(model, meta, Setting(3, "euler", 1.0), context, partial=partial, save_every=1, **kwargs)
    monkeypatch.setattr(evaluate_module, "sample_artifact", rest := CountingSampler())
    part = evaluate_shard(model, meta, Setting(3, "euler", 1.0), context, partial=partial, save_every=1,
                          **kwargs)
    assert rest.seeds == [[10, 13]]
    assert torch.equal(part["samples"], whole["samples"]) and torch.equal(part["labels"], whole["labels"])
    assert part["labels"].tolist() == [1, 4, 7, 10]


def test_out_is_checked_before_anything_is_sampled(toy_models, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "file", "exists and is not a directory"),
                         (tmp_path / "file" / "eval", "is a file, not a directory")]:
        with pytest.raises(DistillKacError, match=f"^--out: .*{message}"):
            _toy_row(toy_models, monkeypatch, out, sampler := CountingSampler())
        assert sampler.seeds == []


# ------------------------------------------------------------------------------------- seed blocks

def test_blocks_are_the_rows_of_shifted_seeds_with_their_mean_and_interval(toy_models):
    """Block b of a 3-block row equals a one-block row with seed S + b·num (labels i mod 16 in every block);
    the row's value is the mean and its interval the t-interval of the block values."""
    kwargs = dict(batch_size=5, device="cpu", progress=False)
    (row,) = evaluate([toy_models["teacher"]], [3], ["euler"], [1.0], "toy2d", 12, seed=5, blocks=3, **kwargs)
    assert (row["blocks"], row["num"], row["seed"], row["precision"]) == (3, 12, 5, "fp32")
    assert [block["seed"] for block in row["per_block"]] == [5, 17, 29]
    for block in row["per_block"]:
        (alone,) = evaluate([toy_models["teacher"]], [3], ["euler"], [1.0], "toy2d", 12, seed=block["seed"], **kwargs)
        assert block["value"] == alone["value"] and block["values"] == alone["values"]
    values = [block["value"] for block in row["per_block"]]
    interval = mean_interval(values)
    assert row["value"] == pytest.approx(sum(values) / 3, rel=1e-12)
    assert row["interval"] == {"mean": interval.mean, "low": interval.low, "high": interval.high,
                               "half_width": interval.half_width, "count": 3, "level": 0.95}
    assert row["values"]["sliced_wasserstein"] == pytest.approx(row["value"], rel=1e-12)
    assert len(set(values)) == 3 and interval.half_width > 0


def test_a_row_of_blocks_continues_from_its_finished_blocks(toy_models, tmp_path, monkeypatch, capsys):
    """3 blocks of 8 images in batches of 4, saved after every batch, killed at batch 4 (the second of
    block 1): the rerun keeps block 0, continues block 1 from its side file and gives the same row."""
    args = ([toy_models["teacher"]], [3], ["euler"], [1.0], "toy2d")
    kwargs = dict(num=8, seed=3, batch_size=4, device="cpu", progress=False, save_every=1, blocks=3)
    (whole,) = _run(monkeypatch, everything := CountingSampler(), *args, out=tmp_path / "whole", **kwargs)
    assert everything.seeds == _chunks(range(3, 27), 4)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, CountingSampler(stop_at=4), *args, out=out, **kwargs)
    files = _side_files(out)
    assert len(files) == 2 and {f.suffix for f in files} == {".json", ".npz"}
    (side,) = [f for f in files if f.suffix == ".npz"]
    with np.load(side, allow_pickle=False) as arrays:
        assert int(arrays["done"]) == 4 and int(arrays["seed"]) == 11
    capsys.readouterr()
    (row,) = _run(monkeypatch, rest := CountingSampler(), *args, out=out, **kwargs)
    assert rest.seeds == [[15, 16, 17, 18], [19, 20, 21, 22], [23, 24, 25, 26]]
    assert "1 of 3 seed blocks are done" in capsys.readouterr().err
    assert row["per_block"] == whole["per_block"] and row["value"] == whole["value"]
    assert _side_files(out) == [] and read_results(out) == [row]


def test_rows_of_other_blocks_or_precision_are_new_rows(toy_models, tmp_path):
    args = ([toy_models["teacher"]], [2], ["euler"], [0.0], "toy2d", 8)
    kwargs = dict(device="cpu", progress=False, out=tmp_path)
    (one,) = evaluate(*args, **kwargs)
    (two,) = evaluate(*args, blocks=2, **kwargs)
    (bf16,) = evaluate(*args, blocks=2, precision="bf16", **kwargs)
    (again,) = evaluate(*args, blocks=2, precision="bf16", **kwargs)
    assert not any(r.get("resumed") for r in (one, two, bf16)) and again["resumed"]
    assert [r["precision"] for r in read_results(tmp_path)] == ["fp32", "fp32", "bf16"]
    assert two["per_block"][0]["values"] == one["values"]  # block 0 has the seeds of the one-block row
    with pytest.raises(DistillKacError, match="--blocks: must be a positive number"):
        evaluate(*args, blocks=0, **kwargs)
    with pytest.raises(DistillKacError, match="--precision: must be one of auto, fp32, bf16"):
        evaluate(*args, precision="fp16", **kwargs)


def _row(model: str, nfe: int, blocks: list[float], kind: str = "teacher", **extra) -> dict:
    interval = mean_interval(blocks)
    return {"model": model, "kind": kind, "steps": nfe, "nfe": nfe, "solver": "euler", "guidance": 0.0,
            "metric": "toy2d", "label": "sliced_wasserstein", "num": 10, "seed": 0, "blocks": len(blocks),
            "value": interval.mean, "values": {}, "interval": interval.to_dict(), "seconds": 1.0,
            "per_block": [{"block": b, "seed": 10 * b, "value": v, "values": {"sliced_wasserstein": v}}
                          for b, v in enumerate(blocks)], **extra}


def test_table_gives_intervals_and_paired_differences_at_equal_nfe():
    rows = [_row("a", 4, [1.0, 2.0, 3.0]), _row("b", 4, [1.5, 2.5, 3.5]), _row("c", 4, [0.9, 2.6, 2.0]),
            _row("d", 2, [5.0, 6.0, 7.0]), _row("s", 1, [3.0, 3.0, 3.0], kind="student")]
    table = render_table(rows)
    half = mean_interval([1.0, 2.0, 3.0]).half_width
    assert f"| 2 | ± {half:.4g} | " in table and "| 3 × 10 | " in table
    assert "Paired differences at equal NFE" in table
    assert "| 4 | sliced_wasserstein | a 4/euler/w=0 | b 4/euler/w=0 | +0.5000 ± 0.0000 | lower |" in table
    assert "| c 4/euler/w=0 | b 4/euler/w=0 |" in table
    assert "| c 4/euler/w=0 | a 4/euler/w=0 |" in table and table.count("| 4 | sliced_wasserstein |") == 3
    assert "| 2 | sliced_wasserstein |" not in table  # one row at 2 NFE: nothing to compare
    assert paired_rows(rows[1], rows[0]).mean == pytest.approx(0.5)
    with pytest.raises(DistillKacError, match="not evaluated on the same seed blocks"):
        paired_rows(rows[0], _row("e", 4, [1.0, 2.0]))
    # A row written before seed blocks existed: one block, no interval, no comparison.
    old = {k: v for k, v in _row("o", 4, [2.0]).items() if k not in ("blocks", "per_block", "interval")}
    assert "| o | teacher | 4 | 4 | euler | 0 | sliced_wasserstein | 2 | – |" in render_table([old])


def test_plot_has_error_bars_and_one_student_line(tmp_path, monkeypatch):
    import distillkac.nfe_table as nfe_table

    lines = []
    plt = nfe_table.agg_pyplot()
    original = plt.Axes.errorbar

    def recording(self, x, y, *args, **kwargs):
        lines.append((kwargs["label"], list(x), list(kwargs["yerr"])))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "errorbar", recording)
    rows = [_row("a", 4, [1.0, 2.0, 3.0]), _row("a", 2, [2.0, 2.0, 2.0]),
            _row("stage-4step", 4, [1.0, 1.5, 2.0], kind="student", teacher_sha256="1" * 64),
            _row("stage-2step", 2, [1.0, 1.5, 2.0], kind="student", teacher_sha256="2" * 64)]
    nfe_table.plot_metric_vs_nfe(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    half = mean_interval([1.0, 2.0, 3.0]).half_width
    assert lines == [("a euler w=0", [2, 4], [0.0, pytest.approx(half)]),
                     ("DistillKac students", [2, 4], [pytest.approx(half / 2)] * 2)]


def test_eval_cli_blocks_and_precision(toy_models, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(toy_models["teacher"]), "--steps", "2", "--solver", "euler,heun",
            "--guidance", "0", "--metric", "toy2d", "--num", "6", "--blocks", "3", "--precision", "bf16",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    rows = read_results(out)
    assert [(r["blocks"], r["precision"], len(r["per_block"])) for r in rows] == [(3, "bf16", 3)] * 2
    table = (out / "table.md").read_text()
    assert "3 × 6" in table and "| bf16 |" in table and "Paired differences at equal NFE" not in table
    capsys.readouterr()
    for option, value, message in [("--precision", "fp16", "invalid choice: 'fp16'"),
                                    ("--blocks", "0", "--blocks: must be a positive number of seed blocks, got 0")]:
        position = argv.index(option) + 1
        try:
            code = main([*argv[:position], value, *argv[position + 1:]])
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------ diagnostics

class LinearVelocity(torch.nn.Module):
    """``u(x, t) = x``: Euler gives ``x_{k+1} = (1 - h)·x_k`` exactly."""

    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(data_shape=(3,))

    def forward(self, x, t, y):
        return x.clone()


@pytest.mark.parametrize("solver, factor", [("euler", lambda h: 1 - h), ("ab2", None),
                                            ("heun", lambda h: 1 - h + h * h / 2)])
def test_velocity_profile_has_one_entry_per_step(solver, factor):
    path = KacPath(KacProcess(9.0, 3.0))
    steps, seeds = 5, list(range(7))
    profile = velocity_profile(LinearVelocity(), path, steps=steps, solver=solver, guidance=0.0, seeds=seeds,
                               labels=None, device="cpu", batch_size=3)
    assert len(profile["times"]) == len(profile["rms"]) == len(profile["max_abs"]) == steps
    assert profile["times"] == pytest.approx(time_grid(steps, 1.0).tolist()[:-1], abs=0)
    prior = path.prior((7, 3), generator=seeded_generators(seeds)).double()
    assert profile["rms"][0] == pytest.approx(float(prior.square().mean().sqrt()), rel=1e-6)
    assert profile["max_abs"][0] == pytest.approx(float(prior.abs().max()), rel=1e-6)
    if factor is not None:
        h = 1.0 / steps
        for k in range(steps):
            assert profile["rms"][k] == pytest.approx(profile["rms"][0] * factor(h) ** k, rel=1e-5)


def test_analytic_profile_kac_velocity_is_bounded_by_speed():
    c = 3.0
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((256, 16), generator=generator, dtype=torch.float64) * 2 - 1
    x0[0, :8], x0[0, 8:] = 1.0, -1.0
    times = [1e-3, 0.05, 0.3, 0.7, 1.0]
    profile = analytic_velocity_profile(KacPath(KacProcess(9.0, c)), x0, times, generator)
    assert profile["times"] == times
    assert max(profile["max_abs"]) <= 1 + c + 1e-12  # |f'|·max|x0| + c with f' = -1 (T = 1, linear)
    assert profile["max_abs"][0] >= 0.99 * (1 + c)  # at small t most coordinates sit on the atoms ±c·t
    # T = 2: f' = -1/2, g' = 1, data in [-0.5, 0.5]: bound 0.25 + c.
    profile = analytic_velocity_profile(KacPath(KacProcess(9.0, c), T=2.0), x0 / 2, times, generator)
    assert max(profile["max_abs"]) <= 0.25 + c + 1e-12


def test_analytic_profile_flow_matching_is_noise_minus_data():
    x0 = torch.rand((64, 4), generator=torch.Generator().manual_seed(1)) * 2 - 1
    times = [0.1, 0.9]
    profile = analytic_velocity_profile(FlowPath(), x0, times, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    for k in range(len(times)):
        target = (torch.randn(x0.shape, generator=replay) - x0).double()
        assert profile["rms"][k] == pytest.approx(float(target.square().mean().sqrt()), rel=1e-6)
        assert profile["max_abs"][k] == pytest.approx(float(target.abs().max()), rel=1e-6)


def test_analytic_profile_vp_velocity_blows_up_near_the_data():
    path = VPPath()
    x0 = torch.rand((4096, 8), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    times = [1e-4, 1e-3, 0.5]
    profile = analytic_velocity_profile(path, x0, times, torch.Generator().manual_seed(3))
    second_moment = float(x0.square().mean())
    for t, rms in zip(times, profile["rms"]):  # E u² = α'²·E x0² + σ'² (noise independent of data)
        _, _, dalpha, dsigma = path.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        expected = math.sqrt(float(dalpha) ** 2 * second_moment + float(dsigma) ** 2)
        assert rms == pytest.approx(expected, rel=0.03)  # 32768 coordinates: relative sd of rms ≈ 0.4%
    assert profile["rms"][1] / profile["rms"][2] > 2.5  # analytic 2.68 (cosine schedule, s = 0.008)
    assert profile["rms"][0] / profile["rms"][2] > 7.5  # analytic 7.84: σ' grows like t^(-1/2)
    kac = analytic_velocity_profile(build_path(KAC), x0.float(), times, torch.Generator().manual_seed(4))
    assert max(kac["max_abs"]) <= 1 + 3.0 + 1e-5


def test_plot_velocity_profiles_writes_a_png(tmp_path):
    profile = {"times": [1.0, 0.5], "rms": [1.0, 2.0], "max_abs": [3.0, 4.0]}
    plot_velocity_profiles({"kac": profile, "vp": profile}, tmp_path / "v.png", kac_c=3.0)
    assert (tmp_path / "v.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(DistillKacError, match="profiles"):
        plot_velocity_profiles({}, tmp_path / "w.png")
