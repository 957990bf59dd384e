"""One node at a time builds a tokenized dataset that several nodes share; the others wait and load it.

Every node of a multi-node run checks its data before torchrun, into <output_dir>/sftkit/tokenized-<key>.
With the output dir on a shared filesystem that is one folder for all nodes (LLaMA-Factory's
`data_shared_file_system`, found out by the filesystem itself): the node that creates
`tokenized-<key>.building` (O_CREAT|O_EXCL, holding host, pid, start time and a heartbeat it rewrites
every HEARTBEAT_S seconds) builds; the others wait until the folder is there and load it, or until the
lock is gone without it (that build failed: the next node builds). A lock is stale, and taken over,
when it names this host and a pid that is gone or another process, or when its content has not changed
for STALE_S seconds (its node died). Where each node has its own folder, each takes its own lock.

The build is safe without the lock (LLaMA-Factory's `get_dataset` saves into a folder unique to its
writer, `tokenized.partial`, and `tokenized.save` renames it into place whole; a second one keeps the
first): a rare double build costs time, never the result.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sftkit.launch.runs import launch_alive, launch_id

HEARTBEAT_S = 10.0
STALE_S = 180.0  # well above NFS attribute caching (acregmax 60 s) and HEARTBEAT_S
POLL_S = 1.0
SAY_EVERY_S = 60.0


class BuildLock:
    def __init__(self, dest: Path):
        self.dest = Path(dest)
        self.path = self.dest.with_name(f"{self.dest.name}.building")
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self, beat: int) -> str:
        return json.dumps({"host": socket.gethostname(), "launch": launch_id(), "beat": beat}) + "\n"

    def _take(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self._content(0))
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sftkit-build-lock", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(HEARTBEAT_S):
            beat += 1
            try:
                self.path.write_text(self._content(beat), encoding="utf-8")
            except OSError:
                pass  # the next beat tries again; a waiter takes over only after STALE_S without one

    def wait_for_turn(self, say: Callable[[str], None]) -> bool:
        """Block until the folder is there (False: load it) or this process is to build it (True)."""
        seen, changed, said = None, time.monotonic(), None
        while True:
            if self.dest.exists():
                return False
            if self._take():
                return True
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue  # released (built, or failed) just now
            now = time.monotonic()
            if text != seen:
                seen, changed = text, now
            owner = _owner(text)
            dead = owner is not None and owner["host"] == socket.gethostname() and not launch_alive(owner["launch"])
            if dead or now - changed > STALE_S:
                why = "its process is gone" if dead else f"no heartbeat for {STALE_S:.0f} s"
                say(f"taking over the build of {self.dest.name} from a stale lock ({_who(owner)}: {why})")
                try:
                    if self.path.read_text(encoding="utf-8", errors="replace") == text:
                        self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if said is None or now - said >= SAY_EVERY_S:
                say(f"waiting for {_who(owner)} to build {self.dest} (another node of this run on a shared "
                    f"filesystem, or another check); it is used when whole, a stale lock is taken over")
                said = now
            time.sleep(POLL_S)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            owner = _owner(self.path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            owner = None
        if owner == {"host": socket.gethostname(), "launch": launch_id()}:  # not a waiter's that took it over
            self.path.unlink(missing_ok=True)
        self.held = False


def _owner(text: str) -> dict | None:
    try:
        owner = json.loads(text)
        return {"host": str(owner["host"]), "launch": str(owner["launch"])}
    except (ValueError, KeyError, TypeError):
        return None  # being written: alive until it stops changing


def _who(owner: dict | None) -> str:
    return f"pid {owner['launch'].partition('.')[0]} on {owner['host']}" if owner else "another process"
