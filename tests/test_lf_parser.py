"""Every preset's planned command parses in LLaMA-Factory's own argument parser.

For each preset, `bash sft_train.sh --model PRESET --model-path DIR --dataset F --gpus 4 --dry-run`
prints the run's train.yaml and the exact torchrun command (`-m sftkit.launch.worker <output_dir>/sftkit/train.yaml`,
which `run_exp` reads as `llamafactory-cli train` does); that mapping goes through
`llamafactory.hparams.get_train_args`, with the variables torchrun sets for a worker. An argument
LLaMA-Factory does not know, a value it cannot take, or a combination it refuses then fails here, not
on the GPU node. Every planned value must also arrive as planned.

What is adapted to this machine, and only that: `bf16: false` (no bf16 on CPU), one process
(`WORLD_SIZE=1`, so DeepSpeed's process group forms without the other three), and for `--model-path`
a tiny local folder with the preset's model type and genuine tokenizer (get_train_args and the data
check read its config and tokenizer; the presets' own weights are not on this machine).

The launcher runs with PYTHON pointed at a recorder, which keeps the exact `-m sftkit plan ...` words bash
would exec; the four plans then run in one interpreter, so LLaMA-Factory is imported once, not four times.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import kit_env, run_launcher

from sftkit.launch.plan import free_port
from sftkit.models import PRESETS

MODEL_FIXTURE = {"qwen3": "tiny_qwen3", "llama": "tiny_llama3", None: "tiny_qwen3"}  # None: the demo's Qwen3

# In a fresh interpreter, as a torchrun worker would be: parse each argument list, report every value.
PARSE = r"""
import json, sys
from llamafactory.hparams import get_train_args

results = {}
for preset, args in json.load(sys.stdin).items():
    try:
        parsed = get_train_args(args)
    except (Exception, SystemExit) as err:
        results[preset] = {"error": f"{type(err).__name__}: {err}"}
        continue
    values = {}
    for key in args:
        for group in parsed:
            if hasattr(group, key):
                value = getattr(group, key)
                values[key] = value if isinstance(value, (bool, int, float, str, type(None))) else (
                    ",".join(map(str, value)) if isinstance(value, list) else str(value))
                break
    results[preset] = {"values": values, "parallel_mode": str(parsed[2].parallel_mode),
                       "zero3": parsed[2].hf_deepspeed_config.is_zero3()}
print("RESULTS " + json.dumps(results))
"""


# `sft_train.sh` with PYTHON set to this: the exact `python -m sftkit plan ...` words bash would exec, recorded
RECORDER = '#!/bin/bash\nprintf "%s\\0" "$@" > "$SFTKIT_TEST_ARGV"\n'

# The recorded plans, run in one interpreter (LLaMA-Factory imported once, not once per preset)
PLANS = r"""
import contextlib, io, json, sys
from sftkit.__main__ import main

printed = {}
for preset, argv in json.load(sys.stdin).items():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    printed[preset] = {"code": code, "stdout": buffer.getvalue()}
print("PLANS " + json.dumps(printed))
"""


def planned_lf_args(stdout: str) -> dict:
    """The train.yaml a dry run prints, which the torchrun command it prints runs."""
    words = shlex.split(stdout.split("command:\n", 1)[1].splitlines()[0])
    assert words[0] == "torchrun" and words[-3:-1] == ["-m", "sftkit.launch.worker"]
    assert words[-1].endswith("/train.yaml")
    text = stdout.split("train.yaml:\n", 1)[1].split("command:\n", 1)[0]
    return yaml.safe_load("\n".join(line.removeprefix("  ") for line in text.splitlines()))


def dry_runs(root: Path, presets: dict[str, Path], data: Path) -> dict[str, str]:
    """Each preset's `bash sft_train.sh --model PRESET --model-path DIR --dataset F --gpus 4 --dry-run` output."""
    recorder = root / "record-argv"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    argvs = {}
    for name, model_dir in presets.items():
        record = root / f"{name}.argv"
        result = run_launcher("--model", name, "--model-path", str(model_dir), "--dataset", str(data), "--gpus", "4",
                              "--dry-run", cwd=root, env=kit_env(PYTHON=str(recorder), SFTKIT_TEST_ARGV=str(record)))
        assert result.returncode == 0, result.stderr
        words = record.read_bytes().split(b"\0")[:-1]
        assert [word.decode() for word in words[:3]] == ["-m", "sftkit", "plan"]
        argvs[name] = [word.decode() for word in words[2:]]
    result = subprocess.run([sys.executable, "-c", PLANS], input=json.dumps(argvs), cwd=root, env=kit_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PLANS ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    printed = json.loads(lines[-1].removeprefix("PLANS "))
    for name, run in printed.items():
        assert run["code"] == 0, f"{name}: {run['stdout'][-2000:]}\n{result.stderr[-3000:]}"
    return {name: run["stdout"] for name, run in printed.items()}


@pytest.fixture(scope="module")
def parsed(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lf-parser")
    data = root / "my.jsonl"
    data.write_text('{"instruction": "Hi", "input": "", "output": "Hello!"}\n', encoding="utf-8")
    models = {name: request.getfixturevalue(MODEL_FIXTURE[preset.architecture.model_type if preset.architecture
                                                         else None]) for name, preset in PRESETS.items()}
    planned = {}
    for name, stdout in dry_runs(root, models, data).items():
        args = planned_lf_args(stdout)
        assert args["bf16"] is (not PRESETS[name].cpu)
        args["bf16"] = False
        planned[name] = args
    env = kit_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-c", PARSE], input=json.dumps(planned), cwd=root, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    return {"planned": planned, "results": json.loads(lines[-1].removeprefix("RESULTS "))}


def same_value(planned, parsed) -> bool:
    planned = str(planned)
    if isinstance(parsed, bool):
        return planned.lower() == str(parsed).lower()
    if isinstance(parsed, int | float):
        return float(planned) == float(parsed)
    return planned == str(parsed)


def test_planned_commands_parse_in_llamafactory(parsed) -> None:
    """One test over every preset (under xdist, a module fixture shared by several tests would run in each worker)."""
    for preset in sorted(PRESETS):
        check_preset(parsed, preset)


def check_preset(parsed, preset: str) -> None:
    result = parsed["results"][preset]
    assert "error" not in result, f"LLaMA-Factory refuses {preset}'s planned arguments: {result.get('error')}"
    assert result["parallel_mode"] == "ParallelMode.DISTRIBUTED" and result["zero3"]
    planned = parsed["planned"][preset]
    unknown = sorted(set(planned) - set(result["values"]))
    assert not unknown, f"planned arguments with no LLaMA-Factory field: {unknown}"
    differ = {key: (value, result["values"][key]) for key, value in planned.items()
              if not same_value(value, result["values"][key])}
    assert not differ, f"arguments that arrive changed (planned, parsed): {differ}"
    assert result["values"]["template"] == PRESETS[preset].template
    if not PRESETS[preset].cpu:
        assert result["values"]["enable_liger_kernel"] is True
