"""Which processes on an output dir belong to whom: this launch, another node of the same run, a
leftover of a killed launch, or another run. Real processes carrying the markers a launch sets."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KIT_DIR, kit_env

from sftkit.launch import runs


@pytest.fixture()
def spawn():
    started: list[subprocess.Popen] = []

    def _spawn(out: Path, launch: str, rendezvous: str) -> subprocess.Popen:
        env = {runs.RUN_ENV: str(out.resolve()), runs.LAUNCH_ENV: launch, runs.RENDEZVOUS_ENV: rendezvous}
        proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                                env=env, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "ready\n"  # exec'd: /proc/PID/environ is its own, not the forking parent's
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


# ---------------------------------------------------------------- the lock where flock does not work

NO_FLOCK = ("import errno, fcntl\n"
            "def flock(fd, operation):\n"
            "    raise OSError(errno.ENOLCK, 'No locks available')\n"
            "fcntl.flock = flock\n")


@pytest.fixture()
def no_flock(monkeypatch):
    """flock as on NFS without lockd: every call fails with ENOLCK (not BlockingIOError)."""
    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", flock)


def test_without_flock_a_lock_file_holds_the_output_dir(tmp_path: Path, no_flock) -> None:
    out = tmp_path / "lora"
    first = runs.RunLock(out)
    assert runs.RunLock(out).holder() is None and runs.busy_reason(out) is None
    assert first.acquire("bash sft_train.sh ... for lora")
    assert first.describe() == (f"lock file {out / 'sftkit' / 'run.lockfile'} (flock is not supported on this "
                                "filesystem: No locks available (ENOLCK))")
    owner = json.loads((out / "sftkit" / "run.lockfile").read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert f"{owner['pid']}.{owner['start']}" == runs.launch_id()

    second = runs.RunLock(out)
    assert not second.acquire("another launch")  # refused while the first holds it
    assert second.holder() == f"pid {os.getpid()}: bash sft_train.sh ... for lora"
    reason = runs.busy_reason(out)
    assert reason is not None and "held by a live run" in reason and f"pid {os.getpid()}" in reason

    first.release()
    assert not (out / "sftkit" / "run.lockfile").exists() and runs.RunLock(out).holder() is None
    assert second.acquire("another launch") and second.stale == ""  # a released lock is not stale
    second.release()


def test_without_flock_a_dead_runs_lock_file_is_taken_over_and_another_hosts_is_not(tmp_path: Path,
                                                                                   no_flock) -> None:
    out = tmp_path / "lora"
    (out / "sftkit").mkdir(parents=True)
    lock_file = out / "sftkit" / "run.lockfile"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "start": "1",
                                     "description": "a killed launch"}))
    assert runs.RunLock(out).holder() is None  # its pid is gone: stale
    lock = runs.RunLock(out)
    assert lock.acquire("this launch")
    assert lock.stale == f"pid {int(dead.stdout)}: a killed launch"
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()

    # this very process, but another start time: the pid was reused, the lock is stale
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1",
                                     "description": "a launch long gone"}))
    assert lock.acquire("this launch") and lock.stale == f"pid {os.getpid()}: a launch long gone"
    lock.release()

    lock_file.write_text(json.dumps({"host": "node7", "pid": 4242, "start": "99", "description": "bash sft_train.sh"}))
    other = runs.RunLock(out)
    assert not other.acquire("this launch")
    reason = runs.busy_reason(out)
    assert reason is not None and "node7" in reason and "pid 4242" in reason
    assert "cannot be checked" in reason and f"remove {lock_file}" not in reason and str(lock_file) in reason
    assert "if that run is dead, remove the file" in reason
    assert lock_file.is_file()  # never removed from here


def test_where_flock_works_a_lock_file_from_a_host_without_it_still_holds(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    (out / "sftkit").mkdir(parents=True)
    (out / "sftkit" / "run.lockfile").write_text(json.dumps({"host": "node7", "pid": 4242, "start": "99",
                                                               "description": "bash sft_train.sh"}))
    lock = runs.RunLock(out)
    assert not lock.acquire("this launch") and "node7" in (runs.busy_reason(out) or "")
    (out / "sftkit" / "run.lockfile").unlink()
    assert lock.acquire("this launch") and lock.describe() == f"flock on {out / 'sftkit' / 'run.lock'}"
    assert not runs.RunLock(out).acquire("a second launch")
    lock.release()


def test_a_launch_without_flock_runs_and_says_which_lock_it_holds(tmp_path: Path) -> None:
    """The supervisor (what sft_train.sh execs) where flock fails as on NFS: it runs under the lock file."""
    patch = tmp_path / "site"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(NO_FLOCK)
    out = tmp_path / "lora"
    plan = {"output_dir": str(out), "node_rank": 0, "nnodes": 1, "rendezvous": "127.0.0.1:29500/1",
            "master_addr": "127.0.0.1", "master_port": 29500, "rendezvous_timeout": 60, "overwrite": False,
            "skipped_checkpoints": [], "merge_config": "### merge\n", "universal_from": None,
            "dataset_registration": None, "report": [], "manifest": {}}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    lock_file = out / "sftkit" / "run.lockfile"
    child = f"import json, pathlib; print('held by', json.loads(pathlib.Path({str(lock_file)!r}).read_text())['pid'])"
    env = kit_env(PYTHONPATH=f"{patch}{os.pathsep}{KIT_DIR}")
    result = subprocess.run([sys.executable, "-m", "sftkit", "supervise", "--plan", str(plan_file), "--",
                             sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert (f"sftkit: run lock: lock file {lock_file} (flock is not supported on this filesystem: "
            "No locks available (ENOLCK))") in result.stdout
    assert "held by" in result.stdout  # the run saw the lock file in place
    assert not lock_file.exists()  # released when the run ended


# ---------------------------------------------------------------- the tokenized dataset on a shared filesystem


def small_dataset():
    from datasets import Dataset, DatasetDict

    return DatasetDict({"train": Dataset.from_dict({"input_ids": [[1, 2, 3]] * 50, "labels": [[1, 2, 3]] * 50})})


def test_two_writers_with_the_same_host_and_pid_do_not_share_a_partial_folder(tmp_path: Path) -> None:
    """Two nodes' containers may share a hostname and a pid: neither may remove the other's save in progress
    (measured: two concurrent saves with one host.pid tag left one node with a FileNotFoundError in 3 of 8)."""
    from sftkit.data import tokenized

    other = tmp_path / f"tokenized-k.partial-{tokenized._owner_tag()}"  # another node's save, with our tag
    (other / "train").mkdir(parents=True)
    (other / "train" / "data-00000-of-00001.arrow").write_bytes(b"being written")
    def build() -> Path:  # what LLaMA-Factory's get_dataset saves at the partial tokenized_path
        built = tokenized.partial(tmp_path, "k")
        small_dataset().save_to_disk(str(built))
        return built

    dest = tokenized.save(build(), tmp_path, "k", {"split_rows": {"train": 50}})
    assert (other / "train" / "data-00000-of-00001.arrow").read_bytes() == b"being written"
    assert tokenized.load_cached(tmp_path, "k") == ({"split_rows": {"train": 50}}, None) and dest.is_dir()
    assert tokenized.save(build(), tmp_path, "k", {"split_rows": {"train": 50}}) == dest  # a second: kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, other.name])


def test_one_builder_at_a_time_the_others_wait_for_the_folder(tmp_path: Path, monkeypatch) -> None:
    import threading

    from sftkit.data import build_lock

    monkeypatch.setattr(build_lock, "POLL_S", 0.05)
    dest = tmp_path / "sftkit" / "tokenized-k"
    builder, waiter = build_lock.BuildLock(dest), build_lock.BuildLock(dest)
    assert builder.wait_for_turn(print) is True and builder.path.is_file()
    said: list[str] = []
    answer: list[bool] = []
    thread = threading.Thread(target=lambda: answer.append(waiter.wait_for_turn(said.append)))
    thread.start()
    deadline = time.monotonic() + 30  # the waiter says so once it has looked (a loaded machine may take a while)
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.is_alive() and not answer  # waits while the folder is being built
    assert said and said[0].startswith(f"waiting for pid {os.getpid()} on {socket.gethostname()} to build {dest}")
    dest.mkdir()  # the build renamed into place
    builder.release()
    thread.join(5)
    assert answer == [False] and not builder.path.exists()  # loads it, builds nothing

    # a build that failed releases the lock without the folder: the next one builds
    dest.rmdir()
    assert builder.wait_for_turn(print) is True
    answer.clear()
    thread = threading.Thread(target=lambda: answer.append(waiter.wait_for_turn(said.append)))
    thread.start()
    builder.release()
    thread.join(5)
    assert answer == [True] and waiter.held
    waiter.release()


def test_a_stale_build_lock_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    from sftkit.data import build_lock

    monkeypatch.setattr(build_lock, "POLL_S", 0.05)
    dest = tmp_path / "tokenized-k"
    lock = build_lock.BuildLock(dest)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "launch": runs.launch_id(int(dead.stdout)),
                                     "beat": 3}))
    said: list[str] = []
    assert lock.wait_for_turn(said.append) is True
    assert said == [f"taking over the build of tokenized-k from a stale lock (pid {int(dead.stdout)} on "
                    f"{socket.gethostname()}: its process is gone)"]
    lock.release()

    # another node's lock that stops changing: that node died
    monkeypatch.setattr(build_lock, "STALE_S", 0.3)
    lock.path.write_text(json.dumps({"host": "node7", "launch": "4242.99", "beat": 3}))
    said.clear()
    assert lock.wait_for_turn(said.append) is True
    assert said[0].startswith("waiting for pid 4242 on node7") and "no heartbeat for 0 s" in said[-1]
    lock.release()
    assert not lock.path.exists()


def test_a_second_check_on_the_same_folder_waits_and_loads_the_first_ones(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Two nodes of a run check their data into one shared folder: one builds, the other waits and loads it."""
    from sftkit.data import build_lock, tokenized
    from sftkit.data.check_data import check_dataset

    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Hi {i}", "input": "", "output": "Hello"}) + "\n"
                            for i in range(20)), encoding="utf-8")
    built = check_dataset(data, str(tiny_qwen3), cutoff_len=64, cache_dir=tmp_path / "elsewhere")
    key = built["cache_key"]
    cache = tmp_path / "out" / "sftkit"
    other_node = build_lock.BuildLock(tokenized.folder(cache, key))
    assert other_node.wait_for_turn(print)  # another node is building it now
    second = subprocess.Popen([sys.executable, "-m", "sftkit", "check-data", str(data), "--model", str(tiny_qwen3),
                               "--cutoff-len", "64", "--cache-dir", str(cache), "--json"],
                              env=kit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []  # library warnings may come first
        while not (seen and seen[-1].startswith("sftkit: waiting for pid")):
            seen.append(second.stderr.readline())
            assert seen[-1], "".join(seen)  # the check ended without waiting
        assert second.poll() is None and not tokenized.folder(cache, key).exists()
        os.rename(built["tokenized_path"], tokenized.folder(cache, key))  # the other node's build, renamed whole
        other_node.release()
        out, err = second.communicate(timeout=300)
    finally:
        second.kill()
    assert second.returncode == 0, err
    report = json.loads(out)
    assert report["cached"] is True and report["tokenized_path"] == str(tokenized.folder(cache, key))
    assert not [p.name for p in cache.iterdir() if ".partial-" in p.name or p.name.startswith(".tokenize-")]
