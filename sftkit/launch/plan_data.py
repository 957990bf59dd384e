"""The run's data as the plan sees it: which datasets and how they are registered for the run, each
file's digest and rows, and the data check (sftkit.data.check_data) with the run's final arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from sftkit.data import validate
from sftkit.data.records import DataFileError, iter_records, place_text
from sftkit.files import KIT_DATA_DIR, check_placeholder, file_sha256
from sftkit.launch import runs
from sftkit.launch.run_record import Plan, PlanError
from sftkit.models import Preset

RUN_DATASET_NAME = "sftkit_run_data"


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


def check_run_data(plan: Plan, args: argparse.Namespace) -> None:
    """The data check of `python -m sftkit check-data`, with this run's final LLaMA-Factory arguments.

    It validates every row of every dataset, registers each file (the entry names only the columns
    it has), and builds the dataset that trains with LLaMA-Factory's own preprocessing: on a real
    run as the run's `tokenized-<key>` (its `tokenized_path`, so training tokenizes nothing,
    and a relaunch or a resume neither), on a dry run in a temporary folder, deleted (nothing
    written). Qwen3 with reasoning in the answers and no enable_thinking set: thinking is turned on.
    """
    from sftkit.data import check_data

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
        epochs=float(final.get("num_train_epochs", 3.0)), lora_rank=int(final.get("lora_rank", 8)),
        gpu_type=getattr(args, "gpu_type", None),
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
        plan.final_args["enable_thinking"] = str(report["enable_thinking"])  # the data carries reasoning
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
    cpu = plan.preset is not None and plan.preset.cpu  # the time line is for GPUs
    plan.checks += [line for line in report.get("cost_lines", []) if not (cpu and line.startswith("time:"))]
    for note in report.get("notes", []):
        plan.notes.append(f"data: {note}")
    if report.get("tokenized_path"):
        plan.final_args["tokenized_path"] = report["tokenized_path"]


def describe_dataset(plan: Plan) -> None:
    """SHA-256 and row count of each data file (registered or named) for the manifest and the resume check."""
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
