"""Artefacts, training state, atomic writes and the run lock."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet_config

from distillkac import checkpoint
from distillkac.checkpoint import (
    artifact_sha256,
    load_artifact,
    load_training_state,
    save_artifact,
    save_training_state,
)
from distillkac.errors import DistillKacError
from distillkac.files import RunLock, atomic_write_bytes
from distillkac.nets import MLPConfig, build_network

META = {"kind": "teacher", "path": {"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0}}

pytestmark = pytest.mark.usefixtures("single_thread")


def _trained_like(model: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    """Perturb every weight (the zero-initialised output layer would make outputs trivially equal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture
def mlp() -> torch.nn.Module:
    config = MLPConfig(dim=2, hidden=16, depth=2, num_classes=4)
    return _trained_like(build_network(config, generator=torch.Generator().manual_seed(0))).eval()


def test_artifact_round_trip_gives_identical_weights_and_outputs(tmp_path, mlp):
    meta = save_artifact(tmp_path / "art", mlp, META)
    loaded, read_meta = load_artifact(tmp_path / "art")
    assert read_meta == meta
    assert meta["format"] == "distillkac-artifact" and meta["version"] == 1
    assert meta["num_classes"] == 4 and meta["data_shape"] == [2] and meta["net"]["hidden"] == 16
    weights = (tmp_path / "art" / "model.safetensors").read_bytes()
    assert meta["weights_sha256"] == hashlib.sha256(weights).hexdigest() == artifact_sha256(tmp_path / "art")
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    t, y = torch.rand(5, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(mlp(x, t, y), loaded(x, t, y))
    assert not loaded.training


def test_unet_artifact_round_trip(tmp_path):
    unet = _trained_like(build_network(tiny_unet_config(), generator=torch.Generator().manual_seed(0))).eval()
    save_artifact(tmp_path / "art", unet, META)
    loaded, meta = load_artifact(tmp_path / "art")
    assert meta["data_shape"] == [1, 8, 8]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([0.2, 0.9]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(unet(x, t, y), loaded(x, t, y))


def test_resaving_replaces_the_artifact_and_leaves_no_temporary_files(tmp_path, mlp):
    save_artifact(tmp_path / "art", mlp, META)
    with torch.no_grad():
        next(mlp.parameters()).add_(1.0)
    save_artifact(tmp_path / "art", mlp, {**META, "kind": "baseline"})
    loaded, meta = load_artifact(tmp_path / "art")
    assert meta["kind"] == "baseline"
    assert torch.equal(next(loaded.parameters()), next(mlp.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_or_truncated_weights_are_refused(tmp_path, mlp, damage):
    save_artifact(tmp_path / "art", mlp, META)
    weights = tmp_path / "art" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    weights.write_bytes(bytes(data))
    with pytest.raises(DistillKacError, match="model.safetensors does not match the sha256") as info:
        load_artifact(tmp_path / "art")
    assert "\n" not in str(info.value)


def test_missing_or_foreign_artifacts_are_refused(tmp_path, mlp):
    with pytest.raises(DistillKacError, match="not a directory"):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillKacError, match="config.json is missing"):
        load_artifact(tmp_path / "empty")
    save_artifact(tmp_path / "art", mlp, META)
    meta_path = tmp_path / "art" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(DistillKacError, match="not a distillkac artefact"):
        load_artifact(tmp_path / "art")
    meta_path.write_text("{not json")
    with pytest.raises(DistillKacError, match="not valid JSON"):
        load_artifact(tmp_path / "art")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "art" / "model.safetensors").unlink()
    with pytest.raises(DistillKacError, match="model.safetensors is missing"):
        load_artifact(tmp_path / "art")


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path, mlp):
    save_artifact(tmp_path / "art", mlp, META)
    meta_path = tmp_path / "art" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["net"]["hidden"] = 24
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DistillKacError, match="does not fit the network.*shape"):
        load_artifact(tmp_path / "art")
    meta["net"]["hidden"], meta["net"]["depth"] = 16, 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DistillKacError, match="missing keys"):
        load_artifact(tmp_path / "art")


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old contents")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_failed_artifact_save_keeps_the_previous_artifact(tmp_path, mlp, monkeypatch):
    save_artifact(tmp_path / "art", mlp, META)
    before = artifact_sha256(tmp_path / "art")

    def failing_json(path, obj):
        raise OSError("killed midway")

    monkeypatch.setattr(checkpoint, "atomic_write_json", failing_json)
    with torch.no_grad():
        next(mlp.parameters()).add_(1.0)
    with pytest.raises(OSError, match="killed midway"):
        save_artifact(tmp_path / "art", mlp, META)
    monkeypatch.undo()
    assert artifact_sha256(tmp_path / "art") == before
    load_artifact(tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_training_state_round_trip(tmp_path):
    state = {"step": 3, "model": {"w": torch.arange(4.0)}, "list": [1, 2.5, "x"], "nested": {"a": None}}
    save_training_state(tmp_path / "training-state.pt", state)
    loaded = load_training_state(tmp_path / "training-state.pt")
    assert loaded["step"] == 3 and loaded["list"] == [1, 2.5, "x"] and loaded["nested"] == {"a": None}
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))


class _Exploit:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_training_state_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "training-state.pt"
    torch.save({"step": 1, "payload": _Exploit(marker)}, path)
    with pytest.raises(DistillKacError, match="cannot be loaded safely") as info:
        load_training_state(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe loader really would run the payload
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_training_state_is_refused(tmp_path):
    path = tmp_path / "training-state.pt"
    path.write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(DistillKacError, match="cannot be loaded safely"):
        load_training_state(path)
    with pytest.raises(DistillKacError, match="does not exist"):
        load_training_state(tmp_path / "absent.pt")


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder == {"pid": os.getpid(), "hostname": socket.gethostname()}
        with pytest.raises(DistillKacError, match=f"in use \\(locked by pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
        code = ("import sys; from distillkac.files import RunLock\n"
                "try:\n    RunLock(sys.argv[1]).__enter__()\n"
                "except ValueError as e:\n    print(e); sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert other.returncode == 3 and "is in use" in other.stdout
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "hostname": socket.gethostname()}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "hostname": "another-host"}))
    with pytest.raises(DistillKacError, match="locked by pid"):
        RunLock(tmp_path).__enter__()
