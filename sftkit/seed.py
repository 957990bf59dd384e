"""The seed's LLaMA-Factory defaults: `SEED_ARGS` as written near the top of sft_train.sh, the one place.

Every command that needs a seed value reads it here (the estimate's and check-data's defaults, the
presets' reason text, the memory suggestions, the benchmark), so an edit of SEED_ARGS in the script
applies to all of them. bash itself reads the array (`sft_train.sh --print-seed-args`), so what these
commands use is what the launcher passes to `python -m sftkit plan`: no second parser of the script.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from sftkit.files import KIT_DIR, UsageError

SCRIPT = KIT_DIR / "sft_train.sh"
TARGET_GPUS = 4  # processes per node on the target node (PRODUCT.md); the launcher takes the visible count


class SeedError(UsageError):
    """sft_train.sh's SEED_ARGS cannot be read: one line that names the fix."""


@functools.lru_cache(maxsize=4)
def _words(script: Path, size: int, mtime_ns: int) -> tuple[str, ...]:  # noqa: ARG001 - they key the cache
    try:
        done = subprocess.run(["bash", str(script), "--print-seed-args"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SeedError(f"{script}: bash could not run it ({err}): restore sft_train.sh from the kit") from None
    if done.returncode != 0:
        why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SeedError(f"{script}: --print-seed-args failed ({why}): restore SEED_ARGS=( ... ) from the kit")
    return tuple(word.decode() for word in done.stdout.split(b"\0")[:-1])


def seed_args(script: Path = SCRIPT) -> dict[str, str]:
    """SEED_ARGS as `{key: value}` (keys without the leading `--`), as bash reads the script."""
    try:
        stat = Path(script).stat()
    except OSError as err:
        raise SeedError(f"{script}: cannot be read ({err.strerror}): restore sft_train.sh from the kit") from None
    words = _words(Path(script), stat.st_size, stat.st_mtime_ns)
    if len(words) % 2 or not all(word.startswith("--") for word in words[0::2]):
        raise SeedError(f"{script}: SEED_ARGS is not a list of '--key value' pairs: fix the block")
    return {key.removeprefix("--"): value for key, value in zip(words[0::2], words[1::2], strict=True)}


def seed_number(key: str, kind: type = int, script: Path = SCRIPT) -> int | float:
    """One numeric seed value, e.g. `seed_number("cutoff_len")`."""
    values = seed_args(script)
    if key not in values:
        raise SeedError(f"{script}: SEED_ARGS has no --{key}: put it back (the kit's defaults rely on it)")
    try:
        return kind(values[key])
    except ValueError:
        raise SeedError(f"{script}: SEED_ARGS --{key} {values[key]!r} is not a number: fix it") from None
