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

pytestmark = pytest.mark.slow

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


def planned_lf_args(preset: str, model_dir: Path, data: Path, cwd: Path) -> dict:
    """The train.yaml a dry run prints, which the torchrun command it prints runs."""
    result = run_launcher("--model", preset, "--model-path", str(model_dir), "--dataset", str(data), "--gpus", "4",
                          "--dry-run", cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    words = shlex.split(result.stdout.split("command:\n", 1)[1].splitlines()[0])
    assert words[0] == "torchrun" and words[-3:-1] == ["-m", "sftkit.launch.worker"]
    assert words[-1].endswith("/train.yaml")
    text = result.stdout.split("train.yaml:\n", 1)[1].split("command:\n", 1)[0]
    return yaml.safe_load("\n".join(line.removeprefix("  ") for line in text.splitlines()))


@pytest.fixture(scope="module")
def parsed(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lf-parser")
    data = root / "my.jsonl"
    data.write_text('{"instruction": "Hi", "input": "", "output": "Hello!"}\n', encoding="utf-8")
    planned = {}
    for name, preset in PRESETS.items():
        model_type = preset.architecture.model_type if preset.architecture else None
        model_dir = request.getfixturevalue(MODEL_FIXTURE[model_type])
        args = planned_lf_args(name, model_dir, data, root)
        assert args["bf16"] is (not preset.cpu)
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


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_planned_command_parses_in_llamafactory(parsed, preset: str) -> None:
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
