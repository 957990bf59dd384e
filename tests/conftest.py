"""Shared fixtures: the kit's folder, tiny local models, and a way to run the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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

# The preset dry runs need 16-40 GiB free for their checkpoints and merged model, and a CI disk may have less:
# the disk check only warns in the tests, in this process (the plans built in-process) and in every command
# they start (tests/test_launcher.py checks the refusal itself with the check on).
os.environ.setdefault("SFTKIT_DISK_CHECK", "warn")

if str(KIT_DIR) not in sys.path:
    sys.path.insert(0, str(KIT_DIR))


def kit_env(**extra: str) -> dict[str, str]:
    """The environment for the kit's commands: this interpreter's bin first, the kit importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(KIT_DIR)
    env.setdefault("HF_HUB_OFFLINE", "1")
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


SECRET = "hf_plantedSecretValue1234"  # planted in the shared run's arguments and environment: never written
API_KEY = "planted-api-key-5678"


@dataclass
class SharedRun:
    """One finished launch; a test that changes its output dir works on a copy (`copy_to`)."""
    out: Path
    result: subprocess.CompletedProcess
    env: dict[str, str]
    root: Path  # holds the offline wandb runs
    args: list[str]  # the launcher's options, without --output-dir and the arguments after --
    extras: list[str]  # the arguments after --

    def copy_to(self, folder: Path) -> Path:
        import shutil

        return Path(shutil.copytree(self.out, folder, symlinks=True))


@pytest.fixture(scope="session")
def llama_run(tiny_llama3: Path, tmp_path_factory) -> SharedRun:
    """One real 2-process ZeRO-3 run of the tiny Llama 3 that three slow tests read, one launch for all: a
    validation split, clock checkpoints (every 0.1 min, the newest 2 kept), wandb offline, two stand-in H100s on
    a 580 driver, and planted secrets (tests/test_e2e.py: the record, secrets, replay with plain LLaMA-Factory,
    merge; tests/test_faults.py: the clock, trackers and a resume on 1 process, in a copy; tests/test_launcher.py:
    the check's tokenized dataset trained, eval loss, and a cut-short cache rebuilt, in a copy)."""
    import fake_gpus

    root = tmp_path_factory.mktemp("llama-run")
    out = root / "tiny-llama3-lora"
    bin_dir = fake_gpus.install(root / "bin", [fake_gpus.gpu(i, driver="580.65.06") for i in range(2)])
    env = fake_gpus.path_with(bin_dir, kit_env(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
                                               HF_TOKEN=SECRET, WANDB_API_KEY=API_KEY))
    # 40 rows, 8 held out: 4 steps an epoch at the global batch of 8, 76 steps; eval loss every 25 and at the end
    args = ["--model", "demo", "--model-path", str(tiny_llama3), "--save-every-minutes", "0.1", "--val-size", "0.2"]
    extras = ["--num_train_epochs", "19", "--save_steps", "100000", "--save_total_limit", "2", "--logging_steps", "1",
              "--eval_steps", "25"]
    result = run_launcher(*args, "--output-dir", str(out), "--", *extras, "--report_to", "wandb",
                          "--hf_hub_token", SECRET, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SharedRun(out=out, result=result, env=env, root=root, args=args, extras=extras)
