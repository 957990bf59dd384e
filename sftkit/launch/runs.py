"""The state of a run's output folder: who holds it, which checkpoint is whole, what it was run with.

- One run per output dir: node rank 0's launcher holds `sftkit/run.lock` (flock) for the life of the
  run and writes its pid there; where the filesystem has no flock, `sftkit/run.lockfile` (see RunLock).
  Every process of a launch carries `SFTKIT_RUN_DIR=<abs output dir>`,
  `SFTKIT_LAUNCH=<supervisor pid>.<its start time>` and `SFTKIT_RENDEZVOUS=<addr>:<port>/<nnodes>`
  in its environment: a launch signals and sweeps only its own processes (`launch_processes`), even
  workers that outlived a killed torchrun; a process whose launch is dead is a leftover; one of a
  live launch at the same rendezvous is another node of the same run (`foreign_processes`).
- A checkpoint is whole only if everything the Trainer and DeepSpeed write is there for every rank;
  `trainer_state.json` is written last by rank 0, but other ranks' shards are not ordered with it,
  so each is checked (`checkpoint_problem`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

RUN_ENV = "SFTKIT_RUN_DIR"
LAUNCH_ENV = "SFTKIT_LAUNCH"
RENDEZVOUS_ENV = "SFTKIT_RENDEZVOUS"
KIT_SUBDIR = "sftkit"
LOCK_NAME = "run.lock"
LOCK_FILE_NAME = "run.lockfile"  # where flock does not work (some NFS and Lustre mounts)
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
    """The output dir's lock: an exclusive flock on <output_dir>/sftkit/run.lock, held for the life of the run.

    Where the filesystem has no flock (NFS without lockd, Lustre mounted without flock: flock raises
    ENOLCK, EOPNOTSUPP, EINVAL...), a lock file is used instead: <output_dir>/sftkit/run.lockfile,
    created with O_CREAT|O_EXCL and holding host, pid, the pid's start time and what runs. It is
    stale when its host is this one and that pid is gone or is another process (another start
    time); one from another host cannot be checked from here, and the message says which host and
    pid to look at and which file to remove if that run is dead. `describe()` says which is in use.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / KIT_SUBDIR / LOCK_NAME
        self.file_path = output_dir / KIT_SUBDIR / LOCK_FILE_NAME
        self.fd: int | None = None
        self.kind: str | None = None  # "flock" or "file" while held
        self.flock_problem: str | None = None  # why flock cannot be used here, once it failed
        self.stale = ""  # what a dead run left in the lock it took over ("" if none)

    def describe(self) -> str:
        """Which lock is in use: 'flock on PATH' or 'lock file PATH (flock is not supported ...: why)'."""
        if self.kind == "file":
            return f"lock file {self.file_path} (flock is not supported on this filesystem: {self.flock_problem})"
        return f"flock on {self.path}"

    def _flock(self, fd: int, operation: int) -> bool | None:
        """True: got it; False: another process holds it; None: flock does not work on this filesystem."""
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            name = errno.errorcode.get(err.errno or 0, "?")
            self.flock_problem = f"{os.strerror(err.errno) if err.errno else err} ({name})"
            return None
        return True

    def holder_state(self) -> tuple[str, bool] | None:
        """(who holds the lock, whether it is known to be alive), or None if nobody does."""
        if self.path.is_file():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                if self._flock(fd, fcntl.LOCK_SH) is False:
                    return self.path.read_text(encoding="utf-8", errors="replace").strip() or "an unknown process", True
            finally:
                os.close(fd)
        return self._file_holder()

    def _file_holder(self, text: str | None = None) -> tuple[str, bool] | None:
        """The lock file's holder (from `text`, else read), as holder_state; None when there is none or it is stale."""
        if text is None:
            try:
                text = self.file_path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                return None
        try:
            owner = json.loads(text)
            host, pid, started, what = owner["host"], int(owner["pid"]), owner["start"], owner["description"]
        except (ValueError, KeyError, TypeError):
            return (f"an unreadable lock file {self.file_path} (a launch taking it now, or one that died while "
                    "taking it: if no run is alive, remove that file)"), False
        if host != socket.gethostname():
            return (f"pid {pid} on host {host}: {what}; lock file {self.file_path}, which this node cannot check: "
                    f"if that run is dead, remove the file"), False
        alive = _start_time(pid) is not None and (started is None or _start_time(pid) == started)
        return (f"pid {pid}: {what}", True) if alive else None

    def holder(self) -> str | None:
        """Who holds the lock now ('pid N: command'), or None if nobody does (a stale file is fine)."""
        found = self.holder_state()
        return found[0] if found else None

    def acquire(self, description: str) -> bool:
        """Take the lock (False if a live run holds it); a stale lock from a dead run is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        got = self._flock(fd, fcntl.LOCK_EX)
        if got is None:
            os.close(fd)
            return self._acquire_file(description)
        if not got or self._file_holder() is not None:  # a host without flock holds it through the lock file
            os.close(fd)
            return False
        self.stale = os.read(fd, 4096).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {description}\n".encode())
        self.fd, self.kind = fd, "flock"
        return True

    def _acquire_file(self, description: str) -> bool:
        pid = os.getpid()
        content = json.dumps({"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                              "description": description}) + "\n"
        for _ in range(3):  # a stale file is removed, then creating it is tried again
            try:
                fd = os.open(self.file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    left = self.file_path.read_text(encoding="utf-8", errors="replace")
                except FileNotFoundError:
                    continue
                if self._file_holder(left) is not None:
                    return False
                owner = json.loads(left)  # readable: an unreadable one has a holder
                self.stale = f"pid {owner['pid']}: {owner['description']}"
                self.file_path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, content.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.kind = "file"
            return True
        return False

    def release(self) -> None:
        """Let go: the flock's file is left empty (one that still names a pid was left by a dead run); the
        lock file is removed."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
        elif self.kind == "file":
            self.file_path.unlink(missing_ok=True)
        self.kind = None


def busy_reason(output_dir: Path, rendezvous: str | None = None, locked_by_me: bool = False) -> str | None:
    """Why a new run (node rank 0, at `rendezvous`) may not start in output_dir now, or None.

    The other nodes of the same run may already be waiting (they carry the same rendezvous); any
    other process on the dir is a live run, or a leftover of a killed launch that may still write.
    """
    held = None if locked_by_me else RunLock(output_dir).holder_state()
    if held and held[1]:
        return f"output dir {str(output_dir)!r} is held by a live run ({held[0]}): wait for it, or stop it first"
    if held:
        return f"output dir {str(output_dir)!r} is held by a run that cannot be checked from here ({held[0]})"
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
    "template": "the examples would be formatted differently from the steps already taken",
    "enable_thinking": "the prompts would differ from the steps already taken",
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
