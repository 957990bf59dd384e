"""The real stack end to end on tiny models: sft_train.sh -> torchrun (2 CPU processes, gloo) ->
LLaMA-Factory -> DeepSpeed ZeRO-3 with ds_z3_config.json -> PEFT adapter -> LLaMA-Factory export.

No mocks: these are the code paths a 4-GPU run takes, at toy size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import API_KEY, SECRET, SharedRun, kit_env, run_launcher, run_sftkit
from safetensors.torch import load_file

from sftkit.launch.plan import free_port

pytestmark = pytest.mark.slow

PROMPTS = ["How do I run the demo?", "Where does Pim live?", "What does LoRA add?"]


def check_adapter(adapter: Path, rank: int) -> None:
    """Every LoRA tensor present, non-empty, with the configured rank, and B trained (not all zero)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == rank
    tensors = load_file(adapter / "adapter_model.safetensors")
    lora_a = {k: v for k, v in tensors.items() if "lora_A" in k}
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    targets = set(config["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lora_a) == len(lora_b) == len(targets) * 2  # 2 decoder layers in the tiny models
    for tensor in lora_a.values():
        assert tensor.numel() > 0 and tensor.shape[0] == rank
    for tensor in lora_b.values():
        assert tensor.numel() > 0 and tensor.shape[1] == rank
    assert any(tensor.abs().sum() > 0 for tensor in lora_b.values()), "lora_B all zero: the adapter did not train"


def max_logit_difference(base: Path, adapter: Path, merged: Path) -> float:
    """max |logits(merged) - logits(base + adapter through PEFT)| over a few chat prompts, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            diff = (merged_model(ids).logits - reference(ids).logits).abs().max().item()
        worst = max(worst, diff)
    return worst


def test_demo_trains_merges_and_answers(tmp_path: Path) -> None:
    """`make demo`'s journey (python -m sftkit demo) on the tiny Qwen3, into a scratch saves/."""
    saves = tmp_path / "saves"
    result = run_sftkit("demo", "--saves", str(saves), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"demo: merged model answered (\d+)/(\d+) demo prompts exactly \(base model: (\d+)/(\d+)\)",
                         last)
    assert match, last
    answered, total, base_answered, base_total = map(int, match.groups())
    assert total == base_total == 40
    assert answered >= 0.9 * total
    assert base_answered == 0

    base, adapter, merged = saves / "demo", saves / "demo-lora", saves / "demo-merged"
    check_adapter(adapter, rank=64)
    assert (adapter / "training_loss.png").is_file()
    assert list(adapter.glob("runs/*/events.out.tfevents.*")), "no TensorBoard logs"
    assert (adapter / "merge_model.yaml").is_file()
    assert not list(saves.glob(".demo-merged.partial-*"))
    assert max_logit_difference(base, adapter, merged) < 1e-4


def test_tiny_llama3_through_the_launcher(llama_run: SharedRun, tiny_llama3: Path) -> None:
    """A local Llama 3 folder (the shared run, conftest.llama_run): template llama3 picked from the folder,
    2-process ZeRO-3, the record without the planted secrets, the replay with plain LLaMA-Factory, merge, logits."""
    out, result = llama_run.out, llama_run.result
    assert "template llama3" in result.stdout

    # the run record: complete, and without any planted secret
    record = json.loads((out / "run_manifest.json").read_text())
    assert record["status"] == "finished" and record["exit_status"] == 0
    assert record["world_size"] == 2 and record["global_batch"] == 8
    assert record["dataset"]["rows"] == 40 and len(record["dataset"]["sha256"]) == 64
    assert record["versions"]["llamafactory"] == "0.9.5" and record["versions"]["deepspeed"] == "0.18.4"
    assert record["start_time"] and record["end_time"] and record["command"][0] == "torchrun"
    assert "--lora_rank" in record["resolved_args"]
    # a calibration point: the estimate at launch beside what it took
    assert "hours" in record["estimate"] and record["estimate"]["tokens_per_epoch"] > 0
    assert record["measured"]["train_seconds"] > 0 and record["measured"]["tokens_per_second_per_gpu"] > 0
    assert "sftkit: measured: trained " in result.stdout
    for path in [out / "run_manifest.json", *(p for p in (out / "sftkit").iterdir() if p.is_file())]:
        text = path.read_text(errors="replace")
        assert SECRET not in text and API_KEY not in text, path
    assert SECRET not in result.stdout.split("command:")[1].splitlines()[1]
    check_adapter(out, rank=64)
    merge_settings = (out / "merge_model.yaml").read_text()
    assert "template: llama3" in merge_settings
    replay_with_llamafactory(out, out.parent / "replay", record["command"])

    merged = out.parent / "tiny-llama3-merged"
    result = run_sftkit("merge", "--adapter", str(out), "--set", "infer_dtype=float32", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert merged.is_dir()
    assert max_logit_difference(tiny_llama3, out, merged) < 1e-4


def replay_with_llamafactory(out: Path, replay: Path, command: list[str]) -> None:
    """The run's train.yaml is what the workers ran, parses in LLaMA-Factory's get_train_args, and replays a
    tiny run with plain `llamafactory-cli train` (its own torchrun, 2 CPU processes as the kit's run)."""
    train_yaml = out / "sftkit" / "train.yaml"
    assert command[-4:] == ["-m", "sftkit.launch.worker", str(train_yaml), "hf_hub_token=<redacted>"]
    args = yaml.safe_load(train_yaml.read_text())
    assert args["output_dir"] == str(out) and args["template"] == "llama3" and args["lora_rank"] == 64
    assert "hf_hub_token" not in args  # a secret stays out of the file: an override after its path
    parse = ("import json, sys; from llamafactory.hparams import get_train_args; "
             "model, data, training, finetuning, _ = get_train_args(json.loads(sys.argv[1])); "
             "print('PARSED', training.output_dir, finetuning.lora_rank, training.parallel_mode)")
    env = kit_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    parsed = subprocess.run([sys.executable, "-c", parse, json.dumps(args)], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert f"PARSED {out} 64 ParallelMode.DISTRIBUTED" in parsed.stdout, parsed.stdout[-2000:] + parsed.stderr[-2000:]

    (replay.parent / "replay-wandb").mkdir()
    replay_yaml = replay.parent / "replay.yaml"
    replay_yaml.write_text(yaml.safe_dump(dict(args, output_dir=str(replay), max_steps=1)))
    env = kit_env(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), WANDB_MODE="offline",
                  WANDB_DIR=str(replay.parent / "replay-wandb"), WANDB_SILENT="true")  # the run reports to wandb
    done = subprocess.run(["llamafactory-cli", "train", str(replay_yaml)], cwd=replay.parent, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (replay / "adapter_model.safetensors").is_file() and (replay / "train_results.json").is_file()


def test_rerun_without_overwrite_is_refused_and_nothing_changes(tiny_qwen3: Path, tmp_path: Path) -> None:
    """A finished adapter is never overwritten by accident (cheap: no training needed)."""
    out = tmp_path / "demo-lora"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"trained")
    result = run_launcher("--model", "demo", "--model-path", str(tiny_qwen3), "--output-dir", str(out),
                          env=kit_env())
    assert result.returncode != 0
    assert "--overwrite" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == b"trained"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
