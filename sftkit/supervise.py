"""The launcher's last step: hold the output dir, record the run, run torchrun, stop it cleanly.

    python -m sftkit supervise --plan PLAN.json -- torchrun ...    (sft_train.sh execs this)

1. Node 0 takes the output dir's lock (refusing if a live run holds it, taking over a stale one),
   sets aside checkpoints cut short while being written, clears the folder on --overwrite, and
   writes merge_model.yaml and run_manifest.json (status "running"). Every node writes the
   dataset registration (same content; atomic).
2. torchrun runs in a session of its own with SFTKIT_RUN_DIR in its environment, so every
   process of the run can be found, even one whose torchrun was killed.
3. SIGTERM/SIGINT/SIGHUP: the workers get SIGTERM (sftkit.worker finishes the step, saves a
   checkpoint, exits 143); after SFTKIT_STOP_GRACE seconds (default 600) whatever is left of the
   run is killed. When torchrun ends, for any reason, no process of the run is left behind.
4. The manifest is completed: end time, exit status, and how it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sftkit import manifest, runs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clear_for_overwrite(out: Path) -> None:
    """Remove an earlier run's outputs; the kit's own folder (lock, registration) stays."""
    for entry in out.iterdir():
        if entry.name == runs.KIT_SUBDIR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def set_aside(checkpoint: Path) -> Path:
    target = checkpoint.with_name(f"incomplete-{checkpoint.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"incomplete-{checkpoint.name}.{suffix}")
    checkpoint.rename(target)
    return target


def signal_run(out: Path, signum: int, exclude: set[int]) -> list[int]:
    pids = [pid for pid, _ in runs.live_run_processes(out, exclude=exclude)]
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return pids


def kill_leftovers(out: Path, exclude: set[int], wait_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process still carrying this run's marker."""
    if not signal_run(out, signal.SIGTERM, exclude):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and runs.live_run_processes(out, exclude=exclude):
        time.sleep(0.2)
    signal_run(out, signal.SIGKILL, exclude)


class Supervisor:
    def __init__(self, plan: dict, command: list[str]):
        self.plan = plan
        self.command = command
        self.out = Path(plan["output_dir"])
        self.primary = plan["node_rank"] == 0
        self.lock = runs.RunLock(self.out)
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.stop_deadline: float | None = None
        self.grace = float(os.environ.get("SFTKIT_STOP_GRACE", "600"))
        self.record: dict = {}
        self.started = time.time()

    def log(self, message: str, echo: bool = True) -> None:
        line = manifest.redact_text(message)
        if echo:
            print(line, flush=True)
        if self.primary:
            log_file = self.out / runs.KIT_SUBDIR / "launch.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"{manifest.now()} {line}\n")

    def prepare(self) -> str | None:
        """Set up the output dir; the reason it cannot be used, or None."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.primary:
            stale = self.lock.path.read_text(encoding="utf-8").strip() if self.lock.path.is_file() else ""
            if not self.lock.acquire(" ".join(self.command[:1] + ["..."]) + f" for {self.out}"):
                return runs.busy_reason(self.out) or f"output dir {str(self.out)!r} is held by a live run"
            orphans = runs.busy_reason(self.out) if runs.live_run_processes(self.out) else None
            if orphans:
                return orphans
            if stale:
                self.log(f"sftkit: cleared a stale lock of a run that is no longer alive ({stale})")
            if self.plan["overwrite"]:
                clear_for_overwrite(self.out)
            for checkpoint in self.plan["skipped_checkpoints"]:
                if Path(checkpoint).is_dir():
                    self.log(f"sftkit: set aside incomplete {checkpoint} as {set_aside(Path(checkpoint)).name}")
            atomic_write(self.out / "merge_model.yaml", self.plan["merge_config"])
        if self.plan["dataset_registration"]:
            atomic_write(Path(self.plan["dataset_dir"]) / "dataset_info.json",
                         json.dumps(self.plan["dataset_registration"], indent=2) + "\n")
        if self.primary:
            for line in self.plan["report"]:
                self.log(line, echo=False)  # sft_train.sh printed it already
            self.record = dict(self.plan["manifest"])
            self.record.update({
                "status": "running",
                "command": manifest.redact_args(self.command),
                "kit_commit": manifest.kit_commit(),
                "versions": manifest.versions(),
                "gpus": manifest.gpus(),
                "hostname": os.uname().nodename,
                "start_time": manifest.now(),
                "end_time": None,
                "exit_status": None,
            })
            manifest.write(self.out / runs.MANIFEST_NAME, self.record)
        return None

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_deadline = time.monotonic() + self.grace
            self.log(f"sftkit: {signal.Signals(signum).name} received: workers finish their step, save a checkpoint "
                     f"and stop (up to {self.grace:.0f} s)")
        exclude = {os.getpid()} | ({self.child.pid} if self.child else set())
        signal_run(self.out, signal.SIGTERM, exclude)  # the workers, not torchrun: it would kill them in 30 s

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.started = time.time()
        env = dict(os.environ, **{runs.RUN_ENV: str(self.out.resolve())})
        self.child = subprocess.Popen(self.command, env=env, start_new_session=True)
        while True:
            try:
                code = self.child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                    self.log("sftkit: the grace period is over: killing what is left of the run")
                    signal_run(self.out, signal.SIGKILL, {os.getpid()})
        kill_leftovers(self.out, exclude={os.getpid()})
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if code != 0 and self.completed():
            self.log(f"sftkit: torchrun exited {code} after the run had saved everything (a worker failed while "
                     "shutting down); the adapter and results are complete")
            return 0
        return code if code >= 0 else 128 - code

    def completed(self) -> bool:
        """The run wrote its final adapter and results during this launch (LLaMA-Factory's last saves)."""
        results, adapter = self.out / "train_results.json", self.out / "adapter_model.safetensors"
        return (self.primary and results.is_file() and adapter.is_file() and adapter.stat().st_size > 0
                and results.stat().st_mtime >= self.started)

    def finish(self, code: int) -> None:
        if not self.primary:
            return
        if self.record:
            status = "finished" if code == 0 else (
                f"stopped by {signal.Signals(self.stop_signal).name}" if self.stop_signal else "failed")
            self.record.update({"status": status, "end_time": manifest.now(), "exit_status": code})
            manifest.write(self.out / runs.MANIFEST_NAME, self.record)
            self.log(f"sftkit: run {status} (exit status {code}); record in {self.out / runs.MANIFEST_NAME}")
        self.lock.release()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m sftkit supervise --plan PLAN.json -- torchrun ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m sftkit supervise")
    parser.add_argument("--plan", type=Path, required=True)
    args = parser.parse_args(argv[:cut])
    plan = json.loads(args.plan.read_text(encoding="utf-8"))
    args.plan.unlink(missing_ok=True)
    supervisor = Supervisor(plan, argv[cut + 1:])
    problem = supervisor.prepare()
    if problem:
        print(f"sft_train.sh: error: {manifest.redact_text(problem)}", file=sys.stderr)
        supervisor.lock.release()
        return 1
    code = 1
    try:
        code = supervisor.run()
    finally:
        supervisor.finish(code)
    return code
