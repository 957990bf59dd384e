"""The state of a run's output folder: who holds it, which checkpoint is whole, what it was run with.

- One run per output dir: node rank 0's launcher holds `sftkit/run.lock` (flock) for the life of the
  run and writes its pid there. Every process of a launch carries `SFTKIT_RUN_DIR=<abs output dir>`,
  `SFTKIT_LAUNCH=<supervisor pid>.<its start time>` and `SFTKIT_RENDEZVOUS=<addr>:<port>/<nnodes>`
  in its environment: a launch signals and sweeps only its own processes (`launch_processes`), even
  workers that outlived a killed torchrun; a process whose launch is dead is a leftover; one of a
  live launch at the same rendezvous is another node of the same run (`foreign_processes`).
- A checkpoint is whole only if everything the Trainer and DeepSpeed write is there for every rank;
  `trainer_state.json` is written last by rank 0, but other ranks' shards are not ordered with it,
  so each is checked (`checkpoint_problem`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

RUN_ENV = "SFTKIT_RUN_DIR"
LAUNCH_ENV = "SFTKIT_LAUNCH"
RENDEZVOUS_ENV = "SFTKIT_RENDEZVOUS"
KIT_SUBDIR = "sftkit"
LOCK_NAME = "run.lock"
MANIFEST_NAME = "run_manifest.json"
UNIVERSAL_DS_CONFIG = "ds_config_universal.json"  # in KIT_SUBDIR: ds_z3_config.json + checkpoint.load_universal
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- live processes and the lock


@dataclass(frozen=True)
class RunProcess:
    pid: int
    cmdline: str
    launch: str  # the launch (one sft_train.sh on one node) it belongs to: "<supervisor pid>.<start time>"
    rendezvous: str  # "<MASTER_ADDR>:<MASTER_PORT>/<NNODES>": the same for every node of one run


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:200]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, unique."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def launch_id(pid: int | None = None) -> str:
    """This process's launch id (the supervisor's pid and start time); workers inherit it as SFTKIT_LAUNCH."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid)}"


def launch_alive(launch: str) -> bool:
    """Whether the supervisor that started `launch` still runs (a reused pid has another start time)."""
    pid, _, started = launch.partition(".")
    return pid.isdigit() and started != "None" and _start_time(int(pid)) == started


def run_processes(output_dir: Path, exclude: set[int] | None = None) -> list[RunProcess]:
    """Live processes whose environment names this output dir (every process of every launch on it)."""
    wanted = f"{RUN_ENV}={output_dir.resolve()}".encode()
    exclude = (exclude or set()) | {os.getpid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted not in environ:
            continue
        values = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if b"=" in item)
        pid = int(entry.name)
        found.append(RunProcess(pid, _cmdline(pid), values.get(LAUNCH_ENV, ""), values.get(RENDEZVOUS_ENV, "")))
    return sorted(found, key=lambda process: process.pid)


def launch_processes(output_dir: Path, launch: str, exclude: set[int] | None = None) -> list[RunProcess]:
    """The processes of one launch: its torchrun and workers, and workers a killed torchrun left behind."""
    return [process for process in run_processes(output_dir, exclude) if process.launch == launch]


def live_run_processes(output_dir: Path, exclude: set[int] | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of any launch on this output dir."""
    return [(process.pid, process.cmdline) for process in run_processes(output_dir, exclude)]


def foreign_processes(output_dir: Path, rendezvous: str | None = None) -> list[RunProcess]:
    """Processes on this dir that are not the other nodes of the run at `rendezvous`.

    A process whose launch is dead is a leftover of a killed launch (it may still write); one of a
    live launch is another node of this run when it waits at the same MASTER_ADDR:MASTER_PORT for
    the same number of nodes, and another run otherwise.
    """
    return [process for process in run_processes(output_dir)
            if not (rendezvous and process.rendezvous == rendezvous and launch_alive(process.launch))]


class RunLock:
    """An exclusive flock on <output_dir>/sftkit/run.lock; released when every holder has exited."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / KIT_SUBDIR / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock now ('pid N: command'), or None if nobody does (a stale file is fine)."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.path.read_text(encoding="utf-8", errors="replace").strip() or "an unknown process"
        finally:
            os.close(fd)
        return None

    def acquire(self, description: str) -> bool:
        """Take the lock (False if a live run holds it); a stale lock from a dead run is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {description}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        """Let go, leaving the file empty: a lock file that still names a pid was left by a dead run."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def busy_reason(output_dir: Path, rendezvous: str | None = None, locked_by_me: bool = False) -> str | None:
    """Why a new run (node rank 0, at `rendezvous`) may not start in output_dir now, or None.

    The other nodes of the same run may already be waiting (they carry the same rendezvous); any
    other process on the dir is a live run, or a leftover of a killed launch that may still write.
    """
    holder = None if locked_by_me else RunLock(output_dir).holder()
    if holder:
        return f"output dir {str(output_dir)!r} is held by a live run ({holder}): wait for it, or stop it first"
    others = foreign_processes(output_dir, rendezvous)
    if others:
        first = others[0]
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        what = ("processes of an earlier launch still write to" if not launch_alive(first.launch)
                else "another run is using")
        return (f"{what} output dir {str(output_dir)!r}: pid {first.pid} ({first.cmdline}){more}; "
                f"stop them first (kill {' '.join(str(p.pid) for p in others)})")
    return None


# ---------------------------------------------------------------- checkpoints


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint unusable (cut short while being written), or None if it is whole."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was cut short)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON (the save was cut short)"
    for name in ("adapter_config.json", "adapter_model.safetensors", "scheduler.pt"):
        if not (checkpoint / name).is_file() or (checkpoint / name).stat().st_size == 0:
            return f"{name} missing or empty"
    latest = checkpoint / "latest"
    if not latest.is_file():
        return "no DeepSpeed 'latest' tag"
    shard_dir = checkpoint / latest.read_text(encoding="utf-8").strip()
    optim = sorted(shard_dir.glob("*_optim_states.pt"))
    rng = sorted(checkpoint.glob("rng_state_*.pth"))
    if not optim:
        return f"no optimizer shards in {shard_dir.name}"
    if any(p.stat().st_size == 0 for p in optim):
        return f"an empty optimizer shard in {shard_dir.name}"
    if len(rng) not in (0, len(optim)) and not (len(optim) == 1 and (checkpoint / "rng_state.pth").is_file()):
        return f"{len(rng)} rng states for {len(optim)} ranks"
    return None


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many data-parallel ranks saved this checkpoint: DeepSpeed writes one optimizer shard per rank."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        return None
    shards = list((checkpoint / latest.read_text(encoding="utf-8").strip()).glob("*_optim_states.pt"))
    return len(shards) or None


def newest_whole_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest whole checkpoint or None, [(skipped checkpoint, why)] newer than it)."""
    skipped = []
    for checkpoint in checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


# ---------------------------------------------------------------- resume compatibility

# What must not change between a run and its resume, with what a change would mean.
RESUME_KEYS = {
    "global_batch": "the steps already taken would mean a different number of examples",
    "dataset_sha256": "the examples behind the steps already taken would differ",
    "lora": "the adapter's shape and scaling would differ from the checkpoint's",
    "model_name_or_path": "the checkpoint belongs to another base model",
    "cutoff_len": "the examples would be cut differently",
}


def previous_manifest(output_dir: Path) -> dict | None:
    path = output_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def resume_differences(previous: dict, current: dict) -> list[str]:
    """Human lines naming each setting that differs between the earlier launch and this one."""
    lines = []
    for key, why in RESUME_KEYS.items():
        old, new = previous.get("resume_keys", {}).get(key), current.get(key)
        if old is not None and old != new:
            fix = f"; --global-batch {old} keeps it" if key == "global_batch" else ""
            lines.append(f"{key} was {old} and is now {new} ({why}{fix})")
    return lines
