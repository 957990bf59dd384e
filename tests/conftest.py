"""Shared fixtures: the kit's folder, tiny local models, and a way to run the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KIT_DIR = Path(__file__).resolve().parent.parent
DEMO_DATA = KIT_DIR / "data" / "demo.json"
REFERENCE_DATA = KIT_DIR.parent / "shared" / "reference-data" / "llamafactory-demo-data"

if str(KIT_DIR) not in sys.path:
    sys.path.insert(0, str(KIT_DIR))


def kit_env(**extra: str) -> dict[str, str]:
    """The environment for the kit's commands: this interpreter's bin first, the kit importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(KIT_DIR)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # the preset dry runs need 24-40 GiB free for their checkpoints and merged model; this shared disk
    # may have less (tests/test_launcher.py checks the refusal itself with the check on)
    env.setdefault("SFTKIT_DISK_CHECK", "warn")
    env.update(extra)
    return env


def run_launcher(*args: str, cwd: Path = KIT_DIR, env: dict[str, str] | None = None,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    """`bash sft_train.sh ARGS`, output captured as text."""
    return subprocess.run(
        ["bash", str(KIT_DIR / "sft_train.sh"), *args],
        cwd=cwd, env=env or kit_env(), capture_output=True, text=True, timeout=timeout, check=False,
    )


def run_sftkit(*args: str, cwd: Path = KIT_DIR, env: dict[str, str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m sftkit ARGS`, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "sftkit", *args],
        cwd=cwd, env=env or kit_env(), capture_output=True, text=True, timeout=timeout, check=False,
    )


def _build(family: str, path: Path) -> Path:
    from sftkit.demo_model import build_tiny_model, texts_from_alpaca

    return build_tiny_model(family, path, texts_from_alpaca(DEMO_DATA))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen3 with a locally trained tokenizer and Qwen3's chat template."""
    return _build("qwen3", tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    """A tiny random-weight Llama 3 with a locally trained tokenizer and Llama 3.2's chat template."""
    return _build("llama3", tmp_path_factory.mktemp("models") / "tiny-llama3")
