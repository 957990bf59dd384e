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
import json
import os
import socket
import sys
from pathlib import Path

from sftkit import hardware, manifest, models, preflight, runs
from sftkit.files import KIT_DIR, UsageError, check_placeholder
from sftkit.lf_args import apply_global_batch, eval_settings, merge_args, parse_flag_values, refuse_kit_owned, val_size
from sftkit.plan_data import check_run_data, describe_dataset, resolve_datasets
from sftkit.run_record import Plan, PlanError, plan_record, report_lines, resume_keys, worker_env

DEFAULT_SAVE_EVERY_MINUTES = 30.0
RENDEZVOUS_TIMEOUT_ENV = "SFTKIT_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600


# ---------------------------------------------------------------- hardware


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- output dir


def resolve_output_dir(args: argparse.Namespace, model_name: str, node_rank: int, rendezvous: str | None
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


def build_plan(args: argparse.Namespace) -> Plan:
    nnodes = _env_int("NNODES", 1)
    node_rank = _env_int("NODE_RANK", 0)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise PlanError(f"NODE_RANK={node_rank} with NNODES={nnodes}: NODE_RANK must be 0..{nnodes - 1}")
    master_addr = os.environ.get("MASTER_ADDR", "")
    if nnodes > 1 and not master_addr:
        raise PlanError(f"NNODES={nnodes} needs MASTER_ADDR: set it to the address of the node with NODE_RANK=0")
    # one node and no MASTER_PORT: a free port, taken last (the data check before it can take minutes)
    master_port = _env_int("MASTER_PORT", 29500 if nnodes > 1 else 0)
    rendezvous_timeout = _env_int(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)
    if args.save_every_minutes < 0:
        raise PlanError(f"--save-every-minutes {args.save_every_minutes:g}: give minutes >= 0 (0 turns it off)")

    seed_values, extras = parse_flag_values(args.seed_args), parse_flag_values(args.extra_args)
    refuse_kit_owned(extras)
    from_scratch = extras.get("train_from_scratch", "").lower() == "true"
    model = models.resolve(args.model, args.model_path, args.template,
                           weights=not from_scratch)
    model_path, model_name, template, thinking, preset = (model.path, model.name, model.template, model.thinking,
                                                          model.preset)
    dataset, dataset_dir, registration = resolve_datasets(args.dataset, preset)
    rendezvous = f"{master_addr or '127.0.0.1'}:{master_port}/{nnodes}"
    output_dir, resume_from, skipped = resolve_output_dir(args, model_name, node_rank,
                                                          rendezvous if master_port else None)
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
        overrides["val_size"] = val_size(args.val_size)
    if args.overwrite:
        overrides["overwrite_output_dir"] = "True"
    if args.packing:  # neat: packed rows do not attend to each other (plain packing does: LLaMA-Factory #4744, #8277)
        overrides["neat_packing"] = "True"
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
    eval_note = eval_settings(final, overrides, user, preset)
    global_batch_note = apply_global_batch(args, final, overrides, nproc * nnodes)
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
    plan.env_kit, plan.env_user = worker_env(os.environ)
    describe_dataset(plan)
    plan.universal_from = resume_from if saved_world is not None else None
    if resume_from:
        _check_resume_compatible(plan, args.force_resume)
    plan.checks += preflight.preflight(plan)
    check_run_data(plan, args)  # on a real run it caches its result, so only once all else passed
    if not plan.master_port:
        plan.master_port = free_port()
        plan.rendezvous = f"{plan.master_addr}:{plan.master_port}/{nnodes}"
    return plan


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
    parser.add_argument("--packing", action="store_true", help="LLaMA-Factory's neat_packing")
    parser.add_argument("--gpu-type", help="GPU for the time estimate where nvidia-smi shows none")
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
        for message in err.args or ("",):  # one line each; a path may hold a newline
            one_line = str(message).replace("\r", "\\r").replace("\n", "\\n")
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
