"""Runs that survive faults: kill and resume bit-identically, a save cut short, one run per output dir,
checkpoints by the clock, resume on another world size, and Slurm (faked scontrol/srun) signalling SIGTERM
to every process of the step.
Several nodes: tests/test_multinode.py.

The real stack (torchrun, 2 CPU processes, DeepSpeed ZeRO-3, LLaMA-Factory) on the tiny Qwen3, and the clock
test on the shared tiny Llama 3 run (conftest.llama_run): those tests are marked slow; the Slurm script's dry
run and its stop grace train nothing and run in the fast part.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import KIT_DIR, kit_env, run_launcher
from procs import start, wait_for
from safetensors.torch import load_file

from sftkit.launch import runs
from sftkit.launch.plan import free_port

# 40 demo rows, 4 per process x 2 processes -> 5 steps an epoch; 3 epochs = 15 steps
RUN_ARGS = ["--", "--num_train_epochs", "3", "--save_steps", "5", "--logging_steps", "5"]


def launch_args(model: Path, out: Path, dataset: Path | None = None) -> list[str]:
    data = ["--dataset", str(dataset)] if dataset else []
    return ["--model", "demo", "--model-path", str(model), "--output-dir", str(out), *data, *RUN_ARGS]


@pytest.fixture(scope="module")
def reasoning_data(tmp_path_factory) -> Path:
    """The demo's 40 rows with a <think> block in every answer: Qwen3 then trains with enable_thinking
    true, decided by the data check (which runs after the resume check of a relaunch)."""
    rows = json.loads((KIT_DIR / "data" / "demo.json").read_text(encoding="utf-8"))
    for row in rows:
        row["output"] = f"<think>\nThe kit's docs say so.\n</think>\n\n{row['output']}"
    path = tmp_path_factory.mktemp("reasoning") / "reasoning.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


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
def reference_run(tiny_qwen3: Path, reasoning_data: Path, tmp_path_factory) -> Path:
    """An uninterrupted run with the same seed, settings and data."""
    out = tmp_path_factory.mktemp("reference") / "lora"
    result = run_launcher(*launch_args(tiny_qwen3, out, reasoning_data), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_run_killed_while_saving_resumes_from_the_last_whole_checkpoint_bit_identically(
        tiny_qwen3: Path, reasoning_data: Path, reference_run: Path, tmp_path: Path) -> None:
    """SIGKILL to every process the moment a checkpoint folder appears, before its trainer_state.json: the
    relaunch sets that checkpoint aside, resumes from the whole one before it, and ends with the very adapter
    of an uninterrupted run (the stale lock of the killed launcher is taken over). The data carries <think>
    reasoning, so the thinking setting the data check decides is the same on the relaunch."""
    out = tmp_path / "lora"
    proc = start(launch_args(tiny_qwen3, out, reasoning_data), tmp_path / "first.log")
    wait_for(lambda: whole(out / "checkpoint-5"), 600, "the first checkpoint")
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
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before the kill"

    result = run_launcher(*launch_args(tiny_qwen3, out, reasoning_data), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "enable_thinking True" in result.stdout  # turned on by the data, on both launches
    record = json.loads((out / "run_manifest.json").read_text())
    assert record["enable_thinking"] is True and record["resume_keys"]["enable_thinking"] == "auto"  # not user-set
    assert "enable_thinking: true" in (out / "merge_model.yaml").read_text()  # the merge serves what trained
    assert f"{caught} is incomplete" in result.stdout
    previous = f"checkpoint-{int(caught.name.split('-')[1]) - 5}"
    assert f"resuming from {out / previous}" in result.stdout
    assert "cleared a stale lock" in result.stdout  # the killed launcher's lock file, held by nobody
    assert (out / f"incomplete-{caught.name}").is_dir()  # set aside, never loaded
    assert same_adapter(out, reference_run), "resumed adapter differs from the uninterrupted run's"


def fake_slurm(bin_dir: Path, hosts: str = "gpu-node-07\\ngpu-node-08") -> Path:
    """Stub scontrol and srun on PATH. srun records its options, then runs the task once per node with
    SLURM_NODEID set, as Slurm does (in the foreground, so every process of the step is its descendant)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                                      f'printf "{hosts}\\n"\n')
    # like srun, it outlives a SIGTERM to the step and waits for its tasks to end
    (bin_dir / "srun").write_text('#!/bin/bash\ntrap : TERM INT HUP\nopts=()\n'
                                  'while [[ "$1" == --* ]]; do opts+=("$1"); shift; done\n'
                                  f'echo "${{opts[*]}}" >> {bin_dir / "srun.log"}\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n')
    for stub in ("scontrol", "srun"):
        (bin_dir / stub).chmod(0o755)
    return bin_dir


def test_slurm_script_resolves_torchrun_arguments(tmp_path: Path) -> None:
    """sft_train.sbatch under a faked Slurm: stub scontrol and srun on PATH, one dry run per node."""
    bin_dir = fake_slurm(tmp_path / "bin")
    data = tmp_path / "my.jsonl"
    data.write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n')
    env = kit_env(SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
                  SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(KIT_DIR))
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
    # newer Slurm does not pass sbatch's --cpus-per-task on to srun: the script must
    assert "--cpus-per-task=16" in (bin_dir / "srun.log").read_text()

    env.pop("SLURM_JOB_NODELIST")
    result = subprocess.run(["bash", str(KIT_DIR / "slurm" / "sft_train.sbatch"), "--model", "qwen3-14b"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "not inside a Slurm job" in result.stderr


def test_slurm_stop_grace_acts_before_slurms_kill() -> None:
    script = (KIT_DIR / "slurm" / "sft_train.sbatch").read_text()
    lead = int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", script, re.MULTILINE).group(1))
    assert f"SIGNAL_LEAD_S={lead} " in script
    grace = subprocess.run(["bash", "-c", 'eval "$(grep -E "^(SIGNAL_LEAD_S|export SFTKIT_STOP_GRACE)=" "$0")"; '
                            'echo "$SFTKIT_STOP_GRACE"', str(KIT_DIR / "slurm" / "sft_train.sbatch")],
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert 0 < int(grace) < lead


def step_processes(job_id: str) -> list[int]:
    """Every process of a (faked) Slurm step: what cgroup tracking would signal."""
    wanted = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_slurm_signalling_every_process_of_the_step_still_saves_one_checkpoint(tiny_qwen3: Path,
                                                                                tmp_path: Path) -> None:
    bin_dir = fake_slurm(tmp_path / "bin", hosts="localhost")
    out, job = tmp_path / "lora", f"fake-{random.randint(0, 10**9)}"
    env = kit_env(SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2",
                  SLURM_SUBMIT_DIR=str(KIT_DIR), MASTER_PORT=str(free_port()))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    log = tmp_path / "job.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(["bash", str(KIT_DIR / "slurm" / "sft_train.sbatch"), *launch_args(tiny_qwen3, out)],
                                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: whole(out / "checkpoint-5"), 600, "the first checkpoint")
    pids, workers = step_processes(job), runs.live_run_processes(out)
    assert len(pids) >= 4, pids  # sbatch/srun/launcher, torchrun and two workers
    assert workers, "no process of the run carries SFTKIT_RUN_DIR"

    # one run per output dir: a second launch (outside the job) is refused, naming the live run's launcher
    second = run_launcher(*launch_args(tiny_qwen3, out))
    holder = re.search(r"pid (\d+)", second.stderr)
    assert second.returncode != 0 and "held by a live run" in second.stderr and holder, second.stderr
    assert int(holder.group(1)) in pids, (holder.group(0), pids)

    if (out / "adapter_model.safetensors").exists():
        pytest.fail("the run finished before the signal could be sent")
    for pid in pids:  # as Slurm does at the time limit, on preemption or scancel: all of them at once
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    code = proc.wait(timeout=300)
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert "stop requested; saving checkpoint-" in text, text[-3000:]
    stopped_at = int(text.split("stop requested; saving checkpoint-")[1].split()[0])
    newest, skipped = runs.newest_whole_checkpoint(out)
    assert newest is not None and newest.name == f"checkpoint-{stopped_at}" and not skipped
    assert stopped_at > 5  # the step in flight was finished and saved, not lost
    assert not step_processes(job) and not runs.live_run_processes(out), "a process of the step outlived it"
    for pid, _ in workers:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    assert '"stopped by SIGTERM"' in (out / "run_manifest.json").read_text()


def wandb_finished(folder: Path) -> bool:
    """An offline wandb run whose stream was finished and flushed (not cut off by os._exit)."""
    runs_found = list(folder.glob("wandb/offline-run-*"))
    return bool(runs_found) and all(
        "stream: all finished" in (run / "logs" / "debug-internal.log").read_text()
        and next(run.glob("run-*.wandb")).stat().st_size > 1024 for run in runs_found)


@pytest.mark.slow
def test_clock_checkpoints_trackers_and_a_resume_on_another_world_size(llama_run, tmp_path: Path) -> None:
    """The shared run (conftest.llama_run): clock checkpoints bounded to 2, wandb (offline) ends cleanly, the record
    names the driver and torch's CUDA build; then, in a copy, its older checkpoint resumes on 1 process instead
    of 2 (universal checkpoint)."""
    from sftkit import hardware

    out, result = llama_run.out, llama_run.result
    assert "checkpoints: every 0.1 min and every 100000 steps; the newest 2 kept" in result.stdout
    clock_saves = result.stdout.count("min since the last checkpoint; saving checkpoint-")
    assert clock_saves >= 3, f"only {clock_saves} clock checkpoints: the limit was never exercised"
    assert len(runs.checkpoints(out)) == 2, [p.name for p in runs.checkpoints(out)]
    assert wandb_finished(llama_run.root), "the wandb run was not finished (its exit handlers were skipped)"
    record = json.loads((out / "run_manifest.json").read_text())
    assert record["gpus"]["driver"] == "580.65.06" and record["gpus"]["count"] == 2
    assert record["versions"]["cuda"] == hardware.torch_cuda_build()
    assert record["save_every_minutes"] == 0.1

    # As if killed after the older checkpoint: resume it on 1 process instead of 2, the global batch kept.
    out = llama_run.copy_to(tmp_path / "lora")
    older, newest = sorted(runs.checkpoints(out), key=lambda p: int(p.name.split("-")[1]))
    (out / "adapter_model.safetensors").unlink()
    shutil.rmtree(newest)
    step = int(older.name.split("-")[1])
    first_log = (out / "trainer_log.jsonl").read_text().splitlines()
    uninterrupted = {entry["current_steps"]: entry["loss"] for entry in map(json.loads, first_log) if "loss" in entry}
    resumed = run_launcher(*llama_run.args, "--output-dir", str(out), "--gpus", "1", "--global-batch", "8",
                           "--save-every-minutes", "0", "--", *llama_run.extras, env=llama_run.env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{older} was saved by 2 processes and this launch has 1" in resumed.stdout
    assert "converting" in resumed.stdout and (older / "latest_universal").is_file()
    new_lines = (out / "trainer_log.jsonl").read_text().splitlines()[len(first_log):]
    after = [entry for entry in map(json.loads, new_lines) if "loss" in entry]
    assert after and after[0]["current_steps"] == step + 1, new_lines[:3]  # it continued from the checkpoint's step
    # the adapter, optimizer and schedule came back: with the global batch kept, each step sees the same 8 rows
    # (accelerate deals the same batches to 1 x 2 micro-batches as to 2 ranks), so the losses are the uninterrupted
    # run's (measured equal to 4 digits; a lost adapter would restart near step 1's loss, ~12)
    assert uninterrupted[1] > 2
    for entry in after:
        expected = uninterrupted[entry["current_steps"]]
        assert abs(entry["loss"] - expected) <= 0.02 * expected + 1e-3, (entry, expected)
    assert json.loads((out / "run_manifest.json").read_text())["world_size"] == 1
