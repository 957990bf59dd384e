"""sft_train.sh without training: the planned torchrun command, the presets, and the refusals."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import KIT_DIR, SharedRun, kit_env, run_launcher
from procs import copy_kit

SEED_FLAGS = {
    "--stage": "sft",
    "--finetuning_type": "lora",
    "--lora_target": "all",
    "--lora_rank": "64",
    "--lora_alpha": "128",
    "--lora_dropout": "0.05",
    "--cutoff_len": "20480",
    "--per_device_train_batch_size": "2",
    "--gradient_accumulation_steps": "8",
    "--learning_rate": "5e-5",
    "--num_train_epochs": "3.0",
    "--bf16": "True",
    "--logging_steps": "10",
    "--plot_loss": "True",
    "--report_to": "tensorboard",
}

PRESET_EXPECTATIONS = {
    "qwen3-8b": ("Qwen/Qwen3-8B", "qwen3", "False", "saves/Qwen3-8B-lora"),
    "qwen3-14b": ("Qwen/Qwen3-14B", "qwen3", "False", "saves/Qwen3-14B-lora"),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", "llama3", None, "saves/Llama-3.2-3B-Instruct-lora"),
}


def planned_command(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return shlex.split(lines[lines.index("command:") + 1])


def planned_args(stdout: str) -> dict[str, str | float]:
    """The dry run's printed train.yaml (what `-m sftkit.launch.worker` runs) as `{--key: value}`: decimals as floats,
    every other value as its text (True, 64, qwen3)."""
    lines = stdout.splitlines()
    body = []
    for line in lines[lines.index("train.yaml:") + 1:]:
        if not line.startswith("  "):
            break
        body.append(line[2:])
    mapping = yaml.safe_load("\n".join(body))
    return {f"--{key}": value if isinstance(value, float) else str(value) for key, value in mapping.items()}


@pytest.fixture()
def alpaca_file(tmp_path: Path) -> Path:
    path = tmp_path / "my.jsonl"
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTATIONS))
def test_dry_run_prints_the_exact_torchrun_command(preset: str, alpaca_file: Path) -> None:
    hub_id, template, thinking, output_dir = PRESET_EXPECTATIONS[preset]
    result = run_launcher("--model", preset, "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    command = planned_command(result.stdout)
    assert command[0] == "torchrun"
    assert command[command.index("--nproc_per_node") + 1] == "4"
    assert command[command.index("--nnodes") + 1] == "1"
    assert command[command.index("-m") + 1] == "sftkit.launch.worker"
    got = planned_args(result.stdout)
    for key, value in SEED_FLAGS.items():
        assert got[key] == (float(value) if isinstance(got[key], float) else value), key
    # absolute paths: train.yaml replays from any folder
    assert got["--deepspeed"] == str(KIT_DIR / "ds_z3_config.json")
    assert got["--model_name_or_path"] == hub_id
    assert got["--template"] == template
    assert got.get("--enable_thinking") == thinking
    assert got["--output_dir"] == str(KIT_DIR / output_dir)
    assert command[-1] == str(KIT_DIR / output_dir / "sftkit" / "train.yaml")
    assert got["--trust_remote_code"] == "False"
    # the one default the GPU presets change, announced with its reason
    assert got["--enable_liger_kernel"] == "True"
    assert "changes the seed's defaults" in result.stdout
    assert "sees 0 GPU(s)" in result.stdout
    assert "dry run: checks passed" in result.stdout


def test_dry_run_changes_nothing_on_disk(alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--output-dir", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not out.exists()


def test_dry_run_without_gpus_flag_plans_for_four_on_a_gpu_less_machine(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--dry-run")
    assert result.returncode == 0, result.stderr
    command = planned_command(result.stdout)
    assert command[command.index("--nproc_per_node") + 1] == "4"
    assert "a real run here would be refused" in result.stdout


def test_multi_node_environment_reaches_torchrun(alpaca_file: Path) -> None:
    env = kit_env(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29555")
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    command = planned_command(result.stdout)
    assert command[command.index("--nnodes") + 1] == "2"
    assert command[command.index("--node_rank") + 1] == "1"
    assert command[command.index("--master_addr") + 1] == "10.0.0.5"
    assert command[command.index("--master_port") + 1] == "29555"


def test_pass_through_arguments_win(alpaca_file: Path) -> None:
    result = run_launcher(
        "--model", "qwen3-8b", "--dataset", str(alpaca_file), "--dry-run", "--", "--save_steps", "50",
        "--lora_rank", "32",
    )
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert got["--save_steps"] == "50" and got["--lora_rank"] == "32"  # over SEED_ARGS' 64


def test_template_and_output_dir_options(alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "my run"
    result = run_launcher(
        "--model", "llama3.2-3b", "--dataset", str(alpaca_file), "--template", "llama3", "--output-dir", str(out),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert got["--output_dir"] == str(out)
    assert got["--template"] == "llama3"


def test_registered_dataset_name_is_used_from_the_kit_data_dir() -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", "demo", "--dry-run")
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert got["--dataset"] == "demo"
    assert got["--dataset_dir"] == str(KIT_DIR / "data")


def test_local_model_dir_picks_its_template(tiny_llama3: Path, alpaca_file: Path) -> None:
    result = run_launcher("--model", str(tiny_llama3), "--dataset", str(alpaca_file), "--gpus", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert got["--template"] == "llama3"
    assert got["--model_name_or_path"] == str(tiny_llama3)
    assert got["--output_dir"] == str(KIT_DIR / "saves/tiny-llama3-lora")


# ---- refusals: one clear line, non-zero exit, no traceback -------------------------------------


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sft_train.sh: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_refuses_placeholder_left_in_a_path(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--model-path", "xxxx/Qwen3-8B", "--dataset", str(alpaca_file))
    assert_refused(result, "xxxx/", "--model-path")
    result = run_launcher("--model", "qwen3-8b", "--dataset", "xxxx/data/my.jsonl", "--dry-run")
    assert_refused(result, "xxxx/", "--dataset")
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--output-dir", "xxxx/out", "--dry-run")
    assert_refused(result, "xxxx/", "--output-dir")


def test_refuses_model_folder_without_weights(tiny_qwen3: Path, tmp_path: Path, alpaca_file: Path) -> None:
    folder = tmp_path / "Qwen3-14B"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_qwen3 / name).read_bytes())
    result = run_launcher("--model", "qwen3-14b", "--model-path", str(folder), "--dataset", str(alpaca_file),
                          "--gpus", "4", "--dry-run")
    assert_refused(result, str(folder), "weights")


def test_refuses_model_folder_without_config_or_tokenizer(tmp_path: Path, alpaca_file: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    result = run_launcher("--model", "qwen3-8b", "--model-path", str(folder), "--dataset", str(alpaca_file),
                          "--dry-run")
    assert_refused(result, "config.json", "tokenizer")


def test_refuses_missing_model_folder(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--model-path", "/nonexistent/Qwen3-8B", "--dataset",
                          str(alpaca_file), "--dry-run")
    assert_refused(result, "does not exist")


def test_refuses_missing_dataset() -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", "no-such-file.jsonl", "--dry-run")
    assert_refused(result, "no-such-file.jsonl", "not found")


def test_refuses_more_gpus_than_visible_on_a_real_run(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4")
    assert_refused(result, "sees no GPU")
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4",
                          env=kit_env(SFTKIT_VISIBLE_GPUS="2"))
    assert_refused(result, "--gpus 4", "sees 2 GPU(s)")


def test_refuses_unknown_model_type_without_template(tiny_qwen3: Path, tmp_path: Path, alpaca_file: Path) -> None:
    folder = tmp_path / "mystery"
    folder.mkdir()
    for item in tiny_qwen3.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mystery"
    (folder / "config.json").write_text(json.dumps(config))
    result = run_launcher("--model", str(folder), "--dataset", str(alpaca_file), "--gpus", "2", "--dry-run")
    assert_refused(result, "'mystery'", "--template")
    result = run_launcher("--model", str(folder), "--dataset", str(alpaca_file), "--gpus", "2", "--template",
                          "qwen3", "--dry-run")
    assert result.returncode == 0, result.stderr


def test_refuses_existing_adapter_without_overwrite(alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "done-lora"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--output-dir", str(out), "--dry-run")
    assert_refused(result, "already holds a trained adapter", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == b"x"


def test_refuses_unknown_option_and_missing_model() -> None:
    result = run_launcher("--modle", "qwen3-8b")
    assert_refused(result, "--modle")
    result = run_launcher("--dataset", "demo")
    assert_refused(result, "--model is required")
    result = run_launcher("--model", "demo", "--dry-run", "--", "--save_steps", "50", "foo")
    assert_refused(result, "'foo' after -- is not a LLaMA-Factory argument")


def test_train_yaml_values_are_typed_and_secrets_stay_out(tmp_path: Path) -> None:
    from sftkit.launch.run_record import lf_value, torchrun_command, train_args

    assert [lf_value(text) for text in ("True", "false", "64", "5e-5", "0.05", "3.0", "all", "q_proj,v_proj")] == [
        True, False, 64, 5e-5, 0.05, 3.0, "all", "q_proj,v_proj"]
    the_plan, _ = plan_in_process("--model", "qwen3-8b", "--dataset", "demo", "--gpus", "4", "--dry-run",
                                  "--output-dir", str(tmp_path / "out"), extra=("--hf_hub_token", "hf_abcdefgh123"))
    mapping, secrets = train_args(the_plan)
    assert "hf_hub_token" not in mapping and secrets == ["hf_hub_token=hf_abcdefgh123"]
    assert mapping["output_dir"] == str(tmp_path / "out") and mapping["lora_rank"] == 64
    assert torchrun_command(the_plan)[-2:] == [str(tmp_path / "out" / "sftkit" / "train.yaml"),
                                               "hf_hub_token=hf_abcdefgh123"]


def test_help_and_the_readme_list_every_option() -> None:
    """Every option the launcher parses (sftkit.launch.plan, the one place) is in --help and in the README's
    Options block."""
    import re

    from sftkit.launch.plan import FLAG_OPTIONS, VALUE_OPTIONS

    options = set(VALUE_OPTIONS) | set(FLAG_OPTIONS)
    assert {"--model", "--save-every-minutes", "--skip-invalid", "--dry-run"} <= options
    result = run_launcher("--help")
    assert result.returncode == 0
    readme = (KIT_DIR / "README.md").read_text()
    block = readme[readme.index("## Options"):readme.index("## Presets")]
    for option in sorted(options):
        assert re.search(rf"^  {option}\b", result.stdout, re.MULTILINE), f"--help lacks {option}"
        assert re.search(rf"^  {option}\b", block, re.MULTILINE), f"README Options lacks {option}"
    for variable in ("SFTKIT_RENDEZVOUS_TIMEOUT", "SFTKIT_STOP_GRACE", "SFTKIT_MEMORY_CHECK", "PYTHON",
                     "CUDA_VISIBLE_DEVICES", "NNODES"):
        assert variable in block, f"README Options lacks {variable}"


def test_seed_defaults_are_visible_near_the_top_of_the_script() -> None:
    head = (KIT_DIR / "sft_train.sh").read_text().splitlines()[:40]
    text = "\n".join(head)
    for key, value in SEED_FLAGS.items():
        assert f"{key} {value}" in text, key


def test_checkpoints_by_the_clock_and_a_bounded_number_of_them(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    # 16 bytes per LoRA parameter (weights + fp32 master + Adam m, v); Qwen3-8B r64: 174,587,904 parameters
    assert "checkpoints: every 30 min and every 500 steps; the newest 3 kept (3 x 2.6 GiB)" in result.stdout
    got = planned_args(result.stdout)
    assert got["--save_total_limit"] == "3" and got["--ddp_timeout"] == "7200"

    changed = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                           "--save-every-minutes", "0", "--", "--save_total_limit", "5", "--save_steps", "200")
    assert changed.returncode == 0, changed.stderr
    # 5 rows, global batch 64, 3 epochs: 3 steps, so one step checkpoint at most (no clock), and the disk holds one
    assert "checkpoints: every 200 steps; the newest 5 kept (1 x 2.6 GiB)" in changed.stdout
    assert "(1 checkpoint(s) of 2.60 GiB" in changed.stdout
    assert planned_args(changed.stdout)["--save_total_limit"] == "5"  # after --, the user's wins

    for bad in ("-1", "soon"):
        refused = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                               "--save-every-minutes", bad)
        assert refused.returncode != 0 and "--save-every-minutes" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_run_whose_checkpoints_do_not_fit_the_disk_is_refused(alpaca_file: Path) -> None:
    # the clock keeps saving, so all 100,000 kept checkpoints of 3.8 GiB must fit: no disk holds 370 TiB
    result = run_launcher("--model", "qwen3-14b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                          "--", "--save_total_limit", "100000", env=kit_env(SFTKIT_DISK_CHECK=""))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "100000 checkpoint(s) of 3.83 GiB" in errors[0], result.stderr
    assert "keep fewer checkpoints (-- --save_total_limit 2)" in errors[0]


# ---- what trains is what is recorded (issue 12) -------------------------------------------------


def plan_in_process(*argv: str, extra: tuple[str, ...] = ()):
    """build_plan as sft_train.sh runs it (the seed's SEED_ARGS read from the script), and its record."""
    from sftkit.launch import plan as plan_module
    from sftkit.launch.run_record import plan_record
    from sftkit.seed import seed_args

    seeds = [item for key, value in seed_args().items() for item in (f"--{key}", value)]
    args = plan_module.parse_args([*argv, "--", *extra], seed_args=seeds)
    the_plan = plan_module.build_plan(args)
    return the_plan, plan_record(the_plan, args)


def test_arguments_after_dashes_are_what_is_recorded(alpaca_file: Path) -> None:
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run", "--",
                          "--enable_thinking", "True")
    assert result.returncode == 0, result.stderr
    model_line = next(line for line in result.stdout.splitlines() if line.startswith("model:"))
    assert "template qwen3, enable_thinking True" in model_line

    plan, record = plan_in_process("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                                   "--template", "qwen3", extra=("--enable_thinking", "True", "--cutoff_len", "4096"))
    assert "enable_thinking: true" in record["merge_config"] and "template: qwen3" in record["merge_config"]
    assert record["manifest"]["enable_thinking"] is True and record["manifest"]["template"] == "qwen3"
    keys = record["manifest"]["resume_keys"]
    assert (keys["enable_thinking"], keys["cutoff_len"], keys["template"]) == (True, "4096", "qwen3")
    assert "cutoff_len 4096" in " ".join(record["report"])  # the preset's reason text, from the run's values

    plan, record = plan_in_process("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                                   "--template", "llama3")
    assert plan.template == "llama3" and plan.enable_thinking is None and "enable_thinking" not in record[
        "merge_config"]
    # not set by the user: the template and the data decide it, after a relaunch's resume check
    plan, record = plan_in_process("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert record["manifest"]["enable_thinking"] is False and record["manifest"]["resume_keys"]["enable_thinking"] == (
        "auto")


KIT_OWNED_EXTRAS = {
    "--output_dir": "--output-dir", "--deepspeed": "ds_z3_config.json", "--dataset_dir": "--dataset",
    "--tokenized_path": "tokenizes once", "--model_name_or_path": "--model-path", "--dataset": "--dataset",
    "--template": "--template", "--resume_from_checkpoint": "resumes", "--overwrite_output_dir": "--overwrite",
}


def test_arguments_the_kit_owns_are_refused_after_dashes(alpaca_file: Path, tmp_path: Path) -> None:
    """Each gets one line naming the kit's option; nothing is created (the run would split otherwise)."""
    out = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    extras = []
    for key in KIT_OWNED_EXTRAS:
        extras += [key, str(elsewhere) if key != "--overwrite_output_dir" else "True"]
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--output-dir",
                          str(out), "--", "--learning_rate", "1e-4", *extras)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sft_train.sh: error:")]
    assert len(errors) == len(KIT_OWNED_EXTRAS), result.stderr
    for line, (key, use) in zip(errors, KIT_OWNED_EXTRAS.items(), strict=True):
        assert f"{key} after -- is set by the kit" in line and use in line, line
    assert not out.exists() and not elsewhere.exists()
    # --key=value is the same key; a key the user may change stays allowed
    assert_refused(run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run",
                                "--", f"--output_dir={elsewhere}"), "--output_dir after --", "--output-dir")
    allowed = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run", "--",
                           "--learning_rate", "1e-4")
    assert allowed.returncode == 0, allowed.stderr
    assert planned_args(allowed.stdout)["--learning_rate"] == 1e-4


def test_workers_get_the_allocator_settings_of_llamafactorys_launcher(alpaca_file: Path) -> None:
    """expandable_segments and NCCL without record_stream, as llamafactory/launcher.py sets them: shown in the
    plan and recorded; a value the user set wins and is shown as theirs."""
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    env_line = next(line for line in result.stdout.splitlines() if line.startswith("env:"))
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env_line
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS=1" in env_line
    _, record = plan_in_process("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert record["worker_env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert record["manifest"]["env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                         "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}

    env = kit_env()
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"
    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    env_line = next(line for line in result.stdout.splitlines() if line.startswith("env:"))
    assert "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512 (yours)" in env_line and "expandable" not in env_line


def test_several_datasets_and_a_validation_split_plan(tiny_qwen3: Path, alpaca_file: Path, tmp_path: Path) -> None:
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Hi {i}"},
                                                   {"from": "gpt", "value": f"Hello {i}"}]} for i in range(6)]))
    result = run_launcher("--model", "demo", "--model-path", str(tiny_qwen3), "--dataset",
                          f"{alpaca_file},{chat},demo", "--val-size", "0.2", "--output-dir", str(tmp_path / "out"),
                          "--dry-run")
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert got["--dataset"] == "sftkit_run_data,sftkit_run_data_2,demo"
    assert (got["--val_size"], got["--eval_strategy"], got["--eval_steps"]) == (0.2, "steps", "300")
    assert "datasets:   3, 51 rows in all" in result.stdout
    assert "11 held out for eval" in result.stdout  # ceil(51 x 0.2)
    assert not (tmp_path / "out").exists()

    result = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--val-size", "0.1", "--dry-run")
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert (got["--per_device_eval_batch_size"], got["--prediction_loss_only"], got["--eval_accumulation_steps"]) == (
        "1", "True", "1")
    assert "eval at micro-batch 1" in result.stdout
    for bad in ("abc", "1"):
        refused = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--val-size", bad, "--dry-run")
        assert_refused(refused, "--val-size")


def test_an_edit_of_seed_args_shows_everywhere(alpaca_file: Path, tmp_path: Path) -> None:
    """SEED_ARGS in a copy of the kit: the plan, its reason text and estimate, estimate and check-data follow it."""
    import subprocess
    import sys

    kit = tmp_path / "kit"
    copy_kit(kit)
    script = kit / "sft_train.sh"
    text = script.read_text()
    for old, new in (("--cutoff_len 20480", "--cutoff_len 16384"), ("--per_device_train_batch_size 2",
                                                                    "--per_device_train_batch_size 1"),
                     ("--lora_rank 64", "--lora_rank 32\n    --enable_liger_kernel False")):
        assert old in text
        text = text.replace(old, new)
    script.write_text(text)
    env = kit_env()
    env["PYTHONPATH"] = str(kit)
    result = subprocess.run(["bash", str(script), "--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4",
                             "--dry-run"], cwd=kit, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    got = planned_args(result.stdout)
    assert (got["--cutoff_len"], got["--per_device_train_batch_size"], got["--lora_rank"]) == ("16384", "1", "32")
    assert "at cutoff_len 16384 and micro-batch 1 the full-vocabulary logits in fp32 alone take 10.0 GB" in (
        result.stdout)
    assert "replaces SEED_ARGS values of sft_train.sh: enable_liger_kernel False -> True" in result.stdout
    memory = next(line for line in result.stdout.splitlines() if line.startswith("memory:"))
    original = run_launcher("--model", "qwen3-8b", "--dataset", str(alpaca_file), "--gpus", "4", "--dry-run")
    assert memory != next(line for line in original.stdout.splitlines() if line.startswith("memory:"))

    def sftkit(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "sftkit", *args], cwd=kit, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        return json.loads(done.stdout)

    estimate = sftkit("estimate", "--model", "qwen3-8b", "--gpus", "4", "--json", "--gpu-memory-gb", "80")
    assert (estimate["settings"]["cutoff_len"], estimate["settings"]["batch"], estimate["settings"]["lora_rank"]) == (
        16384, 1, 32)
    report = sftkit("check-data", str(alpaca_file), "--model", "qwen3-8b", "--json")
    assert (report["cutoff_len"], report["batch"], report["grad_accum"]) == (16384, 1, 8)


@pytest.mark.slow
def test_the_run_trained_what_the_check_tokenized_and_a_cut_short_cache_is_rebuilt(llama_run: SharedRun,
                                                                                    tmp_path: Path) -> None:
    """The shared run (conftest.llama_run): the check's tokenized dataset trained (nothing tokenized again) and the
    validation split was evaluated; then, in a copy, a cut-short cache is set aside and rebuilt, and the relaunch
    trains from it."""
    output = llama_run.result.stdout + llama_run.result.stderr
    assert "Loaded tokenized dataset from" in output and "Tokenized dataset is saved at" not in output
    assert "validation: val_size 0.2 held out; eval loss every 25 steps" in output
    logged = [json.loads(line) for line in (llama_run.out / "trainer_log.jsonl").read_text().splitlines()]
    assert [entry["current_steps"] for entry in logged if "eval_loss" in entry][:3] == [25, 50, 75]
    assert "eval_loss" in json.loads((llama_run.out / "all_results.json").read_text())
    cache = [path for path in (llama_run.out / "sftkit").iterdir() if path.name.startswith("tokenized-")]
    assert len(cache) == 1 and str(cache[0]) in output

    out = llama_run.copy_to(tmp_path / "lora")
    for arrow in (out / "sftkit" / cache[0].name).rglob("*.arrow"):
        with arrow.open("r+b") as handle:
            handle.truncate(arrow.stat().st_size // 2)
    result = run_launcher(*llama_run.args, "--output-dir", str(out), "--overwrite", "--save-every-minutes", "0", "--",
                          *llama_run.extras, "--max_steps", "2", env=llama_run.env, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "was not whole" in output and "set aside" in output
    assert "Loaded tokenized dataset from" in output and (out / "adapter_model.safetensors").is_file()
    assert [path.name for path in (out / "sftkit").iterdir() if path.name.startswith("tokenized-")] == [cache[0].name]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_driver_line_without_gpus_says_what_torch_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from sftkit import hardware
    from sftkit.launch import preflight

    monkeypatch.setattr(hardware, "torch_cuda_build", lambda: None)
    monkeypatch.setattr(hardware, "torch_version", lambda: None)
    assert preflight.check_driver([], cpu=False).endswith("; torch is not installed)")
    monkeypatch.setattr(hardware, "torch_version", lambda: "2.11.0")
    assert preflight.check_driver([], cpu=False).endswith("; the installed torch is a CPU build)")


def test_seed_values_are_what_bash_reads(tmp_path: Path) -> None:
    """Other commands take SEED_ARGS as bash reads it (a value bash computes counts); a broken script: one line."""
    from sftkit import seed

    script = tmp_path / "sft_train.sh"
    text = (KIT_DIR / "sft_train.sh").read_text()
    script.write_text(text.replace("--cutoff_len 20480", '--cutoff_len "$((8 * 1024))"  # computed by bash'))
    assert seed.seed_number("cutoff_len", script=script) == 8192
    assert seed.seed_args(script)["lora_dropout"] == "0.05"
    script.write_text(text.replace("SEED_ARGS=(", "SEED_ARGS=( --lora_rank", 1))
    with pytest.raises(seed.SeedError, match="not a list of '--key value' pairs"):
        seed.seed_args(script)
    script.write_text("exit 3\n")
    with pytest.raises(seed.SeedError, match="--print-seed-args failed"):
        seed.seed_args(script)
