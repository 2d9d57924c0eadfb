"""Smoke tests of the benchmark scripts (CPU, tiny network) and of their shared helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import gpu_check  # noqa: E402
import kac_sampler  # noqa: E402
import sample_throughput  # noqa: E402
import train_throughput  # noqa: E402

from distillkac.kac import KacProcess  # noqa: E402
from distillkac.paths import KacPath  # noqa: E402

ENVIRONMENT_KEYS = {"date_utc", "command", "git_commit", "hostname", "platform", "load_average_1_5_15min",
                    "python", "torch", "numpy", "device", "device_name"}
QUICK = ["--smoke", "--device", "cpu", "--warmup", "0", "--repeat", "1"]


def _read(path: Path, name: str) -> dict:
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["benchmark"] == name
    assert ENVIRONMENT_KEYS <= payload["environment"].keys()
    assert payload["environment"]["device"] == "cpu"
    assert len(payload["environment"]["load_average_1_5_15min"]) == 3
    assert payload["settings"]["smoke"] is True
    assert payload["table"].startswith("| ")
    return payload


def test_kac_sampler_smoke(tmp_path):
    kac_sampler.main([*QUICK, "--batch", "4", "--model-batch", "2", "--out", str(tmp_path)])
    payload = _read(tmp_path / "kac_sampler_cpu_smoke.json", "kac_sampler_cpu_smoke")
    results = payload["results"]
    assert results["precomputed_table_bytes"] == 0
    assert results["draw_output_bytes"] == 2 * 4 * 3 * 8 * 8 * 4  # x_t + target, float32, batch 4, 3x8x8
    ratio = results["draw_float32_at_model_batch"]["median_s"] / results["unet_forward_backward"]["median_s"]
    assert results["ratio_draw_float32_to_unet"] == pytest.approx(ratio, rel=1e-12)
    assert [row["batch"] for row in results["rows"]] == [4, 4, 2, 2, 2]
    assert payload["settings"]["precision"] == "fp32"


def test_train_throughput_smoke(tmp_path):
    train_throughput.main([*QUICK, "--batch", "2", "--variants", "fp32", "--out", str(tmp_path)])
    payload = _read(tmp_path / "train_throughput_cpu_smoke.json", "train_throughput_cpu_smoke")
    rows = payload["results"]["rows"]
    assert [row["variant"] for row in rows] == ["baseline", "fp32"]
    assert rows[0]["speedup_vs_baseline"] == 1.0 and rows[0]["float64_target"] is True
    flops = payload["results"]["flops_per_image"]
    assert flops > 0
    for row in rows:
        assert row["images_per_s"] == pytest.approx(2 / row["step"]["median_s"], rel=1e-12)
        assert row["achieved_tflops"] == pytest.approx(flops * row["images_per_s"] / 1e12, rel=1e-12)
        assert row["mfu_percent"] is None  # no MFU on the CPU
        assert 0 < row["draw_share_percent"]


def test_sample_throughput_smoke(tmp_path):
    sample_throughput.main([*QUICK, "--steps", "1,2", "--batches", "2", "--prior-images", "4",
                            "--out", str(tmp_path)])
    payload = _read(tmp_path / "sample_throughput_cpu_smoke.json", "sample_throughput_cpu_smoke")
    rows = payload["results"]["rows"]
    assert [(row["model"], row["steps"], row["nfe"]) for row in rows] == [
        ("student", 1, 1), ("teacher", 1, 2), ("student", 2, 2), ("teacher", 2, 4)]
    for row in rows:
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"], rel=1e-12)
    prior = payload["results"]["prior_draw"]
    assert prior["images"] == 4 and prior["batch"] == 4
    assert prior["loop_over_batched"] == pytest.approx(
        prior["loop_generators"]["median_s"] / prior["batched_streams"]["median_s"], rel=1e-12)
    assert payload["results"]["full_runs"] == []


def test_sample_throughput_full_run_smoke(tmp_path):
    sample_throughput.main([*QUICK, "--steps", "1", "--batches", "1", "--prior-images", "2", "--num-images", "3",
                            "--full-batch", "2", "--out", str(tmp_path)])
    runs = _read(tmp_path / "sample_throughput_cpu_smoke.json", "sample_throughput_cpu_smoke")["results"]["full_runs"]
    assert [(run["precision"], run["images"], run["batch"]) for run in runs] == [("fp32", 3, 2)]  # bf16: CUDA only


def test_gpu_check_runs_the_chosen_parts_in_order_and_summarises(tmp_path):
    summary = gpu_check.main(["--smoke", "--parts", "sample,kac", "--out", str(tmp_path / "out"),
                              "--work", str(tmp_path / "work")])
    assert [(part["name"], part["status"]) for part in summary["parts"]] == [("kac", "ok"), ("sample", "ok")]
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["gpu_check.log", "kac_sampler_cpu_smoke.json", "sample_throughput_cpu_smoke.json",
                       "summary.json", "summary.md"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    figures = summary["figures"]
    assert figures["kac_draw_percent_of_fwd_bwd"] > 0 and figures["prior_loop_over_batched"] > 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| kac | ok |" in markdown and "per-image prior: loop over generators / batched streams" in markdown


def test_gpu_check_budget_leaves_parts_without_time_unrun(tmp_path):
    summary = gpu_check.main(["--device", "cpu", "--budget-seconds", "1", "--out", str(tmp_path)])
    assert [part["status"] for part in summary["parts"]] == ["skipped: no time left in the budget"] * 4
    assert not list(tmp_path.glob("*_cpu.json"))


def test_teacher_variant_is_the_fastest_without_compile(tmp_path):
    rows = [{"variant": "bf16", "precision": "bf16", "channels_last": "off", "compile": False, "images_per_s": 5.0},
            {"variant": "bf16+cl", "precision": "bf16", "channels_last": "on", "compile": False, "images_per_s": 6.0},
            {"variant": "bf16+cl+compile", "precision": "bf16", "channels_last": "on", "compile": True,
             "images_per_s": 9.0}]
    file = tmp_path / "train_throughput_cuda.json"
    file.write_text(json.dumps({"results": {"rows": rows}}))
    assert gpu_check.teacher_variant(file) == ["--precision", "bf16", "--channels-last", "on"]
    assert gpu_check.teacher_variant(tmp_path / "missing.json") == []


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    """The whole check with tiny sizes on the CPU (about 75 s on two cores, hence slow): the pipeline trains,
    measures FID (when the Inception weights are there), distills and samples."""
    summary = gpu_check.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert [(part["name"], part["status"]) for part in summary["parts"]] == [
        ("kac", "ok"), ("train", "ok"), ("sample", "ok"), ("pipeline", "ok")]
    pipeline = _read(tmp_path / "out" / "pipeline_cpu_smoke.json", "pipeline_cpu_smoke")["results"]
    assert pipeline["skipped"] is None
    teacher, distill = pipeline["teacher"], pipeline["distill"]
    assert len(teacher["segments"]) == 3 and len(teacher["points"]) == 2
    assert teacher["points"][0]["step"] < teacher["points"][1]["step"]
    assert distill["step"] > 2 and len(distill["segments"]) == 2
    assert (tmp_path / "work" / "distill" / "stage-20step" / "artifact" / "config.json").is_file()


def test_time_call_counts_warmup_and_repeats():
    calls = []
    timing = common.time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeat=3)
    assert len(calls) == 5 and len(timing.seconds) == 3
    assert timing.to_dict()["repeats"] == 3


def test_tensor_bytes_sees_stored_tensors_only():
    class Holder:
        def __init__(self):
            self.table = torch.zeros(10, dtype=torch.float64)
            self.inner = KacProcess()

    assert common.tensor_bytes(KacPath(KacProcess())) == 0
    assert common.tensor_bytes(Holder()) == 80


def test_format_table():
    table = common.format_table([{"a": 1.23456, "b": "x"}, {"a": 2}], [("a", "A"), ("b", "B")])
    assert table == "| A | B |\n|---|---|\n| 1.235 | x |\n| 2 |  |"
