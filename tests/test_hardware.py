"""The GPUs the job was given and the driver they run, as the launcher checks them before a run.

A stand-in `nvidia-smi` on PATH (tests/fake_gpus.py) plays the node: four H100s, some of them
full, on a driver too old or new enough for the pinned torch's CUDA build.
"""

from __future__ import annotations

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
