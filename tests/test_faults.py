"""Runs that survive faults: kill and resume bit-identically, a save cut short, SIGTERM, one run
per output dir, two nodes on localhost, and Slurm (faked scontrol/srun).

The real stack (torchrun, 2 CPU processes, DeepSpeed ZeRO-3, LLaMA-Factory) on the tiny Qwen3.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import KIT_DIR, kit_env, run_launcher
from safetensors.torch import load_file

from sftkit import runs

pytestmark = pytest.mark.slow

# 40 demo rows, 4 per process x 2 processes -> 5 steps an epoch; 3 epochs = 15 steps
RUN_ARGS = ["--", "--num_train_epochs", "3", "--save_steps", "5", "--logging_steps", "5"]


def launch_args(model: Path, out: Path) -> list[str]:
    return ["--model", "demo", "--model-path", str(model), "--output-dir", str(out), *RUN_ARGS]


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """sft_train.sh in the background, in a session of its own (like a job on a node)."""
    with log.open("w") as handle:
        return subprocess.Popen(["bash", str(KIT_DIR / "sft_train.sh"), *args], cwd=KIT_DIR, env=env or kit_env(),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def whole(checkpoint: Path) -> bool:
    return checkpoint.is_dir() and runs.checkpoint_problem(checkpoint) is None


def kill_every_process(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL the launcher's session and every worker of the run (workers sit in sessions of their own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid, _ in runs.live_run_processes(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    wait_for(lambda: not runs.live_run_processes(out), 30, "the killed run's processes to disappear")


def same_adapter(a: Path, b: Path) -> bool:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def reference_run(tiny_qwen3: Path, tmp_path_factory) -> Path:
    """An uninterrupted run with the same seed and settings."""
    out = tmp_path_factory.mktemp("reference") / "lora"
    result = run_launcher(*launch_args(tiny_qwen3, out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_killed_run_resumes_to_a_bit_identical_adapter(tiny_qwen3: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    proc = start(launch_args(tiny_qwen3, out), tmp_path / "first.log")
    wait_for(lambda: whole(out / "checkpoint-5"), 600, "the first checkpoint")
    step_delay = random.uniform(0.0, 1.0)  # a random step after the first checkpoint
    time.sleep(step_delay)
    kill_every_process(proc, out)
    assert not (out / "adapter_model.safetensors").exists(), f"run finished before the kill ({step_delay:.2f} s)"

    result = run_launcher(*launch_args(tiny_qwen3, out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert "cleared a stale lock" in result.stdout  # the killed launcher's lock file, held by nobody
    assert same_adapter(out, reference_run), "resumed adapter differs from the uninterrupted run's"


def test_checkpoint_cut_short_while_saving_is_skipped(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    proc = start(launch_args(tiny_qwen3, out), tmp_path / "first.log")
    wait_for(lambda: whole(out / "checkpoint-5"), 600, "the first checkpoint")
    # Kill the moment a later checkpoint folder appears, before its trainer_state.json is written.
    caught = None
    deadline = time.monotonic() + 600
    while caught is None and time.monotonic() < deadline and proc.poll() is None:
        for step in (10, 15):
            folder = out / f"checkpoint-{step}"
            if folder.is_dir() and not (folder / "trainer_state.json").exists():
                kill_every_process(proc, out)
                caught = folder
                break
        time.sleep(0.001)
    assert caught is not None, "no checkpoint save was caught in flight"
    if proc.poll() is None:
        kill_every_process(proc, out)
    assert runs.checkpoint_problem(caught) is not None

    result = run_launcher(*launch_args(tiny_qwen3, out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{caught} is incomplete" in result.stdout
    previous = f"checkpoint-{int(caught.name.split('-')[1]) - 5}"
    assert f"resuming from {out / previous}" in result.stdout
    assert (out / f"incomplete-{caught.name}").is_dir()  # set aside, never loaded
    assert (out / "adapter_model.safetensors").is_file()


def test_sigterm_stops_every_worker_after_a_checkpoint(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    proc = start(launch_args(tiny_qwen3, out), tmp_path / "run.log")
    wait_for(lambda: whole(out / "checkpoint-5"), 600, "the first checkpoint")
    workers = runs.live_run_processes(out)
    assert workers, "no process of the run carries SFTKIT_RUN_DIR"

    # one run per output dir: a second launch is refused, naming the live run's process
    second = run_launcher(*launch_args(tiny_qwen3, out))
    assert second.returncode != 0
    assert "held by a live run" in second.stderr and f"pid {proc.pid}" in second.stderr

    if (out / "adapter_model.safetensors").exists():
        pytest.fail("the run finished before SIGTERM could be sent")
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    assert code != 0
    assert not runs.live_run_processes(out), "processes of the run outlived sft_train.sh"
    for pid, _ in workers:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    log = (tmp_path / "run.log").read_text()
    assert "stop requested; saving checkpoint-" in log
    newest, skipped = runs.newest_whole_checkpoint(out)
    assert newest is not None and not skipped
    stopped_at = int(log.split("stop requested; saving checkpoint-")[1].split()[0])
    assert newest.name == f"checkpoint-{stopped_at}"  # the step in flight was finished and saved
    manifest = (out / "run_manifest.json").read_text()
    assert '"stopped by SIGTERM"' in manifest


def test_two_nodes_on_localhost_finish_a_run_together(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    port = str(29000 + random.randint(0, 900))
    procs = []
    for rank in (0, 1):
        env = kit_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        args = ["--model", "demo", "--model-path", str(tiny_qwen3), "--output-dir", str(out), "--gpus", "1",
                "--", "--num_train_epochs", "2"]
        procs.append(start(args, tmp_path / f"node{rank}.log", env=env))
        time.sleep(3)  # node 0 takes the output dir first, as a real job's rank 0 does
    codes = [proc.wait(timeout=900) for proc in procs]
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "--nnodes 2 --node_rank 1" in logs[1]
    assert (out / "adapter_model.safetensors").is_file()
    assert '"world_size": 2' in (out / "run_manifest.json").read_text()


def test_slurm_script_resolves_torchrun_arguments(tmp_path: Path) -> None:
    """sft_train.sbatch under a faked Slurm: stub scontrol and srun on PATH, one dry run per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                                      'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    # srun: run the task once per node with SLURM_NODEID set, as Slurm does
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    data = tmp_path / "my.jsonl"
    data.write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n')
    env = kit_env(SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
                  SLURM_SUBMIT_DIR=str(KIT_DIR))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", str(KIT_DIR / "slurm" / "sft_train.sbatch"), "--model", "qwen3-14b",
                             "--dataset", str(data), "--dry-run"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line for line in result.stdout.splitlines() if line.strip().startswith("torchrun")]
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        assert f"--nnodes 2 --node_rank {rank} --nproc_per_node 4" in command
        assert "--master_addr gpu-node-07 --master_port 29500" in command

    env.pop("SLURM_JOB_NODELIST")
    result = subprocess.run(["bash", str(KIT_DIR / "slurm" / "sft_train.sbatch"), "--model", "qwen3-14b"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "not inside a Slurm job" in result.stderr
