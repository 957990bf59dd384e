"""Prove that a merged model is base + adapter, and that it stops and thinks the way it was trained.

    python -m sftkit verify-merge --base saves/demo --adapter saves/demo-lora --merged saves/demo-merged [--json]
        [--behaviour auto|always|never] [--device cpu|cuda]

Checks the adapter's tensors, the streamed weights proof (sftkit.merge.merge_proof), the behaviour check where it
fits (sftkit.merge.merge_behaviour), the merged folder's EOS and thinking default against the run's template, and that
its chat template gives training's token ids (sftkit.merge.served_template).
A problem of kind `defect` proves the merge wrong; `unverified` means a check could not run. Exit 0 only if
every check ran and held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import yaml

from sftkit.merge import merge_behaviour, merge_proof, served_template
from sftkit.merge.chat import MERGE_RECORD, check_eos_and_thinking, first_line, read_merge_record
from sftkit.merge.merge_proof import stored_dtype, tensor_index, weight_files

RUN_RECORD = "merge_model.yaml"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
REPORT_KEYS = """template enable_thinking template_source merged_dtype adapter_tensors lora_rank weights_proof
    behaviour max_abs_logit_diff max_abs_logit tolerance greedy_match differs_from_base max_abs_logit_diff_vs_base
    adapter_effect adapter_effect_in_merged eos_token eos_ok thinking_ok served_prompt served_prompt_ok""".split()


class Report(dict):
    def __init__(self, base: Path, adapter: Path, merged: Path):
        super().__init__(ok=False, base=str(base), adapter=str(adapter), merged=str(merged),
                         **dict.fromkeys(REPORT_KEYS), problems=[], notes=[])

    def problem(self, name: str, message: str, kind: str = "defect") -> None:
        self["problems"].append({"name": name, "message": message, "kind": kind})

    def note(self, message: str) -> None:
        self["notes"].append(message)


def run_record_path(adapter: Path) -> Path | None:
    """The run's merge_model.yaml: in the adapter folder, or beside a checkpoint-N in its run folder."""
    if (adapter / RUN_RECORD).is_file():
        return adapter / RUN_RECORD
    if CHECKPOINT_NAME.fullmatch(adapter.name) and (adapter.parent / RUN_RECORD).is_file():
        return adapter.parent / RUN_RECORD
    return None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read it as YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected 'key: value' lines, found {type(data).__name__}")
    return data


def training_setup(base: Path, adapter: Path, merged: Path, report: Report) -> None:
    """Fill template / enable_thinking from the run's record; flag a merge made with other settings."""
    run_path = run_record_path(adapter)
    try:
        run = read_yaml(run_path) if run_path else None
        merge_record = read_merge_record(merged)
    except ValueError as err:
        report.problem("bad-record", str(err))
        return
    if run is not None and run.get("template"):
        report.update(template=run["template"], enable_thinking=run.get("enable_thinking"),
                      template_source=str(run_path))
        recorded = Path(str(run.get("model_name_or_path", "")))
        if recorded.is_dir() and recorded.resolve() != base.resolve():
            report.note(f"{run_path} names base model {recorded}, not --base {base}")
    elif merge_record is not None and merge_record.get("template"):
        report.update(template=merge_record["template"], enable_thinking=merge_record.get("enable_thinking"),
                      template_source=str(merged / MERGE_RECORD))
        report.note(f"no {RUN_RECORD} in {adapter}: took the template from {merged / MERGE_RECORD}")
    else:
        from sftkit.models import template_for_model_dir

        found = template_for_model_dir(base) if (base / "config.json").is_file() else None
        if found is None:
            report.problem(
                "unknown-template",
                f"no {RUN_RECORD} in {adapter} and no {MERGE_RECORD} in {merged}, and {base}/config.json names "
                "no known family: cannot tell which end-of-turn token training used",
            )
            return
        report["template"], report["enable_thinking"] = found
        report["template_source"] = f"{base / 'config.json'} (model_type)"
        report.note(f"no run record: assumed the {found[0]} template from {base}/config.json")

    if merge_record is None:
        report.note(f"{merged} has no {MERGE_RECORD} (not merged by `python -m sftkit merge`)")
        return
    if merge_record.get("template") != report["template"]:
        report.problem(
            "template-mismatch",
            f"{merged / MERGE_RECORD}: merged with template {merge_record.get('template')!r}, but the run trained "
            f"with {report['template']!r} ({report['template_source']}): merge again with the run's template",
        )
    if report["enable_thinking"] is not None and merge_record.get("enable_thinking") != report["enable_thinking"]:
        report.problem(
            "thinking-mismatch",
            f"{merged / MERGE_RECORD}: merged with enable_thinking {merge_record.get('enable_thinking')!r}, "
            f"but the run trained with {report['enable_thinking']!r}: merge again with the run's setting",
        )


def readable_weights(folder: Path, stem: str, report: Report, absent: str, absent_message: str) -> dict | None:
    """The tensor index of the folder's `stem` safetensors files (headers read once per verify), or None after
    naming why they cannot be read."""
    files, errors = weight_files(folder, stem)
    for error in errors:
        report.problem("missing-shard", error)
    if errors:
        return None
    if not files:
        report.problem(absent, absent_message)
        return None
    bad: list[str] = []
    index = tensor_index(files, bad)
    for message in bad:
        report.problem("truncated-safetensors", message)
    return None if bad else index


def check_model_folder(folder: Path, role: str, report: Report) -> dict | None:
    if not (folder / "config.json").is_file():
        report.problem("no-config", f"--{role} {folder} has no config.json: pass the model folder itself")
        return None
    index = readable_weights(
        folder, "model", report, "no-weights",
        f"--{role} {folder} holds no model.safetensors (or sharded index): nothing to compare",
    )
    if index is not None and role == "merged":
        report["merged_dtype"] = stored_dtype(index)
    return index


def check_adapter(base: Path, adapter: Path, report: Report):
    """Every LoRA tensor PEFT expects is there, non-empty, the right shape, finite, trained: (its layout, its
    tensor index), else None."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        report.problem(
            "no-adapter-config",
            f"{adapter} has no adapter_config.json: pass the adapter folder training wrote (--output-dir) "
            "or one of its checkpoint-N folders",
        )
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        report.problem("bad-adapter-config", f"{config_path}: not valid JSON ({err})")
        return None
    if config.get("peft_type") != "LORA":
        report.problem(
            "bad-adapter-config", f"{config_path}: peft_type {config.get('peft_type')!r}, not a LoRA adapter"
        )
        return None
    report["lora_rank"] = config.get("r")

    saved = readable_weights(
        adapter, "adapter_model", report, "no-adapter-weights",
        f"{adapter} has no adapter_model.safetensors: the adapter was not saved",
    )
    if saved is None:
        return None

    try:
        layout = merge_proof.adapter_layout(base, adapter)
    except Exception as err:  # noqa: BLE001 - a config PEFT cannot apply to this base is a user error
        report.problem(
            "bad-adapter-config",
            f"{config_path}: PEFT cannot apply it to {base} ({type(err).__name__}: {first_line(err)})",
        )
        return None

    import torch

    expected = layout.expected_shapes
    report["adapter_tensors"] = len(saved)
    missing = sorted(set(expected) - set(saved))
    if missing:
        report.problem(
            "adapter-tensor-missing",
            f"{adapter}: {len(missing)} of {len(expected)} LoRA tensors that adapter_config.json implies are missing "
            f"(first: {missing[0]}): the adapter was saved incompletely; save it again from the run",
        )
    empty = sorted(name for name, stored in saved.items() if 0 in stored.shape)
    if empty:
        report.problem(
            "adapter-tensor-empty",
            f"{adapter}: {len(empty)} LoRA tensors hold no values (first: {empty[0]}, shape "
            f"{saved[empty[0]].shape}): a ZeRO-3 run saved its partitions, not the gathered weights",
        )
    wrong = sorted(name for name in set(expected) & set(saved)
                   if name not in empty and saved[name].shape != expected[name])
    if wrong:
        name = wrong[0]
        report.problem(
            "adapter-shape-mismatch",
            f"{adapter}: {len(wrong)} LoRA tensors have the wrong shape (first: {name} is {saved[name].shape}, "
            f"rank {config.get('r')} on this base needs {expected[name]}): adapter_config.json does not match the "
            "weights, or --base is another model",
        )
    nonfinite, zero_b, b_tensors = [], [], []
    for name in sorted(set(saved) - set(empty)):
        low, high = (float(x) for x in torch.aminmax(saved[name].rows().float()))  # NaN propagates
        if not (math.isfinite(low) and math.isfinite(high)):
            nonfinite.append(name)
        if ".lora_B." in name or ".lora_embedding_B" in name:
            b_tensors.append(name)
            if low == high == 0:
                zero_b.append(name)
    if nonfinite:
        report.problem(
            "adapter-not-finite", f"{adapter}: {len(nonfinite)} LoRA tensors hold NaN or inf (first: {nonfinite[0]})"
        )
    if zero_b:
        report.problem(
            "adapter-untrained",
            f"{adapter}: {len(zero_b)} of {len(b_tensors)} lora_B tensors are all zero, as PEFT initialises them "
            f"(first: {zero_b[0]}): those layers were never trained or were saved empty",
        )
    elif not b_tensors and not missing:
        report.problem("adapter-tensor-missing", f"{adapter}: the weights file holds no lora_B tensor at all")
    return None if missing or empty or wrong else (layout, saved)


def prove_weights(indexes: tuple[dict, dict, dict], merged: Path, layout: merge_proof.AdapterLayout,
                  report: Report) -> None:
    try:
        proof = merge_proof.prove(*indexes, layout, merged)
    except Exception as err:  # noqa: BLE001 - only memory is expected here; re-raised otherwise
        if not merge_behaviour.out_of_memory(err):
            raise
        report.problem("weights-unproven", f"the weights proof ran out of memory ({first_line(err)}): it needs a "
                       "few hundred MB of RAM, and address space for two shards at a time (under `ulimit -v`, "
                       "raise the limit)", kind="unverified")
        return
    report["weights_proof"] = proof.summary or None
    for name, message in proof.defects:
        report.problem(name, message)
    for name, message in proof.unproven:
        report.problem(name, message, kind="unverified")
    for note in proof.notes:
        report.note(note)


def load_tokenizer(base: Path, adapter: Path):
    from transformers import AutoTokenizer

    for folder in (base, adapter):
        with contextlib.suppress(Exception):  # try the next folder
            return AutoTokenizer.from_pretrained(str(folder))
    return None


def verify(base: Path, adapter: Path, merged: Path, device: str | None = None, behaviour: str = "auto") -> dict:
    """Run every check; `ok` only when no problem was found. `behaviour` and `device` steer the logits check."""
    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    report = Report(base, adapter, merged)
    for role, folder in (("base", base), ("adapter", adapter), ("merged", merged)):
        if not folder.is_dir():
            report.problem("missing-folder", f"--{role} {folder}: no such folder")
    if report["problems"]:
        return finish(report)

    training_setup(base, adapter, merged, report)
    base_index = check_model_folder(base, "base", report)
    merged_index = check_model_folder(merged, "merged", report)
    merged_ok = merged_index is not None
    layout, adapter_index = (check_adapter(base, adapter, report) if base_index is not None else None) or (None, None)
    if merged_ok and layout is not None:
        prove_weights((base_index, adapter_index, merged_index), merged, layout, report)
    tokenizer = load_tokenizer(base, adapter)
    if tokenizer is None:
        report.problem("no-tokenizer", f"neither {base} nor {adapter} holds a tokenizer transformers can load: "
                       "the behaviour and EOS checks need it; copy the base model's tokenizer files into "
                       f"{base}", kind="unverified")
        return finish(report)
    if merged_ok and layout is not None:
        merge_behaviour.check(base, adapter, merged, tokenizer, device, behaviour, report, base_index)
    if merged_ok or (merged / "tokenizer_config.json").is_file():
        merged_tokenizer = check_eos_and_thinking(tokenizer, merged, report)
        served_template.check(tokenizer, merged, report, merged_tokenizer)
    return finish(report)


def finish(report: Report) -> dict:
    report["ok"] = not report["problems"]
    return dict(report)


def proven_defects(report: dict) -> list[dict]:
    """The problems that prove the merge wrong (the others say a check could not run)."""
    return [problem for problem in report["problems"] if problem.get("kind", "defect") == "defect"]


def summary(report: dict) -> list[str]:
    """Human-readable lines for a report."""
    lines = [f"verify-merge: {'ok' if report['ok'] else 'FAILED'}: {report['merged']}"]
    proof = report["weights_proof"]
    if proof:
        lines.append(
            f"  weights: {'proven' if proof['ok'] else 'NOT base + adapter'}: {proof['lora_targets']} LoRA targets "
            f"(max |error| {proof['max_abs_error']:.3g}, {proof['max_error_over_tolerance']:.2g}x the "
            f"{report['merged_dtype']} tolerance at most), {proof['identical']} other tensors identical to the base; "
            f"{proof['gigabytes'] * 1000:.0f} MB read in {proof['seconds']:.1f} s"
        )
    if report["max_abs_logit_diff"] is not None:
        behaviour = report["behaviour"]
        lines.append(
            f"  logits vs base + adapter (PEFT, {behaviour['device']} {behaviour['dtype']}): max |diff| "
            f"{report['max_abs_logit_diff']:.3g}, tolerance {report['tolerance']:.3g} ({report['merged_dtype']} "
            f"weights, max |logit| {report['max_abs_logit']:.3g})"
        )
        lines.append(f"  greedy continuation: {'same' if report['greedy_match'] else 'different'}; differs from base: "
                     f"{'yes' if report['differs_from_base'] else 'NO'} (max |diff| "
                     f"{report['max_abs_logit_diff_vs_base']:.3g}; carries {report['adapter_effect_in_merged']:.0%} "
                     "of the adapter's effect)")
    if report["eos_token"] is not None:
        thinking = report["enable_thinking"]
        lines.append(
            f"  template {report['template']} (from {report['template_source']}): EOS {report['eos_token']} "
            f"{'ok' if report['eos_ok'] else 'WRONG'}"
            + ("" if thinking is None else f"; enable_thinking {str(thinking).lower()} "
               f"{'ok' if report['thinking_ok'] else 'WRONG'}")
        )
    lines += served_template.summary_line(report)
    lines += [f"  problem {p['name']}: {p['message']}" for p in report["problems"]]
    lines += [f"  note: {note}" for note in report["notes"]]
    return lines


@contextlib.contextmanager
def stdout_to_stderr():
    """Keep library chatter (also from C extensions) off stdout, which --json reserves for the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit verify-merge", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder (or one checkpoint-N)")
    parser.add_argument("--merged", type=Path, required=True, help="the merged model folder")
    parser.add_argument("--behaviour", choices=merge_behaviour.MODES, default="auto",
                        help="the logits check against base + adapter: auto (where it fits the memory at hand; "
                        "default), always, never. The weights proof always runs")
    parser.add_argument("--device", help="where the behaviour check computes (default: cuda, in bfloat16, if there "
                        "is a GPU, else cpu, in float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = parser.parse_args(argv)
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        try:
            report = verify(args.base, args.adapter, args.merged, args.device, args.behaviour)
        except Exception as err:  # noqa: BLE001 - one line, never a traceback
            report = Report(args.base, args.adapter, args.merged)
            report.problem("error", f"{type(err).__name__}: {first_line(err)}", kind="unverified")
            report = finish(report)
    if args.json:
        print(json.dumps(report, allow_nan=False, default=str))
    else:
        print("\n".join(summary(report)))
    return 0 if report["ok"] else 1

