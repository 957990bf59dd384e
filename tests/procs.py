"""Running the launcher in the background, as a job on a node, and waiting for what it does."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import KIT_DIR, kit_env


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """sft_train.sh in the background, in a session of its own (like a job on a node)."""
    with log.open("w") as handle:
        return subprocess.Popen(["bash", str(KIT_DIR / "sft_train.sh"), *args], cwd=KIT_DIR, env=env or kit_env(),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
