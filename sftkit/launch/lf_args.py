"""LLaMA-Factory arguments: `--key value` lists read into mappings, and the settings the
plan derives from them (val_size, the eval cadence, gradient accumulation from the global batch).
"""

from __future__ import annotations

import argparse

from sftkit.launch.run_record import PlanError
from sftkit.models import Preset

# LLaMA-Factory arguments the kit sets from its own options: after `--` they would be appended after the
# kit's values and win there, splitting the run (LLaMA-Factory writes elsewhere than the lock, manifest and
# resume state), or slip past a check (a ZeRO-2 config past the ZeRO-3 check). Key -> what to use instead.
KIT_OWNED = {
    "output_dir": "--output-dir DIR",
    "model_name_or_path": "--model PRESET|DIR and --model-path DIR",
    "template": "--template NAME",
    "dataset": "--dataset NAME|FILE[,...]",
    "dataset_dir": "--dataset FILE (registered for the run) or a name in data/dataset_info.json",
    "tokenized_path": "nothing: the kit tokenizes once into <output-dir>/sftkit/tokenized-* and reuses it",
    "deepspeed": "the kit's ds_z3_config.json (edit it; the kit trains with ZeRO-3)",
    "resume_from_checkpoint": "nothing: a relaunch resumes from the newest whole checkpoint by itself",
    "overwrite_output_dir": "--overwrite",
}
EVAL_EVERY_LOGS = 10  # eval loss at every 10th logged step: a curve of its own at a few percent of the run's time


def parse_flag_values(args: list[str], strict: bool = False) -> dict[str, str]:
    """`--key value` / `--key=value` pairs of an argument list (a bare `--flag` counts as True); `strict`:
    a stray word is refused."""
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
        elif strict:
            raise PlanError(f"{arg!r} after -- is not a LLaMA-Factory argument: give each as --key value")
        index += 1
    return values


def refuse_kit_owned(extras: dict[str, str]) -> None:
    """One line for each LLaMA-Factory argument after `--` that the kit sets from its own options."""
    owned = [key for key in extras if key in KIT_OWNED]
    if owned:
        raise PlanError(*[f"--{key} after -- is set by the kit, and the run would split: use {KIT_OWNED[key]} "
                          "instead (nothing was started)" for key in owned])


def seed_values(seed: list[str]) -> dict[str, str]:
    """SEED_ARGS and KIT_ARGS as `{key: value}`: each a `--key value` pair."""
    if len(seed) % 2 or not all(key.startswith("--") for key in seed[0::2]):
        bad = next((key for key in seed[0::2] if not key.startswith("--")), seed[-1] if seed else "")
        raise PlanError(f"sft_train.sh's defaults are malformed near {bad!r}: each default is '--key value'")
    return {key[2:]: value for key, value in zip(seed[0::2], seed[1::2], strict=True)}


def val_size(value: str) -> str:
    """--val-size as LLaMA-Factory's val_size takes it: a share in (0, 1) or a whole number of rows."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (0 < number < 1 or (number > 1 and number.is_integer())):
        raise PlanError(f"--val-size {value!r}: give a share of the rows between 0 and 1 (e.g. 0.05) or a number of "
                        "rows (e.g. 200)")
    return value


def eval_settings(final: dict[str, str], overrides: dict[str, str], user: dict[str, str],
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


def apply_global_batch(args: argparse.Namespace, final: dict[str, str], overrides: dict[str, str],
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
