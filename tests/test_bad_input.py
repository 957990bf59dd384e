"""The bad-input corpus: every case ends in one clear message and a non-zero exit, never a
traceback, and leaves the disk as it was (a listing and hashes of the user's folder before and after).

Cases cover data files, flags, model folders, the kit's config files, output dirs, the
environment, and paths with spaces, quotes, `$(...)` and newlines (which must never run).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import KIT_DIR, kit_env
from procs import copy_kit

ERROR_LINE = re.compile(r"^[\w.\- ]+: error: ")
GOOD_ROW = '{"instruction": "Hi", "input": "", "output": "Hello"}\n'


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # the command's arguments, given the user's folder
    expect: str  # a fragment of the one error line
    setup: Callable[[Path], None] = lambda root: None
    env: dict[str, str] = field(default_factory=dict)
    command: str = "launcher"  # or "sftkit"
    kit_edit: Callable[[Path], None] | None = None  # change the kit's own files (a copy of the kit)


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def model_copy(root: Path, name: str, drop: tuple[str, ...] = (), config: dict | None = None) -> None:
    folder = root / name
    shutil.copytree(root / "tiny-qwen3", folder)
    for item in drop:
        (folder / item).unlink()
    if config is not None:
        base = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(base | config))


def demo(root: Path, *extra: str) -> list[str]:
    """A CPU run of the demo preset on the tiny model: everything but the thing under test is valid."""
    return ["--model", "demo", "--model-path", str(root / "tiny-qwen3"), "--dataset", str(root / "good.jsonl"),
            "--output-dir", str(root / "out"), *extra]


def fake_whole_checkpoint(folder: Path) -> None:
    for name in ("trainer_state.json",):
        write(folder / name, "{}")
    for name in ("adapter_config.json", "adapter_model.safetensors", "scheduler.pt"):
        write(folder / name, "x")
    write(folder / "latest", "global_step5")
    for rank in (0, 1):
        write(folder / "global_step5" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "x")
        write(folder / f"rng_state_{rank}.pth", "x")


def hold_lock(root: Path) -> None:
    """A live run holding the output dir: a process with the lock open (killed by the fixture)."""
    lock = root / "out" / "sftkit" / "run.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'pid %d: bash sft_train.sh (a live run)\\n' % os.getpid())\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    HOLDERS.append(proc)


HOLDERS: list[subprocess.Popen] = []

CASES = [
    # ---- data files
    Case("empty data file", lambda r: demo(r, "--dataset", str(r / "empty.jsonl")), "empty",
         lambda r: write(r / "empty.jsonl", "")),
    Case("invalid JSON line", lambda r: demo(r, "--dataset", str(r / "broken.jsonl")), "broken.jsonl:1: invalid JSON",
         lambda r: write(r / "broken.jsonl", '{"instruction": "Hi", "output": \n' + GOOD_ROW)),
    Case("JSON file that is neither an array nor JSON lines", lambda r: demo(r, "--dataset", str(r / "text.json")),
         "a JSON array of objects", lambda r: write(r / "text.json", '"Hi, Hello"')),
    Case("row that is not an object", lambda r: demo(r, "--dataset", str(r / "list.jsonl")), "must be a JSON object",
         lambda r: write(r / "list.jsonl", "[1, 2, 3]\n")),
    Case("unknown data format", lambda r: demo(r, "--dataset", str(r / "odd.jsonl")), "known format",
         lambda r: write(r / "odd.jsonl", '{"question": "Hi", "answer": "Hello"}\n')),
    Case("invalid UTF-8", lambda r: demo(r, "--dataset", str(r / "latin1.jsonl")), "UTF-8",
         lambda r: write(r / "latin1.jsonl", b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')),
    Case("dataset is a folder", lambda r: demo(r, "--dataset", str(r / "datadir")), "not a .json or .jsonl",
         lambda r: (r / "datadir").mkdir()),
    Case("dataset is a CSV file", lambda r: demo(r, "--dataset", str(r / "data.csv")), "not a .json or .jsonl",
         lambda r: write(r / "data.csv", "instruction,output\nHi,Hello\n")),
    Case("missing dataset file", lambda r: demo(r, "--dataset", str(r / "nope.jsonl")), "not found"),
    Case("unknown dataset name", lambda r: demo(r, "--dataset", "alpaca_gpt4_en"), "not found"),
    # ---- paths that must stay data, never code
    Case("dataset path with $(...)", lambda r: demo(r, "--dataset", f"$(touch {r}/pwned).jsonl"), "not found"),
    Case("dataset path with backticks and quotes", lambda r: demo(r, "--dataset", f"`touch {r}/pwned`'\".jsonl"),
         "not found"),
    Case("dataset path with a newline", lambda r: demo(r, "--dataset", str(r / "two\nlines.jsonl")), "empty",
         lambda r: write(r / "two\nlines.jsonl", "")),
    Case("dataset path with spaces", lambda r: demo(r, "--dataset", str(r / "my data" / "x y.jsonl")), "empty",
         lambda r: write(r / "my data" / "x y.jsonl", "")),
    Case("model path with $(...)", lambda r: demo(r, "--model-path", f"$(touch {r}/pwned)"), "does not exist"),
    Case("output dir with ; rm -rf", lambda r: demo(r, "--output-dir", str(r / "out; rm -rf ~")), "is a file",
         lambda r: write(r / "out; rm -rf ~", "not a folder")),
    # ---- flags
    Case("unknown option", lambda r: demo(r, "--lora-rank", "8"), "unknown option"),
    Case("option without its value", lambda r: [*demo(r), "--dataset"], "needs a value"),
    Case("no --model", lambda r: ["--dataset", str(r / "good.jsonl")], "--model is required"),
    Case("misspelt preset", lambda r: ["--model", "qwen3-8", "--dataset", str(r / "good.jsonl")],
         "neither a preset"),
    Case("--gpus 0", lambda r: demo(r, "--gpus", "0"), "positive whole number"),
    Case("--gpus not a number", lambda r: demo(r, "--gpus", "four"), "positive whole number"),
    Case("--global-batch not a multiple", lambda r: demo(r, "--global-batch", "12"), "not a multiple"),
    Case("--model-path with a model folder", lambda r: ["--model", str(r / "tiny-qwen3"), "--model-path",
                                                        str(r / "tiny-qwen3"), "--dataset", str(r / "good.jsonl")],
         "goes with a preset"),
    Case("placeholder left in --model-path", lambda r: ["--model", "qwen3-8b", "--model-path", "xxxx/Qwen3-8B",
                                                        "--dataset", str(r / "good.jsonl"), "--dry-run"], "xxxx/"),
    Case("more GPUs than visible", lambda r: ["--model", "qwen3-8b", "--dataset", str(r / "good.jsonl"), "--gpus",
                                             "8", "--output-dir", str(r / "out")], "sees 2 GPU(s)",
         env={"SFTKIT_VISIBLE_GPUS": "2"}),
    # ---- model folders
    Case("model folder missing", lambda r: demo(r, "--model-path", str(r / "Qwen3-8B")), "does not exist"),
    Case("model folder without config.json", lambda r: demo(r, "--model-path", str(r / "m")), "config.json",
         lambda r: model_copy(r, "m", drop=("config.json",))),
    Case("config.json not JSON", lambda r: demo(r, "--model-path", str(r / "m")), "not valid JSON",
         lambda r: (model_copy(r, "m"), write(r / "m" / "config.json", "{model_type: qwen3"))),
    Case("model folder without weights", lambda r: ["--model", "qwen3-8b", "--model-path", str(r / "m"),
                                                    "--dataset", str(r / "good.jsonl"), "--dry-run"], "weights",
         lambda r: model_copy(r, "m", drop=("model.safetensors",))),
    Case("index names a missing shard", lambda r: demo(r, "--model-path", str(r / "m")), "model-00002-of-00002",
         lambda r: (model_copy(r, "m"), write(r / "m" / "model.safetensors.index.json", json.dumps(
             {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})))),
    Case("model folder without tokenizer", lambda r: demo(r, "--model-path", str(r / "m")), "tokenizer",
         lambda r: model_copy(r, "m", drop=("tokenizer.json", "vocab.json", "merges.txt"))),
    Case("preset on another model type", lambda r: ["--model", "qwen3-8b", "--model-path", str(r / "m"),
                                                    "--dataset", str(r / "good.jsonl"), "--dry-run"],
         "expects 'qwen3'", lambda r: model_copy(r, "m", config={"model_type": "llama"})),
    Case("unknown model type without --template", lambda r: ["--model", str(r / "m"), "--dataset",
                                                             str(r / "good.jsonl"), "--dry-run"], "--template",
         lambda r: model_copy(r, "m", config={"model_type": "falcon"})),
    # ---- the kit's own config files, edited into nonsense
    Case("ds_z3_config.json not JSON", lambda r: demo(r), "ds_z3_config.json",
         kit_edit=lambda kit: write(kit / "ds_z3_config.json", '{"zero_optimization": {"stage": 3,}')),
    Case("ds_z3_config.json at stage 2", lambda r: demo(r), "stage 3",
         kit_edit=lambda kit: write(kit / "ds_z3_config.json", '{"zero_optimization": {"stage": 2}}')),
    Case("ds_z3_config.json missing", lambda r: demo(r), "missing",
         kit_edit=lambda kit: (kit / "ds_z3_config.json").unlink()),
    Case("merge config not YAML", lambda r: ["merge", "--adapter", str(r / "adapter"), "--config",
                                             str(r / "merge.yaml")], "merge.yaml",
         lambda r: (write(r / "adapter" / "adapter_config.json", "{}"), write(r / "merge.yaml", "model: [unclosed")),
         command="sftkit"),
    Case("merge config that is a list", lambda r: ["merge", "--adapter", str(r / "adapter"), "--config",
                                                   str(r / "merge.yaml")], "merge.yaml",
         lambda r: (write(r / "adapter" / "adapter_config.json", "{}"), write(r / "merge.yaml", "- a\n- b\n")),
         command="sftkit"),
    Case("merge --set value that is not YAML", lambda r: ["merge", "--adapter", str(r / "adapter"), "--set",
                                                         "template=[qwen3"], "--set 'template=[qwen3'",
         lambda r: write(r / "adapter" / "adapter_config.json", "{}"), command="sftkit"),
    # ---- output dirs
    Case("output dir is a file", lambda r: demo(r, "--output-dir", str(r / "taken")), "is a file",
         lambda r: write(r / "taken", "x")),
    Case("output dir holds an adapter", lambda r: demo(r), "--overwrite",
         lambda r: write(r / "out" / "adapter_model.safetensors", "trained")),
    Case("output dir held by a live run", lambda r: demo(r), "held by a live run", hold_lock),
    Case("placeholder in --output-dir", lambda r: demo(r, "--output-dir", "xxxx/Qwen3-8B-lora"), "xxxx/"),
    Case("resume with another global batch", lambda r: demo(r, "--gpus", "1"), "--global-batch 8 keeps it",
         lambda r: (fake_whole_checkpoint(r / "out" / "checkpoint-5"),
                    write(r / "out" / "run_manifest.json", json.dumps({"resume_keys": {"global_batch": 8}})))),
    Case("enable_thinking on a template without the switch", lambda r: demo(r, "--template", "llama3", "--",
                                                                           "--enable_thinking", "False"),
         "has no thinking switch"),
    Case("output dir after --", lambda r: demo(r, "--", "--output_dir", str(r / "elsewhere")), "--output-dir"),
    # ---- the environment
    Case("NNODES without MASTER_ADDR", lambda r: demo(r), "MASTER_ADDR", env={"NNODES": "2", "NODE_RANK": "0"}),
    Case("NODE_RANK out of range", lambda r: demo(r), "NODE_RANK", env={"NNODES": "2", "NODE_RANK": "2",
                                                                       "MASTER_ADDR": "127.0.0.1"}),
    Case("NNODES not a number", lambda r: demo(r), "NNODES", env={"NNODES": "two"}),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its content (folders marked as such)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def kit_copy(tmp_path_factory) -> Path:
    """A copy of the kit whose own files a case may break, leaving the real ones alone."""
    copy = tmp_path_factory.mktemp("kit") / "kit"
    copy_kit(copy)
    return copy


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_clear_message(case: Case, tiny_qwen3: Path, tmp_path: Path, kit_copy: Path) -> None:
    root = tmp_path / "user"
    root.mkdir()
    shutil.copytree(tiny_qwen3, root / "tiny-qwen3")
    write(root / "good.jsonl", GOOD_ROW * 8)
    write(root / "out" / "notes.txt", "an earlier run's notes\n")
    case.setup(root)
    kit = KIT_DIR
    if case.kit_edit is not None:
        kit = tmp_path / "kit"
        shutil.copytree(kit_copy, kit)
        case.kit_edit(kit)
    before = snapshot(root)
    env = kit_env(**case.env)
    env["PYTHONPATH"] = str(kit)
    try:
        if case.command == "launcher":
            command = ["bash", str(kit / "sft_train.sh"), *case.args(root)]
        else:
            command = [sys.executable, "-m", "sftkit", *case.args(root)]
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        for holder in HOLDERS:
            holder.kill()
            holder.wait()
        HOLDERS.clear()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, result.stderr
    assert case.expect in errors[0], errors[0]
    assert snapshot(root) == before, "the failed command changed files on disk"
    assert not (root / "pwned").exists(), "a path was executed as a command"

