"""Shared fixtures: the kit's folder, tiny local models, and a way to run the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

KIT_DIR = Path(__file__).resolve().parent.parent


def _reference_data() -> Path:
    """../shared/reference-data (real data written by others) beside this checkout, or beside the repository
    it was cloned from (a clean clone in /tmp still finds the workplace's copy), or $SFTKIT_REFERENCE_DATA."""
    if os.environ.get("SFTKIT_REFERENCE_DATA"):
        return Path(os.environ["SFTKIT_REFERENCE_DATA"])
    roots = [KIT_DIR]
    origin = subprocess.run(["git", "-C", str(KIT_DIR), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if origin and Path(origin).is_dir():
        roots.append(Path(origin).resolve())
    candidates = [root.parent / "shared" / "reference-data" / "llamafactory-demo-data" for root in roots]
    return next((path for path in candidates if path.is_dir()), candidates[0])


REFERENCE_DATA = _reference_data()

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


@cache
def _lf_tokenizer(model_dir: str):
    """LLaMA-Factory's tokenizer loader, once per model (a genuine tokenizer takes seconds to load)."""
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer

    return load_tokenizer(ModelArguments(model_name_or_path=model_dir))["tokenizer"]


def lf_training_encoding(model_dir, template: str, thinking: bool | None, conversation, system,
                         cutoff_len: int = 4096):
    """(input_ids, labels, tokenizer) of one conversation exactly as LLaMA-Factory's SFT preprocessing
    builds them: its tokenizer loader, `get_template_and_fix_tokenizer` and the supervised processor."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    tokenizer = _lf_tokenizer(str(model_dir))
    data_args = DataArguments(template=template, cutoff_len=cutoff_len,
                              **({} if thinking is None else {"enable_thinking": thinking}))
    lf_template = get_template_and_fix_tokenizer(tokenizer, data_args)
    processor = SupervisedDatasetProcessor(template=lf_template, tokenizer=tokenizer, processor=None,
                                           data_args=data_args)
    input_ids, labels = processor._encode_data_example(
        prompt=conversation[:-1], response=conversation[-1:], system=system, tools=None, images=[], videos=[],
        audios=[],
    )
    return input_ids, labels, tokenizer


def _build(family: str, path: Path) -> Path:
    from demo.tiny_model import build_tiny_model

    return build_tiny_model(family, path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen3 with the genuine Qwen3 tokenizer and its official chat template."""
    return _build("qwen3", tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    """A tiny random-weight Llama 3 with the genuine Llama 3 BPE, Llama-3.2-3B-Instruct's special tokens and
    Llama 3.2's chat template."""
    return _build("llama3", tmp_path_factory.mktemp("models") / "tiny-llama3")
