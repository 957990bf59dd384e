"""sft_train.sh's options, checked here (one place), and the run resolved and started.

    python -m sftkit plan --sftkit-seed SEED_ARGS KIT_ARGS --sftkit-options [options] [-- extras]
                                                              (sft_train.sh execs this)

It picks the model, template, dataset and output folder, refuses what cannot work (one line each,
naming the path and the fix), resolves every LLaMA-Factory argument (the seed, the kit's and the
preset's settings, the user's extras after `--`) into one mapping, and prints the plan and the exact
torchrun command. A dry run also prints that mapping as train.yaml and writes nothing. A real run
goes on in this process as the supervisor (`sftkit.launch.supervise`), which writes
`<output_dir>/sftkit/train.yaml` and runs `torchrun ... -m sftkit.launch.worker <output_dir>/sftkit/train.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

from sftkit import hardware, models
from sftkit.files import KIT_DIR, UsageError, check_placeholder
from sftkit.launch import cost, manifest, preflight, runs
from sftkit.launch.lf_args import (
    apply_global_batch,
    eval_settings,
    parse_flag_values,
    refuse_kit_owned,
    seed_values,
    val_size,
)
from sftkit.launch.plan_data import check_run_data, describe_dataset, resolve_datasets
from sftkit.launch.run_record import (
    RENDEZVOUS_TIMEOUT_ENV,
    Plan,
    PlanError,
    plan_record,
    report_lines,
    resume_keys,
    torchrun_command,
    train_yaml_text,
    worker_env,
)

DEFAULT_SAVE_EVERY_MINUTES = 30.0
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

    seed, extras = seed_values(args.seed_args), parse_flag_values(args.extra_args, strict=True)
    refuse_kit_owned(extras)
    if getattr(args, "gpu_type", None):  # a GPU with no peak on record: refused before the data check (minutes)
        cost.gpu_for(args.gpu_type)
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
        "deepspeed": str(args.deepspeed.absolute()),
    }
    user = seed | extras  # what the user set: SEED_ARGS in the script, then the arguments after --
    if thinking is not None and "enable_thinking" not in user:  # else the data check may turn it on
        overrides["enable_thinking"] = str(thinking)
    notes = []
    if preset is not None and preset.overrides:
        overrides.update(preset.overrides)
        replaced = [f"{key} {seed[key]} -> {value}" for key, value in preset.overrides.items()
                    if key in seed and seed[key] != value and key not in extras]
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

    final = seed | overrides | extras
    eval_note = eval_settings(final, overrides, user, preset)
    global_batch_note = apply_global_batch(args, final, overrides, nproc * nnodes)
    final = seed | overrides | extras  # the user's extras win over what the kit derived
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


USAGE = """usage: bash sft_train.sh --model PRESET|DIR [options] [-- extra LLaMA-Factory arguments]

  --model PRESET|DIR   qwen3-8b, qwen3-14b, llama3.2-3b, demo, or a local model folder
  --model-path DIR     where the preset's weights are (default: the preset's hub id)
  --dataset NAME|FILE  a name in data/dataset_info.json, or a .json/.jsonl file; several: a.jsonl,b.json,name
  --val-size F         hold out a share F of the rows (or F rows): validation loss during training
  --output-dir DIR     where the adapter goes (default: saves/<Model>-lora)
  --gpus N             processes per node: --gpus, else the visible GPU count (4 on the target node)
  --template NAME      LLaMA-Factory template (default: the preset's, or from config.json)
  --global-batch N     derive gradient accumulation so micro-batch x GPUs x nodes x accumulation = N
  --save-every-minutes M
                       also save a checkpoint when M minutes passed since the last one (default 30, 0 off)
  --overwrite          replace an existing adapter in the output dir
  --force-resume       resume although the global batch, data or LoRA settings changed
  --skip-invalid       train without the rows the data check rejects (it says how many)
  --packing            pack rows to cutoff_len, not attending to each other (LLaMA-Factory's neat_packing)
  --gpu-type NAME      GPU for the time estimate where nvidia-smi shows none (a login node), e.g. H100
  --dry-run            check and print the plan, train.yaml and the command; train nothing
  -h, --help           this text

Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and run the same command on each node;
a node waits SFTKIT_RENDEZVOUS_TIMEOUT seconds (default 600) for the others, then gives up."""
# sft_train.sh's options: those taking a value (with the check of the value, where one applies), then switches
VALUE_OPTIONS = {
    "--model": None, "--model-path": None, "--dataset": None, "--output-dir": None,
    "--gpus": (int, r"[1-9][0-9]*", "is not a positive whole number"),
    "--template": None,
    "--global-batch": (int, r"[1-9][0-9]*", "is not a positive whole number"),
    "--save-every-minutes": (float, r"[0-9]+\.?[0-9]*|\.[0-9]+", "is not a number of minutes (0 turns it off)"),
    "--val-size": None, "--gpu-type": None,
}
FLAG_OPTIONS = ("--overwrite", "--force-resume", "--skip-invalid", "--packing", "--dry-run")


class OptionError(PlanError):
    """A malformed command line (exit status 2)."""


def parse_args(argv: list[str], seed_args: list[str] | None = None) -> argparse.Namespace:
    """sft_train.sh's options; its SEED_ARGS and KIT_ARGS come first, between --sftkit-seed and --sftkit-options."""
    if argv[:1] == ["--sftkit-seed"] and "--sftkit-options" in argv:
        cut = argv.index("--sftkit-options")
        seed_args, argv = argv[1:cut], argv[cut + 1:]
    args = argparse.Namespace(**{name[2:].replace("-", "_"): None for name in VALUE_OPTIONS},
                              **{name[2:].replace("-", "_"): False for name in FLAG_OPTIONS},
                              help=False, seed_args=list(seed_args or []), extra_args=[],
                              deepspeed=KIT_DIR / "ds_z3_config.json")
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in VALUE_OPTIONS:
            if index + 1 >= len(argv):
                raise OptionError(f"{arg} needs a value (see --help)")
            value, check = argv[index + 1], VALUE_OPTIONS[arg]
            if check is not None:
                if not re.fullmatch(check[1], value):
                    raise OptionError(f"{arg} '{value}' {check[2]}")
                value = check[0](value)
            setattr(args, arg[2:].replace("-", "_"), value)
            index += 2
        elif arg in FLAG_OPTIONS:
            setattr(args, arg[2:].replace("-", "_"), True)
            index += 1
        elif arg in ("-h", "--help"):
            args.help = True
            return args
        elif arg == "--":
            args.extra_args = argv[index + 1:]
            break
        else:
            raise OptionError(f"unknown option '{arg}' (LLaMA-Factory arguments go after '--'; see --help)")
    if not args.model:
        raise OptionError("--model is required: one of qwen3-8b, qwen3-14b, llama3.2-3b, demo, or a model folder")
    if args.save_every_minutes is None:
        args.save_every_minutes = DEFAULT_SAVE_EVERY_MINUTES
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


def _print(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `... --dry-run | head`: the reader has seen enough
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.help:
            return _print(USAGE)
        check_deepspeed_config(args.deepspeed)
        plan = build_plan(args)
    except UsageError as err:
        for message in err.args or ("",):  # one line each; a path may hold a newline
            one_line = str(message).replace("\r", "\\r").replace("\n", "\\n")
            print(manifest.redact_text(f"sft_train.sh: error: {one_line}"), file=sys.stderr)
        return 2 if isinstance(err, OptionError) else 1
    command = torchrun_command(plan)
    lines = report_lines(plan, args.dry_run)
    if args.dry_run:
        lines += [f"{plan.train_yaml.name}:"] + [f"  {line}" for line in train_yaml_text(plan).splitlines()]
    lines += ["command:", "  " + " ".join(shlex.quote(arg) for arg in manifest.redact_args(command))]
    if args.dry_run:
        lines.append("dry run: checks passed; nothing was trained or written")
    _print("\n".join(manifest.redact_text(line) for line in lines))
    if args.dry_run:
        return 0
    from sftkit.launch.supervise import supervise

    return supervise(plan_record(plan, args), command)
