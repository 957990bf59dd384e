"""The supervisor's verdict: a run is "finished" only when torchrun exited 0 and the run's result files
were written; otherwise the manifest says "failed" with the exit status, and the launcher exits non-zero.
torchrun is stood in for by a shell command that writes what LLaMA-Factory would and exits as told."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import run_sftkit

RESULTS = ["adapter_model.safetensors", "train_results.json", "eval_results.json"]


def supervise(tmp_path: Path, script: str) -> tuple[int, str, dict]:
    out = tmp_path / "run"
    plan = {
        "output_dir": str(out), "node_rank": 0, "nnodes": 1, "master_addr": "127.0.0.1", "master_port": 29999,
        "rendezvous": "127.0.0.1:29999/1", "rendezvous_timeout": 600, "universal_from": None,
        "deepspeed_config": "ds_z3_config.json", "worker_env": {}, "overwrite": False, "dataset_dir": "data",
        "dataset_registration": None, "skipped_checkpoints": [], "merge_config": "template: qwen3\n",
        "report": ["model:      test"], "results": RESULTS, "manifest": {"preset": None},
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    result = run_sftkit("supervise", "--plan", str(plan_file), "--", "bash", "-c", script, "torchrun", str(out))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr, json.loads((out / "run_manifest.json").read_text(encoding="utf-8"))


WRITE_ALL = 'for f in adapter_model.safetensors train_results.json eval_results.json; do echo x > "$1/$f"; done'


@pytest.mark.parametrize(("script", "code", "status", "says"), [
    (WRITE_ALL + "; exit 0", 0, "finished", None),
    # the final evaluation runs out of memory after train_results.json was saved
    ('echo x > "$1/adapter_model.safetensors"; echo x > "$1/train_results.json"; exit 3', 3, "failed",
     "torchrun exited 3 after train_results.json was written"),
    # every result written, then a worker dies on the way out: still not a success
    (WRITE_ALL + "; exit 1", 1, "failed", "torchrun exited 1 after train_results.json"),
    # torchrun exits 0 but the evaluation's results never came
    ('echo x > "$1/adapter_model.safetensors"; echo x > "$1/train_results.json"; exit 0', 1, "failed",
     "did not write eval_results.json"),
])
def test_success_means_exit_zero_and_every_result_written(tmp_path: Path, script: str, code: int, status: str,
                                                         says: str | None) -> None:
    got, stderr, manifest = supervise(tmp_path, script)
    assert (got, manifest["status"], manifest["exit_status"]) == (code, status, code), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sft_train.sh: error:")]
    if says is None:
        assert not errors, stderr
    else:
        assert len(errors) == 1 and says in errors[0], stderr


def test_torchrun_starts_with_the_stop_signals_ignored(tmp_path: Path) -> None:
    """The supervisor forwards SIGTERM/SIGINT/SIGHUP itself (Slurm signals every process of the step): the command
    it starts has them ignored from its first instruction on, and is what the supervisor waits on."""
    code, stderr, manifest = supervise(tmp_path, WRITE_ALL + '; grep SigIgn: /proc/$$/status > "$1/ignored"; exit 0')
    assert (code, manifest["status"]) == (0, "finished"), stderr
    ignored = int((tmp_path / "run" / "ignored").read_text().split()[1], 16)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert ignored & (1 << (signum - 1)), f"{signum.name} is not ignored: SigIgn {ignored:#x}"
