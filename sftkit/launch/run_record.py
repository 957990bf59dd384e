"""The planned run and what is written from it: the run's LLaMA-Factory YAML (train.yaml), the torchrun
command, the supervisor's record, the printed plan, merge_model.yaml and the keys a resume must match.
sftkit.launch.plan builds the Plan; nothing here writes a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sftkit.files import UsageError
from sftkit.launch import calibration, manifest, runs
from sftkit.models import Preset

SAVE_EVERY_ENV = "SFTKIT_SAVE_EVERY_MINUTES"  # read by sftkit.launch.worker's clock callback
RENDEZVOUS_TIMEOUT_ENV = "SFTKIT_RENDEZVOUS_TIMEOUT"
TRAIN_YAML = "train.yaml"  # <output_dir>/sftkit/train.yaml: the run as plain LLaMA-Factory YAML
# paths made absolute in train.yaml, so `llamafactory-cli train` replays it from any folder
PATH_KEYS = ("output_dir", "dataset_dir", "deepspeed", "tokenized_path", "resume_from_checkpoint")
# The workers' environment that LLaMA-Factory's own launcher (llamafactory/launcher.py) gives them: the
# expandable-segments allocator (fragmentation is the usual out-of-memory at long cutoffs; the memory
# estimate's fixed overhead assumes it) and NCCL without record_stream. The user's value wins; a name
# in the tuple set instead (torch's newer PYTORCH_ALLOC_CONF) counts as the user's.
WORKER_ENV_DEFAULTS = {
    "PYTORCH_CUDA_ALLOC_CONF": ("expandable_segments:True", ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")),
    "TORCH_NCCL_AVOID_RECORD_STREAMS": ("1", ("TORCH_NCCL_AVOID_RECORD_STREAMS",)),
}


def worker_env(environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(what the kit sets for the workers, what the user set already) among WORKER_ENV_DEFAULTS."""
    kit, users = {}, {}
    for key, (value, names) in WORKER_ENV_DEFAULTS.items():
        given = next((name for name in names if name in environ), None)
        if given is None:
            kit[key] = value
        else:
            users[given] = environ[given]
    return kit, users


class PlanError(UsageError):
    """A user mistake: one clear line, no traceback."""


@dataclass
class Plan:
    model_name_or_path: str
    model_name: str
    dataset: str  # LLaMA-Factory's --dataset: one name, or several separated by commas
    dataset_dir: str
    dataset_registration: dict | None  # {name: entry} written for the run, None when data/ holds them all
    output_dir: Path
    nproc_per_node: int
    visible_gpus: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    notes: list[str] = field(default_factory=list)
    resume_from: str | None = None
    universal_from: str | None = None  # a checkpoint of another world size, to convert before the run
    rendezvous: str = ""
    rendezvous_timeout: int = 600
    save_every_minutes: float = 0.0
    skipped_checkpoints: list[tuple[str, str]] = field(default_factory=list)
    preset: Preset | None = None
    final_args: dict[str, str] = field(default_factory=dict)
    dataset_file: str | None = None
    dataset_sha256: str | None = None
    dataset_rows: int | None = None
    checks: list[str] = field(default_factory=list)
    data_report: dict | None = None
    estimated_peak_bytes: int | None = None  # the memory estimate's peak per GPU (preflight)
    dataset_parts: list[dict] = field(default_factory=list)  # per dataset: name, file, sha256, rows
    thinking_set: bool = False  # enable_thinking came from the user (SEED_ARGS or after --), not from the kit
    env_kit: dict[str, str] = field(default_factory=dict)  # WORKER_ENV_DEFAULTS the kit sets for the workers
    env_user: dict[str, str] = field(default_factory=dict)  # ... that the user's environment set already

    # What trains is what is recorded: final_args is the one mapping of LLaMA-Factory arguments (seed,
    # then the kit's and the preset's settings, then the user's arguments after --; the last wins).
    @property
    def template(self) -> str:
        return self.final_args["template"]

    @property
    def enable_thinking(self) -> bool | None:
        value = self.final_args.get("enable_thinking")
        return None if value is None else value.lower() in ("true", "1", "yes")

    @property
    def train_yaml(self) -> Path:
        return (self.output_dir / runs.KIT_SUBDIR / TRAIN_YAML).absolute()


def lf_value(text: str) -> bool | int | float | str:
    """A `--key value` text as a typed YAML value: booleans, whole numbers and decimals; else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return text


def train_args(plan: Plan) -> tuple[dict, list[str]]:
    """(train.yaml's mapping, `key=value` overrides for the secret-named ones, kept out of every file).

    LLaMA-Factory's read_args takes the YAML path as argv[1] and OmegaConf `key=value` overrides after it."""
    mapping, secrets = {}, []
    for key, text in plan.final_args.items():
        if manifest.SECRET_ARG.search(key):
            secrets.append(f"{key}={text}")
            continue
        value = lf_value(text)
        if key in PATH_KEYS or (key == "model_name_or_path" and os.path.exists(text)):
            value = os.path.abspath(text)
        mapping[key] = value
    return mapping, secrets


def train_yaml_text(plan: Plan) -> str:
    header = f"# The run's LLaMA-Factory arguments, written by sft_train.sh: llamafactory-cli train {plan.train_yaml}\n"
    return header + yaml.safe_dump(train_args(plan)[0], sort_keys=False, allow_unicode=True)


def torchrun_command(plan: Plan) -> list[str]:
    """The launch's one torchrun command. torchrun handles SIGQUIT only: a stop signal reaches the workers
    through the supervisor, which lets them finish the step and save (torchrun would kill them 30 s later).
    Its own rendezvous timeout is longer than the supervisor's, which gives up first with one clear line."""
    return ["torchrun", "--nnodes", str(plan.nnodes), "--node_rank", str(plan.node_rank), "--nproc_per_node",
            str(plan.nproc_per_node), "--master_addr", plan.master_addr, "--master_port", str(plan.master_port),
            "--rdzv_conf", f"timeout={plan.rendezvous_timeout + 60}", "--signals_to_handle", "SIGQUIT",
            "-m", "sftkit.launch.worker", str(plan.train_yaml), *train_args(plan)[1]]


def resume_keys(plan: Plan) -> dict:
    final = plan.final_args
    micro = int(final.get("per_device_train_batch_size", "1"))
    accumulation = int(final.get("gradient_accumulation_steps", "1"))
    world = plan.nproc_per_node * plan.nnodes
    return {
        "world_size": world,
        "global_batch": micro * world * accumulation,
        "dataset_sha256": plan.dataset_sha256,
        "lora": {key: final.get(key) for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target",
                                                 "additional_target")},
        "model_name_or_path": plan.model_name_or_path,
        "cutoff_len": final.get("cutoff_len"),
        "template": plan.template,
        # What the user set; "auto" when the template and the data decide it (the data check, after this
        # check on a relaunch): the template and the data's digest above already pin what it becomes.
        "enable_thinking": plan.enable_thinking if plan.thinking_set else "auto",
    }


def result_files(plan: Plan) -> list[str]:
    """The files a finished run has written in its output dir: LLaMA-Factory's adapter and train results,
    and the final evaluation's when there is a validation split (it runs after train_results.json)."""
    lora = plan.final_args.get("finetuning_type", "lora") == "lora"
    files = (["adapter_model.safetensors"] if lora else []) + ["train_results.json"]
    if float(plan.final_args.get("val_size") or 0) > 0 and plan.final_args.get("eval_strategy", "no") != "no":
        files.append("eval_results.json")
    return files


def merge_config(plan: Plan) -> str:
    """merge_model.yaml filled in for this run, written into the adapter folder."""
    out = plan.output_dir
    lines = [
        "# Written by sft_train.sh for this run: llamafactory-cli export " + str(out / "merge_model.yaml"),
        f"model_name_or_path: {json.dumps(plan.model_name_or_path)}",
        f"adapter_name_or_path: {json.dumps(str(out))}",
        f"template: {plan.template}",
    ]
    if plan.enable_thinking is not None:
        lines.append(f"enable_thinking: {str(plan.enable_thinking).lower()}")
    merged = out.parent / (out.name.removesuffix("-lora") + "-merged")
    lines += [
        "finetuning_type: lora",
        "trust_remote_code: false",
        f"export_dir: {json.dumps(str(merged))}",
        "export_size: 5",
        "export_device: cpu",
        "export_legacy_format: false",
    ]
    return "\n".join(lines) + "\n"


def report_lines(plan: Plan, dry_run: bool) -> list[str]:
    thinking = f", enable_thinking {plan.enable_thinking}" if plan.enable_thinking is not None else ""
    lines = [f"model:      {plan.model_name_or_path} (template {plan.template}{thinking})"]
    for part in plan.dataset_parts:
        if plan.dataset_registration:
            lines.append(f"dataset:    {part['file']} ({part['rows']} rows; registered for this run as {part['name']} "
                         f"in {plan.dataset_dir}/dataset_info.json, your file is not edited)")
        else:
            lines.append(f"dataset:    {part['name']} ({part['rows']} rows, from {plan.dataset_dir}/dataset_info.json)")
    if len(plan.dataset_parts) > 1:
        mix = plan.final_args.get("mix_strategy", "concat")
        lines.append(f"datasets:   {len(plan.dataset_parts)}, {plan.dataset_rows} rows in all, mixed by {mix}")
    resume = f" (resuming from {plan.resume_from})" if plan.resume_from else ""
    lines.append(f"output dir: {plan.output_dir}{resume}")
    cpu = plan.preset is not None and plan.preset.cpu
    device = "CPU processes" if cpu else "GPUs"
    lines.append(f"processes:  {plan.nproc_per_node} {device} per node x {plan.nnodes} node(s); this machine sees "
                 f"{plan.visible_gpus} GPU(s)")
    env = [f"{key}={value}" for key, value in plan.env_kit.items()] + [
        f"{key}={value} (yours)" for key, value in plan.env_user.items()]
    if env:
        lines.append(f"env:        {' '.join(env)} (for the workers, as LLaMA-Factory's launcher sets them)")
    lines += plan.checks
    lines += [f"note:       {note}" for note in plan.notes]
    if dry_run and not cpu and plan.nproc_per_node > plan.visible_gpus:
        lines.append(f"note:       dry run: planned for {plan.nproc_per_node} GPUs; a real run here would be refused")
    return lines


def plan_record(plan: Plan, args: argparse.Namespace) -> dict:
    """What sftkit.launch.supervise needs to set up the run and write its manifest."""
    return {
        "output_dir": str(plan.output_dir),
        "node_rank": plan.node_rank,
        "nnodes": plan.nnodes,
        "master_addr": plan.master_addr,
        "master_port": plan.master_port,
        "rendezvous": plan.rendezvous,
        "rendezvous_timeout": plan.rendezvous_timeout,
        "universal_from": plan.universal_from,
        "deepspeed_config": str(args.deepspeed),
        "worker_env": {SAVE_EVERY_ENV: f"{plan.save_every_minutes:g}", **plan.env_kit},
        "results": result_files(plan),
        "overwrite": bool(args.overwrite),
        "dataset_dir": plan.dataset_dir,
        "dataset_registration": plan.dataset_registration,
        "skipped_checkpoints": [checkpoint for checkpoint, _ in plan.skipped_checkpoints],
        "merge_config": merge_config(plan),
        "train_yaml": train_yaml_text(plan),
        "report": report_lines(plan, dry_run=False),
        "manifest": {
            "model_name_or_path": plan.model_name_or_path,
            "preset": plan.preset.name if plan.preset else None,
            "template": plan.template,
            "enable_thinking": plan.enable_thinking,
            "resolved_args": manifest.redact_args([item for key, value in plan.final_args.items()
                                                   for item in (f"--{key}", value)]),
            "nnodes": plan.nnodes,
            "nproc_per_node": plan.nproc_per_node,
            "world_size": plan.nproc_per_node * plan.nnodes,
            "global_batch": resume_keys(plan)["global_batch"],
            "dataset": {"name": plan.dataset, "file": plan.dataset_file, "sha256": plan.dataset_sha256,
                        "rows": plan.dataset_rows, **({"parts": plan.dataset_parts} if len(plan.dataset_parts) > 1
                                                       else {})},
            "resume_from": plan.resume_from,
            "resume_keys": resume_keys(plan),
            "save_every_minutes": plan.save_every_minutes,
            "env": {**plan.env_kit, **plan.env_user},
            "estimate": calibration.estimate_record(plan),
        },
    }
