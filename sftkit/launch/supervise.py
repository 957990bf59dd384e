"""The launcher's last step: hold the output dir, record the run, run torchrun, stop it cleanly.

    python -m sftkit supervise --plan PLAN.json -- torchrun ...
    (sft_train.sh's `python -m sftkit plan` goes on as this, in its own process: `supervise()`)

1. Node 0 takes the output dir's lock (refusing if a live run holds it, taking over a stale one),
   refuses leftovers of a killed launch that still run (the other nodes of this run, waiting at the
   same MASTER_ADDR:MASTER_PORT, are not leftovers), sets aside checkpoints cut short while being
   written, clears the folder on --overwrite, and writes merge_model.yaml and run_manifest.json
   (status "running"). Every node writes the run's LLaMA-Factory YAML, `sftkit/train.yaml`, that its
   workers run, and the dataset registration (same content on every node; atomic).
2. torchrun runs in a session of its own, with SIGTERM/SIGINT/SIGHUP ignored and handling only
   SIGQUIT (`--signals_to_handle SIGQUIT`): torchrun would forward a stop signal to the workers and
   kill them 30 s later, before a large model's checkpoint is written. Every process of the launch
   carries SFTKIT_RUN_DIR, SFTKIT_LAUNCH (this supervisor) and SFTKIT_RENDEZVOUS in its
   environment, so this launch's processes are found (even workers whose torchrun was killed) and
   nothing of another node's launch on the same folder is touched.
3. While torchrun waits for the other nodes (no worker yet), a line says so every 30 s; after
   SFTKIT_RENDEZVOUS_TIMEOUT seconds (default 600) the launch gives up with one line naming
   MASTER_ADDR and MASTER_PORT.
4. SIGTERM/SIGINT/SIGHUP (also when Slurm signals every process of the step): before the workers
   exist, torchrun is ended at once (nothing can need saving); after, the workers get SIGTERM
   (sftkit.launch.worker finishes the step, saves a checkpoint, exits 143; before its first step it just
   exits). After SFTKIT_STOP_GRACE seconds (default 600) whatever is left of the launch is killed.
   When torchrun ends, for any reason, no process of this launch is left behind.
5. The manifest is completed: end time, exit status, and how it ended. "finished" means torchrun exited 0
   and every result file of the run (the adapter, train_results.json, and eval_results.json with a
   validation split) is there and not empty; anything else is "failed", and the exit status
   is non-zero.
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

from sftkit.files import atomic_write
from sftkit.launch import calibration, manifest, runs
from sftkit.launch.run_record import RENDEZVOUS_TIMEOUT_ENV, TRAIN_YAML

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAIT_LINE_FIRST_S, WAIT_LINE_EVERY_S = 15.0, 30.0


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


# torchrun starts with the stop signals ignored (the supervisor forwards them): a shell ignores them and execs it
# (an ignored signal stays ignored across exec; the same pid). Not a preexec_fn: Python code between fork and exec
# is not safe in a process with threads, and the data check's libraries leave some in this one.
IGNORING_STOPS = ["/bin/sh", "-c", f'trap "" {" ".join(s.name.removeprefix("SIG") for s in STOP_SIGNALS)}; exec "$@"',
                  "sh"]


def _kill(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def universal_config(source: Path, dest: Path) -> None:
    """The run's DeepSpeed config with `checkpoint.load_universal` on, for a resume on another world size."""
    config = json.loads(source.read_text(encoding="utf-8"))
    config.setdefault("checkpoint", {})["load_universal"] = True
    atomic_write(dest, json.dumps(config, indent=2) + "\n")


def convert_to_universal(checkpoint: Path) -> str | None:
    """Convert a ZeRO-3 checkpoint with DeepSpeed's own ds_to_universal, once; the problem, or None.

    Written beside the original as `<tag>_universal` plus `latest_universal`, through a hidden
    folder renamed when whole, so an interrupted conversion is redone, never loaded."""
    if (checkpoint / "latest_universal").is_file():
        tag = (checkpoint / "latest_universal").read_text(encoding="utf-8").strip()
        if (checkpoint / tag / "zero").is_dir():
            return None
    tag = (checkpoint / "latest").read_text(encoding="utf-8").strip()
    final, partial = checkpoint / f"{tag}_universal", checkpoint / f".{tag}_universal.partial-{os.getpid()}"
    shutil.rmtree(final, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(checkpoint / tag), "--output_folder", str(partial)],
                            capture_output=True, text=True, check=False)
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # the converter names the hidden folder
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return (f"cannot convert {checkpoint} for another world size with DeepSpeed's ds_to_universal ({last}): "
                "resume with the world size that saved it, or start over with --overwrite")
    partial.rename(final)
    atomic_write(checkpoint / "latest_universal", final.name)
    return None


class Supervisor:
    def __init__(self, plan: dict, command: list[str]):
        self.plan = plan
        self.command = command
        self.out = Path(plan["output_dir"])
        self.primary = plan["node_rank"] == 0
        self.lock = runs.RunLock(self.out)
        self.launch = runs.launch_id()
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.stop_deadline: float | None = None
        self.signalled: set[int] = set()  # workers already asked to stop
        self.workers_seen = False
        self.rendezvous_failed = False
        self.grace = float(os.environ.get("SFTKIT_STOP_GRACE", "600"))
        self.record: dict = {}
        self.started = time.time()

    # ------------------------------------------------------------ setup

    def log(self, message: str, echo: bool = True) -> None:
        line = manifest.redact_text(message)
        if echo:
            print(line, flush=True)
        if self.primary:
            log_file = self.out / runs.KIT_SUBDIR / "launch.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"{manifest.now()} {line}\n")

    def say_error(self, message: str) -> None:
        """One `sft_train.sh: error:` line on stderr, and in the launch log."""
        self.log(f"sft_train.sh: error: {message}", echo=False)
        print(manifest.redact_text(f"sft_train.sh: error: {message}"), file=sys.stderr, flush=True)

    def prepare(self) -> str | None:
        """Set up the output dir; the reason it cannot be used, or None."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.primary:
            if not self.lock.acquire(" ".join(self.command[:1] + ["..."]) + f" for {self.out}"):
                return runs.busy_reason(self.out) or f"output dir {str(self.out)!r} is held by a live run"
            self.log(f"sftkit: run lock: {self.lock.describe()}")
            stale = self.lock.stale
            leftovers = runs.busy_reason(self.out, self.plan["rendezvous"], locked_by_me=True)
            if leftovers:
                return leftovers
            if stale:
                self.log(f"sftkit: cleared a stale lock of a run that is no longer alive ({stale})")
            if self.plan["overwrite"]:
                clear_for_overwrite(self.out)
            for checkpoint in self.plan["skipped_checkpoints"]:
                if Path(checkpoint).is_dir():
                    self.log(f"sftkit: set aside incomplete {checkpoint} as {set_aside(Path(checkpoint)).name}")
            atomic_write(self.out / "merge_model.yaml", self.plan["merge_config"])
            if self.plan.get("universal_from"):
                self.log(f"sftkit: converting {self.plan['universal_from']} to DeepSpeed's universal checkpoint "
                         "(another world size saved it)")
                problem = convert_to_universal(Path(self.plan["universal_from"]))
                if problem:
                    return problem
        if self.plan.get("universal_from"):
            universal_config(Path(self.plan["deepspeed_config"]), self.out / runs.KIT_SUBDIR / runs.UNIVERSAL_DS_CONFIG)
        if self.plan.get("train_yaml"):
            atomic_write(self.out / runs.KIT_SUBDIR / TRAIN_YAML, self.plan["train_yaml"])
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

    # ------------------------------------------------------------ the launch's processes

    def workers(self) -> list[int]:
        """This launch's processes other than torchrun: the workers (and whatever they started)."""
        exclude = {os.getpid()} | ({self.child.pid} if self.child else set())
        return [process.pid for process in runs.launch_processes(self.out, self.launch, exclude=exclude)]

    def everything(self) -> list[int]:
        return [process.pid for process in runs.launch_processes(self.out, self.launch, exclude={os.getpid()})]

    def end_torchrun(self) -> None:
        """SIGKILL torchrun's session: only while no worker exists, so nothing can be lost."""
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_leftovers(self, wait_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, every process of this launch that is still alive."""
        pids = self.everything()
        if not pids:
            return
        _kill(pids, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.everything():
            time.sleep(0.2)
        _kill(self.everything(), signal.SIGKILL)

    # ------------------------------------------------------------ stopping and waiting

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_deadline = time.monotonic() + self.grace
            what = (f"workers finish their step, save a checkpoint and stop (up to {self.grace:.0f} s)"
                    if self.workers_seen else "no worker has started yet, so nothing to save: stopping now")
            self.log(f"sftkit: {signal.Signals(signum).name} received: {what}")
        self.forward_stop()

    def forward_stop(self) -> None:
        """Ask each worker once to stop; with none yet, end torchrun (it is still starting or waiting)."""
        workers = self.workers()
        if workers:
            self.workers_seen = True
            fresh = [pid for pid in workers if pid not in self.signalled]
            self.signalled.update(fresh)
            _kill(fresh, signal.SIGTERM)
        elif not self.workers_seen:
            self.end_torchrun()

    def watch_rendezvous(self, waited: float, next_line: float) -> float:
        """Say what a waiting node waits for; give up after the timeout. Returns when to speak next."""
        nnodes = self.plan["nnodes"]
        where = f"{self.plan['master_addr']}:{self.plan['master_port']}"
        timeout = self.plan["rendezvous_timeout"]
        if waited >= timeout:
            self.rendezvous_failed = True
            self.say_error(f"node rank {self.plan['node_rank']} waited {timeout:.0f} s for all "
                     f"{nnodes} nodes at MASTER_ADDR:MASTER_PORT {where} and gave up: check that node rank 0 runs "
                     f"and that {where} is reachable from every node (the port open), and that every node was "
                     f"started with the same NNODES={nnodes} and MASTER_PORT={self.plan['master_port']} "
                     f"({RENDEZVOUS_TIMEOUT_ENV} sets the wait)")
            self.end_torchrun()
            return float("inf")
        if waited >= next_line:
            self.log(f"sftkit: waiting for {nnodes} nodes at {where} (this is node rank {self.plan['node_rank']}; "
                     f"{waited:.0f} s so far, giving up after {timeout:.0f} s)")
            return next_line + WAIT_LINE_EVERY_S
        return next_line

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.started = time.time()
        env = dict(os.environ, **{runs.RUN_ENV: str(self.out.resolve()), runs.LAUNCH_ENV: self.launch,
                                  runs.RENDEZVOUS_ENV: self.plan["rendezvous"]},
                   **{key: str(value) for key, value in self.plan.get("worker_env", {}).items()})
        started = time.monotonic()
        next_line = WAIT_LINE_FIRST_S
        self.child = subprocess.Popen([*IGNORING_STOPS, *self.command], env=env, start_new_session=True)
        while True:
            try:
                code = self.child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if not self.workers_seen and self.workers():
                self.workers_seen = True
            if self.stop_signal is not None:
                self.forward_stop()  # also workers that started after the signal
                if time.monotonic() > self.stop_deadline:
                    self.log("sftkit: the grace period is over: killing what is left of the run")
                    _kill(self.everything(), signal.SIGKILL)
            elif not self.workers_seen and self.plan["nnodes"] > 1:
                next_line = self.watch_rendezvous(time.monotonic() - started, next_line)
        self.kill_leftovers()
        if self.rendezvous_failed:
            return 1
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        code = code if code >= 0 else 128 - code
        if code != 0 and (self.out / "train_results.json").is_file():
            self.say_error(f"torchrun exited {code} after train_results.json was written: what LLaMA-Factory runs "
                           "after it (the final evaluation, the loss plot, the model card) failed; the run is "
                           "recorded failed (see the workers' output above)")
        elif code == 0 and self.primary:
            missing = self.missing_results()
            if missing:
                self.say_error(f"torchrun exited 0 but the run did not write {', '.join(missing)} in {self.out}: "
                               "the run is recorded failed (see the workers' output above)")
                return 1
        return code

    def missing_results(self) -> list[str]:
        """The run's result files (the plan's `results`) missing or empty. A relaunch never finds an earlier
        run's: a folder with an adapter is refused unless --overwrite, which clears it first."""
        return [name for name in self.plan.get("results", [])
                if not (self.out / name).is_file() or (self.out / name).stat().st_size == 0]

    def finish(self, code: int) -> None:
        if not self.primary:
            return
        if self.record:
            status = "finished" if code == 0 else (
                f"stopped by {signal.Signals(self.stop_signal).name}" if self.stop_signal else "failed")
            self.record.update({"status": status, "end_time": manifest.now(), "exit_status": code})
            measured = calibration.measured_record(self.out, self.record.get("estimate"),
                                                   int(self.record.get("world_size") or 1), self.started)
            if measured is not None:  # the run's own figures beside its estimate: a calibration point
                self.record["measured"] = measured
                self.log(calibration.summary(self.record.get("estimate"), measured))
            manifest.write(self.out / runs.MANIFEST_NAME, self.record)
            self.log(f"sftkit: run {status} (exit status {code}); record in {self.out / runs.MANIFEST_NAME}")
        self.lock.release()


def supervise(plan: dict, command: list[str]) -> int:
    """Set the run up, run `command` (torchrun) to its end, complete the record; the exit status."""
    supervisor = Supervisor(plan, command)
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
    return supervise(plan, argv[cut + 1:])
