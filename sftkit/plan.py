"""Resolve and check one training run for sft_train.sh, before anything starts.

sft_train.sh passes its options and the seed's LLaMA-Factory defaults; this module picks the
model, template, dataset and output folder, refuses what cannot work (one line each, naming the
path and the fix), prints the plan, and writes the resolved argument list NUL-separated to
`--args-out` for the launcher to read into a bash array, and everything the supervisor needs
(`sftkit.supervise`: registration, merge config, manifest) as JSON to `--plan-out`. It writes
nothing else, so a dry run changes nothing on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sftkit import hardware, manifest, models, preflight, runs, validate
from sftkit.files import KIT_DATA_DIR, KIT_DIR, UsageError, check_placeholder
from sftkit.models import Preset
from sftkit.records import DataFileError, iter_records, place_text

RUN_DATASET_NAME = "sftkit_run_data"
EVAL_EVERY_LOGS = 10  # eval loss at every 10th logged step: a curve of its own at a few percent of the run's time
DEFAULT_SAVE_EVERY_MINUTES = 30.0
SAVE_EVERY_ENV = "SFTKIT_SAVE_EVERY_MINUTES"  # read by sftkit.worker's clock callback
RENDEZVOUS_TIMEOUT_ENV = "SFTKIT_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600


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
    lf_args: list[str]
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
    dataset_parts: list[dict] = field(default_factory=list)  # per dataset: name, file, sha256, rows
    thinking_set: bool = False  # enable_thinking came from the user (SEED_ARGS or after --), not from the kit

    # What trains is what is recorded: these read the final LLaMA-Factory arguments (seed, then the
    # kit's and the preset's settings, then the user's arguments after --; the last wins).
    @property
    def template(self) -> str:
        return self.final_args["template"]

    @property
    def enable_thinking(self) -> bool | None:
        value = self.final_args.get("enable_thinking")
        return None if value is None else value.lower() in ("true", "1", "yes")

    def set_arg(self, key: str, value: str) -> None:
        """Change one of the kit's own LLaMA-Factory arguments after planning (the user's extras still win)."""
        flag = f"--{key}"
        if flag in self.lf_args:
            self.lf_args[self.lf_args.index(flag) + 1] = value
        else:
            self.lf_args += [flag, value]
        self.final_args[key] = value


# ---------------------------------------------------------------- hardware


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- data


def _display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def resolve_datasets(value: str | None, preset: Preset | None) -> tuple[str, str, dict | None]:
    """(LLaMA-Factory's --dataset, dataset_dir, the run's {name: entry} registration or None).

    Only registered names: data/ as the dataset_dir. With a file among them, every dataset is
    registered for the run (named ones with their files' paths; a file's entry is the data check's,
    which reads every row).
    """
    value = value or (preset.default_dataset if preset else None)
    if value is None:
        raise PlanError("no --dataset given: pass --dataset FILE.json|FILE.jsonl or a name in data/dataset_info.json")
    check_placeholder(value, "--dataset")
    sources = validate.resolve_datasets(value)
    if all(source.name for source in sources):
        return ",".join(source.name for source in sources), _display_path(KIT_DATA_DIR), None
    registration, files = {}, 0
    for source in sources:
        name = source.name
        if name is None:
            files += 1
            name = RUN_DATASET_NAME if files == 1 else f"{RUN_DATASET_NAME}_{files}"
        registration[name] = dict(source.entry or {}, file_name=str(source.path.resolve()))
    return ",".join(registration), "", registration


# ---------------------------------------------------------------- output dir


def resolve_output_dir(args: argparse.Namespace, model_name: str, node_rank: int, rendezvous: str
                       ) -> tuple[Path, str | None, list[tuple[str, str]]]:
    """(output dir, checkpoint to resume from, [(incomplete checkpoint, why)] skipped)."""
    if args.output_dir:
        check_placeholder(args.output_dir, "--output-dir")
        out = Path(args.output_dir)
    else:
        out = Path("saves") / f"{model_name}-lora"
    if out.exists() and not out.is_dir():
        raise PlanError(f"output dir {str(out)!r} is a file: pass another --output-dir")
    if not out.is_dir():
        return out, None, []
    if node_rank == 0:  # other nodes share node 0's folder and start while node 0 holds it
        busy = runs.busy_reason(out, rendezvous)
        if busy:
            raise PlanError(busy)
    if args.overwrite:
        return out, None, []
    if (out / "adapter_model.safetensors").is_file() or (out / "adapter_model.bin").is_file():
        raise PlanError(
            f"output dir {str(out)!r} already holds a trained adapter: pass --overwrite to replace it, "
            "or another --output-dir"
        )
    whole, skipped = runs.newest_whole_checkpoint(out)
    return out, (str(whole) if whole else None), [(str(p), why) for p, why in skipped]


# ---------------------------------------------------------------- arguments


def parse_flag_values(args: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs of an argument list (a bare `--flag` counts as True)."""
    values: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if sep:
                values[key] = value
            elif index + 1 < len(args) and not args[index + 1].startswith("--"):
                values[key] = args[index + 1]
                index += 1
            else:
                values[key] = "True"
        index += 1
    return values


def merge_args(seed: list[str], overrides: dict[str, str]) -> list[str]:
    """Seed `--key value` pairs with the overrides applied in place, then any new keys."""
    pairs: list[list[str]] = []
    index = 0
    while index < len(seed):
        key = seed[index]
        if not key.startswith("--") or index + 1 >= len(seed):
            raise PlanError(f"sft_train.sh's defaults are malformed near {key!r}: each default is '--key value'")
        pairs.append([key, seed[index + 1]])
        index += 2
    keys = {pair[0]: pair for pair in pairs}
    for key, value in overrides.items():
        flag = f"--{key}"
        if flag in keys:
            keys[flag][1] = value
        else:
            pairs.append([flag, value])
            keys[flag] = pairs[-1]
    return [item for pair in pairs for item in pair]


def build_plan(args: argparse.Namespace) -> Plan:
    nnodes = _env_int("NNODES", 1)
    node_rank = _env_int("NODE_RANK", 0)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise PlanError(f"NODE_RANK={node_rank} with NNODES={nnodes}: NODE_RANK must be 0..{nnodes - 1}")
    master_addr = os.environ.get("MASTER_ADDR", "")
    if nnodes > 1 and not master_addr:
        raise PlanError(f"NNODES={nnodes} needs MASTER_ADDR: set it to the address of the node with NODE_RANK=0")
    master_port = _env_int("MASTER_PORT", 29500 if nnodes > 1 else free_port())
    rendezvous_timeout = _env_int(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)
    if args.save_every_minutes < 0:
        raise PlanError(f"--save-every-minutes {args.save_every_minutes:g}: give minutes >= 0 (0 turns it off)")

    from_scratch = parse_flag_values(args.extra_args).get("train_from_scratch", "").lower() == "true"
    model = models.resolve(args.model, args.model_path, parse_flag_values(args.extra_args).get("template")
                           or args.template, weights=not from_scratch)
    model_path, model_name, template, thinking, preset = (model.path, model.name, model.template, model.thinking,
                                                          model.preset)
    dataset, dataset_dir, registration = resolve_datasets(args.dataset, preset)
    rendezvous = f"{master_addr or '127.0.0.1'}:{master_port}/{nnodes}"
    output_dir, resume_from, skipped = resolve_output_dir(args, model_name, node_rank, rendezvous)
    if registration is not None:
        dataset_dir = str(output_dir / runs.KIT_SUBDIR)

    visible = hardware.visible_gpu_count()
    is_cpu = preset is not None and preset.cpu
    if args.gpus is not None:
        if args.gpus < 1:
            raise PlanError(f"--gpus {args.gpus}: give a positive number of processes per node")
        nproc = args.gpus
    elif preset is not None and preset.default_gpus:
        nproc = preset.default_gpus
    else:
        nproc = visible or 4
    if not args.dry_run and not is_cpu and nproc > visible:
        raise PlanError(
            f"--gpus {nproc} but this machine sees {visible} GPU(s): pass --gpus {visible} or fewer"
            if visible
            else f"this machine sees no GPU (nproc {nproc}): run on a GPU node, or use --dry-run to check the plan here"
        )

    overrides = {
        "model_name_or_path": model_path,
        "template": template,
        "dataset": dataset,
        "dataset_dir": dataset_dir,
        "output_dir": str(output_dir),
        "deepspeed": str(args.deepspeed),
    }
    seed_values, extras = parse_flag_values(args.seed_args), parse_flag_values(args.extra_args)
    user = seed_values | extras  # what the user set: SEED_ARGS in the script, then the arguments after --
    if thinking is not None and "enable_thinking" not in user:  # else the data check may turn it on
        overrides["enable_thinking"] = str(thinking)
    notes = []
    if preset is not None and preset.overrides:
        overrides.update(preset.overrides)
        replaced = [f"{key} {seed_values[key]} -> {value}" for key, value in preset.overrides.items()
                    if key in seed_values and seed_values[key] != value and key not in extras]
        if replaced:
            notes.append(f"preset {preset.name} replaces SEED_ARGS values of sft_train.sh: {', '.join(replaced)} "
                         "(pass them after -- to keep yours)")
    if args.val_size is not None:
        overrides["val_size"] = _val_size(args.val_size)
    if args.overwrite:
        overrides["overwrite_output_dir"] = "True"
    if resume_from:
        overrides["resume_from_checkpoint"] = resume_from
    saved_world = _universal_resume(resume_from, nproc * nnodes)
    if saved_world is not None:
        overrides["deepspeed"] = str(output_dir / runs.KIT_SUBDIR / runs.UNIVERSAL_DS_CONFIG)
        notes.append(f"{resume_from} was saved by {saved_world} processes and this launch has {nproc * nnodes}: "
                     "it is converted once to DeepSpeed's universal checkpoint (ds_to_universal) and loaded from "
                     "that (keep the global batch, --global-batch, and the steps go on as they would have)")
    for checkpoint, why in skipped:
        notes.append(f"{checkpoint} is incomplete ({why}): it will be set aside as "
                     f"incomplete-{Path(checkpoint).name} and never loaded")

    final = seed_values | overrides | extras
    eval_note = _eval_settings(final, overrides, user, preset)
    global_batch_note = _apply_global_batch(args, final, overrides, nproc * nnodes)
    lf_args = merge_args(args.seed_args, overrides)
    final = parse_flag_values(lf_args) | extras
    if preset is not None and preset.overrides:
        notes.append(f"preset {preset.name} changes the seed's defaults: {preset.reason(final)}")
    notes += [global_batch_note] + ([eval_note] if eval_note else [])

    plan = Plan(
        model_name_or_path=model_path,
        model_name=model_name,
        dataset=dataset,
        dataset_dir=dataset_dir,
        dataset_registration=registration,
        output_dir=output_dir,
        nproc_per_node=nproc,
        visible_gpus=visible,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr or "127.0.0.1",
        master_port=master_port,
        rendezvous=rendezvous,
        rendezvous_timeout=rendezvous_timeout,
        save_every_minutes=args.save_every_minutes,
        lf_args=lf_args,
        notes=notes,
        resume_from=resume_from,
        skipped_checkpoints=skipped,
        preset=preset,
        final_args=final,
        thinking_set="enable_thinking" in user,
    )
    _describe_dataset(plan)
    plan.universal_from = resume_from if saved_world is not None else None
    if resume_from:
        _check_resume_compatible(plan, args.force_resume)
    plan.checks += preflight.preflight(plan)
    _check_data(plan, args)  # last: on a real run it caches its result, so only once all else passed
    return plan


def _val_size(value: str) -> str:
    """--val-size as LLaMA-Factory's val_size takes it: a share in (0, 1) or a whole number of rows."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (0 < number < 1 or (number > 1 and number.is_integer())):
        raise PlanError(f"--val-size {value!r}: give a share of the rows between 0 and 1 (e.g. 0.05) or a number of "
                        "rows (e.g. 200)")
    return value


def _eval_settings(final: dict[str, str], overrides: dict[str, str], user: dict[str, str],
                   preset: Preset | None) -> str | None:
    """With a validation split: eval loss every EVAL_EVERY_LOGS x logging_steps, and what eval needs to fit.

    The eval steps land on logged steps (trainer_log.jsonl, the loss plot and TensorBoard show both
    losses there); LLaMA-Factory also evaluates once at the end (eval_loss in all_results.json).
    """
    if float(final.get("val_size") or 0) <= 0:
        return None
    every = EVAL_EVERY_LOGS * int(final.get("logging_steps", 500))
    settings = {"eval_strategy": "steps", "eval_steps": str(every)}
    settings.update(preset.eval_overrides if preset else {})
    for key, value in settings.items():
        if key not in user:
            overrides[key] = final[key] = value
    cadence = (f"every {final['eval_steps']} steps" + (f" ({EVAL_EVERY_LOGS} x logging_steps)"
                                                       if "eval_steps" not in user else "")
               if final.get("eval_strategy") == "steps" else f"eval_strategy {final.get('eval_strategy')}")
    note = f"validation: val_size {final['val_size']} held out; eval loss {cadence} and at the end"
    if preset is not None and preset.eval_overrides:
        note += f"; preset {preset.name}: {preset.reason(final, preset.eval_reason)}"
    return note


def _apply_global_batch(args: argparse.Namespace, final: dict[str, str], overrides: dict[str, str],
                        world_size: int) -> str:
    """Derive gradient accumulation from --global-batch; describe the global batch either way."""
    micro = int(final.get("per_device_train_batch_size", "1"))
    if args.global_batch is not None:
        per_step = micro * world_size
        if args.global_batch < per_step or args.global_batch % per_step:
            raise PlanError(
                f"--global-batch {args.global_batch} is not a multiple of micro-batch {micro} x {world_size} "
                f"process(es) = {per_step}: pass a multiple of {per_step}"
            )
        overrides["gradient_accumulation_steps"] = str(args.global_batch // per_step)
        final["gradient_accumulation_steps"] = overrides["gradient_accumulation_steps"]
    accumulation = int(final.get("gradient_accumulation_steps", "1"))
    return (f"global batch {micro * world_size * accumulation} = micro-batch {micro} x {world_size} process(es) "
            f"x accumulation {accumulation}")


def _check_data(plan: Plan, args: argparse.Namespace) -> None:
    """The data check of `python -m sftkit check-data`, with this run's final LLaMA-Factory arguments.

    It validates every row of every dataset, registers each file (the entry names only the columns
    it has), and builds the dataset that trains with LLaMA-Factory's own preprocessing: on a real
    run as the run's `tokenized-<key>` (passed as `--tokenized_path`, so training tokenizes nothing,
    and a relaunch or a resume neither), on a dry run in a temporary folder, deleted (nothing
    written). Qwen3 with reasoning in the answers and no enable_thinking set: thinking is turned on.
    """
    from sftkit import check_data

    final = plan.final_args
    kit_dir = plan.output_dir / runs.KIT_SUBDIR
    value = args.dataset or plan.preset.default_dataset
    report = check_data.check_dataset(
        value, args.model, model_path=args.model_path, template=plan.template,
        enable_thinking=plan.enable_thinking if plan.thinking_set else None,
        cutoff_len=int(final.get("cutoff_len", 1024)), gpus=plan.nproc_per_node, nodes=plan.nnodes,
        batch=int(final.get("per_device_train_batch_size", 1)),
        grad_accum=int(final.get("gradient_accumulation_steps", 1)), lf_options=final,
        skip_invalid=args.skip_invalid, cache_dir=None if args.dry_run else kit_dir,
        plot_dir=None if args.dry_run else kit_dir, progress=sys.stderr.isatty(),
    )
    if not report["ok"]:
        listing = check_data.render_problems(report)
        if listing:
            print(listing, file=sys.stderr)
        first = report["problems"][0] if report["problems"] else {}
        place = place_text(first.get("file", report["file"]), first) if first else report["file"]
        message = first.get("message", "no example can train")
        if report.get("fatal"):
            raise PlanError(f"{place}: {message}")
        raise PlanError(f"{report['invalid_rows']} invalid row(s) in {report['file']} (first: {place}: {message}): "
                        "fix them, or pass --skip-invalid to train without them")
    plan.data_report = report
    plan.dataset_rows = report["rows"]
    if report["enable_thinking"] is not None and report["enable_thinking"] != plan.enable_thinking:
        plan.set_arg("enable_thinking", str(report["enable_thinking"]))  # the data carries reasoning
    if plan.dataset_registration is not None:
        for (name, entry), part in zip(plan.dataset_registration.items(), report["datasets"], strict=True):
            if entry is not None and part.get("registration") and part["dataset"] is None:
                plan.dataset_registration[name] = part["registration"]
    for part, described in zip(report["datasets"], plan.dataset_parts, strict=True):
        described["rows"] = part["rows"]
    if report.get("dropped_rows"):
        files = ", ".join(part["data_file"] for part in report["datasets"] if part["invalid_rows"])
        plan.notes.append(f"--skip-invalid: {report['dropped_rows']} invalid row(s) dropped; training reads {files}")
    if report.get("tokens"):
        tokens = report["tokens"]
        held = f", {report['eval_rows']} held out for eval" if report.get("eval_rows") else ""
        plan.checks.append(f"data:       {report['rows']} rows{held}; tokens p50 {tokens['p50']}, p99 {tokens['p99']}, "
                           f"max {tokens['max']}; {report['over_cutoff']} reach the cutoff; "
                           f"{report['steps_per_epoch']} steps per epoch")
    for note in report.get("notes", []):
        plan.notes.append(f"data: {note}")
    if report.get("tokenized_path"):
        plan.lf_args += ["--tokenized_path", report["tokenized_path"]]
        plan.final_args["tokenized_path"] = report["tokenized_path"]


def _describe_dataset(plan: Plan) -> None:
    """SHA-256 and row count of each data file (registered or named) for the manifest and the resume check."""
    from sftkit.files import file_sha256

    registered = plan.dataset_registration
    if registered is None:
        info = json.loads((KIT_DATA_DIR / "dataset_info.json").read_text(encoding="utf-8"))
        registered = {name: dict(info[name], file_name=str(KIT_DATA_DIR / info[name]["file_name"]))
                      for name in plan.dataset.split(",")}
    plan.dataset_parts = []
    for name, entry in registered.items():
        path = Path(entry["file_name"])
        plan.dataset_parts.append({"name": name, "file": str(path.resolve()), "sha256": file_sha256(path),
                                   "rows": count_rows(path)})
    first = plan.dataset_parts[0]
    plan.dataset_file = first["file"] if len(plan.dataset_parts) == 1 else None
    plan.dataset_sha256 = first["sha256"] if len(plan.dataset_parts) == 1 else hashlib.sha256(
        ",".join(part["sha256"] for part in plan.dataset_parts).encode()).hexdigest()
    plan.dataset_rows = sum(part["rows"] for part in plan.dataset_parts)


def count_rows(path: Path) -> int:
    """Rows in a .jsonl or .json file, read streaming (a large file is never loaded whole)."""
    try:
        return sum(1 for _ in iter_records(path))
    except DataFileError:  # the data check names the problem
        return 0


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
        "enable_thinking": plan.enable_thinking,
    }


def _universal_resume(resume_from: str | None, world: int) -> int | None:
    """The world size that saved `resume_from`, when it differs from this launch's (else None).

    DeepSpeed ZeRO-3 loads its optimizer shards only on the world size that wrote them; the
    supervisor converts such a checkpoint with DeepSpeed's own `ds_to_universal` and the run loads
    it through `checkpoint.load_universal`."""
    if not resume_from:
        return None
    saved = runs.checkpoint_world_size(Path(resume_from))
    return saved if saved not in (None, world) else None


def _check_resume_compatible(plan: Plan, force: bool) -> None:
    previous = runs.previous_manifest(plan.output_dir)
    if previous is None:
        return
    differences = runs.resume_differences(previous, resume_keys(plan))
    if not differences:
        return
    if not force:
        raise PlanError(
            f"resuming {plan.resume_from} with changed settings: {'; '.join(differences)}. "
            "Restore them, or pass --force-resume to continue anyway, or --overwrite to start over"
        )
    plan.notes.append("--force-resume: continuing although " + "; ".join(differences))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise PlanError(f"{name}={value!r} is not a whole number: set {name} to a number")
    return int(value)


# ---------------------------------------------------------------- output


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
    lines += plan.checks
    lines += [f"note:       {note}" for note in plan.notes]
    if dry_run and not cpu and plan.nproc_per_node > plan.visible_gpus:
        lines.append(f"note:       dry run: planned for {plan.nproc_per_node} GPUs; a real run here would be refused")
    return lines


def plan_record(plan: Plan, args: argparse.Namespace) -> dict:
    """What sftkit.supervise needs to set up the run and write its manifest."""
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
        "worker_env": {SAVE_EVERY_ENV: f"{plan.save_every_minutes:g}"},
        "overwrite": bool(args.overwrite),
        "dataset_dir": plan.dataset_dir,
        "dataset_registration": plan.dataset_registration,
        "skipped_checkpoints": [checkpoint for checkpoint, _ in plan.skipped_checkpoints],
        "merge_config": merge_config(plan),
        "report": report_lines(plan, dry_run=False),
        "manifest": {
            "model_name_or_path": plan.model_name_or_path,
            "preset": plan.preset.name if plan.preset else None,
            "template": plan.template,
            "enable_thinking": plan.enable_thinking,
            "resolved_args": manifest.redact_args(plan.lf_args + list(args.extra_args)),
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
        },
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--sftkit-extra" in argv:
        cut = argv.index("--sftkit-extra")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m sftkit plan", add_help=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-path")
    parser.add_argument("--dataset")
    parser.add_argument("--output-dir")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--template")
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--val-size")
    parser.add_argument("--save-every-minutes", type=float, default=DEFAULT_SAVE_EVERY_MINUTES)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--force-resume", action="store_true")
    parser.add_argument("--skip-invalid", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--deepspeed", type=Path, default=KIT_DIR / "ds_z3_config.json")
    parser.add_argument("--args-out", type=Path, required=True, help="file for the NUL-separated plan")
    parser.add_argument("--plan-out", type=Path, help="file for the supervisor's JSON plan record")
    parser.add_argument("seed_args", nargs=argparse.REMAINDER, help="-- then the seed's '--key value' defaults")
    args = parser.parse_args(argv)
    if args.seed_args and args.seed_args[0] == "--":
        args.seed_args = args.seed_args[1:]
    args.extra_args = extra
    return args


def check_deepspeed_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"DeepSpeed config {path} is missing: restore ds_z3_config.json from the kit") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{path}: invalid JSON ({err}): restore ds_z3_config.json from the kit") from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage != 3:
        raise PlanError(f"{path}: zero_optimization.stage is {stage!r}, the kit trains with ZeRO stage 3: set it to 3")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_deepspeed_config(args.deepspeed)
        plan = build_plan(args)
    except UsageError as err:
        one_line = str(err).replace("\r", "\\r").replace("\n", "\\n")  # a path may hold a newline
        print(manifest.redact_text(f"sft_train.sh: error: {one_line}"), file=sys.stderr)
        return 1
    try:
        print("\n".join(manifest.redact_text(line) for line in report_lines(plan, args.dry_run)), flush=True)
    except BrokenPipeError:  # `... --dry-run | head`: the reader has seen enough
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
    if args.plan_out is not None:
        args.plan_out.write_text(json.dumps(plan_record(plan, args), indent=1), encoding="utf-8")
    # torchrun's own rendezvous timeout: longer than the supervisor's, which gives up first with one clear line
    head = [str(plan.nproc_per_node), str(plan.nnodes), str(plan.node_rank), plan.master_addr, str(plan.master_port),
            f"timeout={plan.rendezvous_timeout + 60}"]
    args.args_out.write_bytes(b"".join(item.encode() + b"\0" for item in head + plan.lf_args))
    return 0
