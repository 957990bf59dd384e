"""The seed's LLaMA-Factory defaults: `SEED_ARGS` as written near the top of sft_train.sh, the one place.

Every command that needs a seed value reads it here (the estimate's and check-data's defaults, the
presets' reason text, the memory suggestions, the benchmark), so an edit of SEED_ARGS in the script
applies to all of them. The launcher itself passes the array to `python -m sftkit plan`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent.parent
SCRIPT = KIT_DIR / "sft_train.sh"
TARGET_GPUS = 4  # processes per node on the target node (PRODUCT.md); the launcher takes the visible count


class SeedError(ValueError):
    """sft_train.sh's SEED_ARGS cannot be read: one line that names the fix."""


def seed_args(script: Path = SCRIPT) -> dict[str, str]:
    """SEED_ARGS as `{key: value}` (keys without the leading `--`), read from the script."""
    try:
        text = script.read_text(encoding="utf-8")
    except OSError as err:
        raise SeedError(f"{script}: cannot be read ({err.strerror}): restore sft_train.sh from the kit") from None
    match = re.search(r"^SEED_ARGS=\((.*?)^\)", text, re.S | re.M)
    if match is None:
        raise SeedError(f"{script}: no SEED_ARGS=( ... ) block found: restore it from the kit")
    words = shlex.split(match.group(1), comments=True)
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
