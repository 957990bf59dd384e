"""The GPUs the job was given and the driver they run, as the launcher checks them before a run.

A stand-in `nvidia-smi` on PATH (tests/fake_gpus.py) plays the node: four H100s, some of them
full, on a driver too old or new enough for the pinned torch's CUDA build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fake_gpus
import pytest
from conftest import kit_env, run_launcher

from sftkit import hardware

FULL_MIB = 1229  # 1.2 GiB free of 80: another job holds the GPU


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "my.jsonl"
    path.write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n', encoding="utf-8")
    return path


def node(tmp_path: Path, driver: str = "580.65.06", full: tuple[int, ...] = ()) -> list[dict]:
    gpus = [fake_gpus.gpu(i, FULL_MIB if i in full else None, driver=driver) for i in range(4)]
    fake_gpus.install(tmp_path / "bin", gpus)
    return gpus


def dry_run(tmp_path: Path, data: Path, gpus: int = 4, **env: str):
    return run_launcher("--model", "qwen3-8b", "--dataset", str(data), "--gpus", str(gpus),
                        "--output-dir", str(tmp_path / "out"), "--dry-run",
                        env=fake_gpus.path_with(tmp_path / "bin", kit_env()) | env)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_cuda_visible_devices_picks_indices_and_uuids_as_cuda_does() -> None:
    gpus = [hardware.Gpu(i, f"GPU-{i}abc{i}", "H100", 81559, 81559, 9.0, "580.65.06") for i in range(4)]
    assert hardware.visible(gpus, None) == gpus
    assert [g.index for g in hardware.visible(gpus, "2,0")] == [2, 0]
    assert [g.index for g in hardware.visible(gpus, "GPU-3abc3,GPU-1")] == [3, 1]  # full UUID, then a prefix
    assert [g.index for g in hardware.visible(gpus, "1,7,2")] == [1]  # CUDA stops at the first unknown device
    assert hardware.visible(gpus, "") == [] and hardware.visible(gpus, "-1") == []
    assert hardware.visible(gpus, "GPU-") == []  # a prefix that matches several GPUs names none


def test_only_the_gpus_the_job_was_given_are_checked(tmp_path: Path, data: Path) -> None:
    gpus = node(tmp_path, full=(2, 3))
    given = dry_run(tmp_path, data, gpus=2, CUDA_VISIBLE_DEVICES="0,1")
    assert given.returncode == 0, given.stdout + given.stderr
    memory = next(line for line in given.stdout.splitlines() if line.startswith("memory:"))
    assert gpus[0]["uuid"] in memory and gpus[1]["uuid"] in memory and gpus[2]["uuid"] not in memory
    assert memory.endswith(": fits")
    assert "this machine sees 2 GPU(s)" in given.stdout

    taken = dry_run(tmp_path, data, gpus=2, CUDA_VISIBLE_DEVICES=f"{gpus[2]['uuid']},{gpus[3]['uuid']}")
    assert taken.returncode != 0
    errors = error_lines(taken)
    assert len(errors) == 1 and "Traceback" not in taken.stderr, taken.stderr
    assert "exceeds 1.2 GiB free" in errors[0] and gpus[2]["uuid"] in errors[0] and gpus[3]["uuid"] in errors[0]
    assert "SFTKIT_MEMORY_CHECK=warn" in errors[0]

    everything = dry_run(tmp_path, data, gpus=4)  # no mask: all four, two of them full
    assert everything.returncode != 0 and "exceeds 1.2 GiB free" in everything.stderr
    warned = dry_run(tmp_path, data, gpus=4, SFTKIT_MEMORY_CHECK="warn")
    assert warned.returncode == 0 and "does NOT fit by the estimate" in warned.stdout


@pytest.mark.skipif(hardware.torch_cuda_build() != "13.0", reason="the pinned torch 2.11.0 from PyPI is CUDA 13.0")
def test_a_driver_older_than_the_cuda_build_is_refused_in_one_line(tmp_path: Path, data: Path) -> None:
    node(tmp_path, driver="550.54.15")
    old = dry_run(tmp_path, data)
    assert old.returncode != 0
    errors = error_lines(old)
    assert len(errors) == 1 and "Traceback" not in old.stderr, old.stderr
    assert "NVIDIA driver 550.54.15" in errors[0] and "CUDA 13.0" in errors[0] and "580" in errors[0]
    assert "--index-url https://download.pytorch.org/whl/cu128" in errors[0]  # the other way out
    assert "torch==2.11.0+cu128 torchaudio==2.11.0+cu128 torchvision==0.26.0+cu128" in errors[0]

    node(tmp_path, driver="580.65.06")
    new = dry_run(tmp_path, data)
    assert new.returncode == 0, new.stdout + new.stderr
    assert "driver:     NVIDIA 580.65.06 runs torch's CUDA 13.0 build" in new.stdout


def test_minimum_driver_follows_the_cuda_build() -> None:
    assert hardware.driver_problem("550.54.15", "12.8") is None  # CUDA 12 minor-version compatibility
    assert hardware.driver_problem("520.61.05", "12.8") is not None
    assert hardware.driver_problem("580.65.06", "13.0") is None
    assert hardware.driver_problem("575.57.08", "13.0") is not None
    assert hardware.driver_problem("550.54.15", None) is None  # a CPU build needs no driver


def test_no_gpu_visible_says_the_driver_was_not_checked(tmp_path: Path, data: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(data), "--gpus", "4", "--dry-run",
                          "--output-dir", str(tmp_path / "out"),
                          env=kit_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr
    assert "driver:     not checked (no GPU visible here" in result.stdout


def test_mig_instances_in_cuda_visible_devices_are_the_gpus_given(tmp_path: Path, monkeypatch, data: Path) -> None:
    """A node handed MIG slices (CUDA_VISIBLE_DEVICES=MIG-...,MIG-...): each slice is one device on its GPU."""
    gpus = [fake_gpus.gpu(0, mig=("3g.40gb", "3g.40gb")), fake_gpus.gpu(1)]
    fake_gpus.install(tmp_path / "bin", gpus)
    listing = subprocess.run([str(tmp_path / "bin" / "nvidia-smi"), "-L"], capture_output=True, text=True).stdout
    assert f"  MIG 3g.40gb       Device  1: (UUID: {gpus[0]['mig'][1][1]})" in listing  # as the real one lists it
    first, second = (uuid for _, uuid in gpus[0]["mig"])
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{second},{first}")
    monkeypatch.delenv("SFTKIT_VISIBLE_GPUS", raising=False)
    seen = hardware.visible_gpus()
    assert [(gpu.index, gpu.uuid) for gpu in seen] == [(0, second), (0, first)]
    assert seen[0].name == "NVIDIA H100 80GB HBM3 MIG 3g.40gb" and seen[0].memory_total_mib == 40000
    assert seen[0].compute_capability == 9.0 and seen[0].driver == "580.65.06"
    assert hardware.visible_gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", first[:12])  # a prefix, as CUDA takes it
    assert [gpu.uuid for gpu in hardware.visible_gpus()] == [first]

    result = run_launcher("--model", "qwen3-8b", "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
                          "--dry-run", env=fake_gpus.path_with(tmp_path / "bin", kit_env())
                          | {"CUDA_VISIBLE_DEVICES": f"{first},{second}", "SFTKIT_MEMORY_CHECK": "warn"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this machine sees 2 GPU(s)" in result.stdout
    memory = next(line for line in result.stdout.splitlines() if line.startswith("memory:"))
    assert first in memory and second in memory


def test_without_nvidia_smi_torch_counts_the_gpus(tmp_path: Path, monkeypatch) -> None:
    """No nvidia-smi on the node (a container without the tools) while CUDA sees GPUs: torch's count."""
    asked = tmp_path / "asked"
    monkeypatch.setattr(hardware, "TORCH_COUNT", [sys.executable, "-c", f"open({str(asked)!r}, 'a').write('x'); "
                                                  "print('a warning first'); print(3)"])
    devices = tmp_path / "dev"
    devices.mkdir()
    monkeypatch.setattr(hardware, "DEVICE_FILES", str(devices / "nvidia[0-9]*"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("SFTKIT_VISIBLE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hardware.visible_gpu_count() == 0 and not asked.exists()  # no /dev/nvidia*: torch is not asked

    (devices / "nvidia0").touch()
    assert hardware.visible_gpu_count() == 3 and asked.read_text() == "x"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.visible_gpu_count() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("SFTKIT_VISIBLE_GPUS", "2")
    assert hardware.visible_gpu_count() == 2
    monkeypatch.delenv("SFTKIT_VISIBLE_GPUS")
    monkeypatch.setattr(hardware, "TORCH_COUNT", [sys.executable, "-c", "raise SystemExit(1)"])
    assert hardware.visible_gpu_count() == 0  # torch cannot tell: none

    fake_gpus.install(tmp_path / "bin", [fake_gpus.gpu(i) for i in range(4)])  # nvidia-smi is there: it decides
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(hardware, "TORCH_COUNT", [sys.executable, "-c", "print(7)"])
    assert hardware.visible_gpu_count() == 3  # CUDA_VISIBLE_DEVICES=0,1,2 of its four
