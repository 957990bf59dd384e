"""Several nodes of one run, played by node ranks on localhost: start in any order, finish together,
say what a waiting node waits for, stop at once before the workers exist, give up in bounded time.

The real stack (torchrun's static rendezvous, 2 gloo processes, DeepSpeed ZeRO-3, LLaMA-Factory)
on the tiny Qwen3; each node rank is its own sft_train.sh in a session of its own, as on two hosts.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import kit_env
from procs import start, wait_for

from sftkit.launch import runs
from sftkit.launch.plan import free_port

pytestmark = pytest.mark.slow


def node_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    return kit_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


def node_args(model: Path, out: Path) -> list[str]:
    return ["--model", "demo", "--model-path", str(model), "--output-dir", str(out), "--gpus", "1",
            "--", "--num_train_epochs", "2"]


@pytest.mark.parametrize("first", [0, 1], ids=["rank0-first", "rank1-first"])
def test_two_nodes_on_localhost_finish_a_run_together(first: int, tiny_qwen3: Path, tmp_path: Path) -> None:
    out, port = tmp_path / "lora", free_port()
    procs = {}
    for rank in (first, 1 - first):
        procs[rank] = start(node_args(tiny_qwen3, out), tmp_path / f"node{rank}.log", env=node_env(rank, port))
        time.sleep(4)  # the other node comes a few seconds later, as on a real cluster
    codes = [procs[rank].wait(timeout=900) for rank in (0, 1)]
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + "\n----\n" + logs[1][-3000:]
    assert "--nnodes 2 --node_rank 1" in logs[1]
    assert (out / "adapter_model.safetensors").is_file()
    assert '"world_size": 2' in (out / "run_manifest.json").read_text()
    assert not runs.live_run_processes(out)


def test_a_node_whose_peers_never_come_says_so_stops_at_once_and_gives_up(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    log = tmp_path / "alone.log"
    proc = start(node_args(tiny_qwen3, out), log, env=node_env(1, free_port()))
    wait_for(lambda: "sftkit: waiting for 2 nodes at 127.0.0.1:" in log.read_text(), 60, "the waiting line")
    assert runs.live_run_processes(out), "torchrun should be waiting in its rendezvous"
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=30)
    took = time.monotonic() - sent
    assert code != 0 and took < 10, f"exit {code} after {took:.1f} s"
    assert "no worker has started yet" in log.read_text()
    assert not runs.live_run_processes(out), "a process of the run outlived the stop"

    log = tmp_path / "gives-up.log"
    proc = start(node_args(tiny_qwen3, out), log, env=node_env(1, free_port(), SFTKIT_RENDEZVOUS_TIMEOUT="3"))
    code = proc.wait(timeout=120)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("sft_train.sh: error:")]
    assert code != 0 and len(errors) == 1, text[-3000:]
    assert "waited 3 s for all 2 nodes at MASTER_ADDR:MASTER_PORT 127.0.0.1:" in errors[0]
    assert "the same NNODES=2 and MASTER_PORT=" in errors[0] and "SFTKIT_RENDEZVOUS_TIMEOUT" in errors[0]
    assert "Traceback" not in text
    assert not runs.live_run_processes(out)
