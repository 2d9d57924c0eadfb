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
    assert payload["results"]["full_run"] is None


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
