"""What several modules share: the kit's folder, tokenizer files, the usage error, an atomic write, a file sha256."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent.parent
KIT_DATA_DIR = KIT_DIR / "data"
PLACEHOLDER = "xxxx/"
# a model folder's tokenizer: every file that can change the tokens (the cache key hashes them all); one of
# the first three must be there for a tokenizer to load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
TOKENIZER_CORE = TOKENIZER_FILES[:3]


class UsageError(Exception):
    """A user's mistake or a missing resource: one line that names the fix, never a traceback."""


def check_placeholder(value: str, what: str) -> None:
    if PLACEHOLDER in value:
        raise UsageError(f"{what} {value!r} still holds the placeholder '{PLACEHOLDER}' of the original "
                         "instructions: replace it with the real path")


def atomic_write(path: str | Path, text: str) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # noqa: ARG001 - size and mtime key the cache
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, computed once per file version in a process."""
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds a tokenizer that can load (one of `TOKENIZER_CORE`)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_CORE)
