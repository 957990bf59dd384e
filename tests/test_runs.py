"""Which processes on an output dir belong to whom: this launch, another node of the same run, a
leftover of a killed launch, or another run. Real processes carrying the markers a launch sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sftkit import runs


@pytest.fixture()
def spawn():
    started: list[subprocess.Popen] = []

    def _spawn(out: Path, launch: str, rendezvous: str) -> subprocess.Popen:
        env = {runs.RUN_ENV: str(out.resolve()), runs.LAUNCH_ENV: launch, runs.RENDEZVOUS_ENV: rendezvous}
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        proc.kill()
        proc.wait()


def test_launch_id_is_alive_only_for_the_process_that_made_it() -> None:
    mine = runs.launch_id()
    assert runs.launch_alive(mine)
    pid, _, started = mine.partition(".")
    assert not runs.launch_alive(f"{pid}.{int(started) + 1}")  # the same pid reused by a later process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not runs.launch_alive(runs.launch_id(int(dead.stdout)))
    assert not runs.launch_alive("")


def test_other_nodes_of_this_run_are_not_leftovers_but_a_killed_launch_is(tmp_path: Path, spawn) -> None:
    out = tmp_path / "lora"
    out.mkdir()
    here = "127.0.0.1:29500/2"
    alive = runs.launch_id()  # stands for node rank 1's supervisor, still running
    peer = spawn(out, alive, here)
    assert runs.busy_reason(out, here) is None  # node rank 1 started first and waits for us
    assert [p.pid for p in runs.launch_processes(out, alive)] == [peer.pid]

    other = spawn(out, alive, "127.0.0.1:29999/2")  # a live launch of another run on the same folder
    reason = runs.busy_reason(out, here)
    assert reason is not None and "another run is using" in reason and str(other.pid) in reason
    other.kill()
    other.wait()

    leftover = spawn(out, "1.12345", here)  # its launch (supervisor) is gone: a killed launch's worker
    reason = runs.busy_reason(out, here)
    assert reason is not None and "an earlier launch still write" in reason and str(leftover.pid) in reason
    assert str(peer.pid) not in reason
    assert runs.launch_processes(out, "1.12345")[0].pid == leftover.pid  # still found, to be swept


def test_checkpoint_world_size_is_the_number_of_optimizer_shards(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-10"
    (checkpoint / "global_step10").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step10")
    for rank in range(4):
        (checkpoint / "global_step10" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert runs.checkpoint_world_size(checkpoint) == 4
    assert runs.checkpoint_world_size(tmp_path / "nothing") is None
