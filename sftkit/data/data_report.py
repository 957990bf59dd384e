"""The check's report: what validation found, the token figures of the tokenized dataset, and their text.

`rows_report` sums the per-file validation results (`sftkit.data.validate.FileCheck`) and settles the
thinking setting; `token_report` reads the figures from the columns of the dataset LLaMA-Factory
built (per trained row: input_ids, and labels that are not IGNORE_INDEX); `finish` adds what
depends on the call (the skip policy, steps per epoch for this world size, the histogram).
`render`, `render_problems` and `failure_text` are the terminal's view of it.

Report keys (`check-data --json`): ok, model, template, enable_thinking, thinking (set / template
default / from the data), cutoff_len, datasets (per dataset: file, dataset, layout, places, format,
rows_read, rows, invalid_rows, duplicate_rows, reasoning_rows, problems, problem_counts, data_file,
registration, sha256), and in total: file, rows_read, rows (the sum), invalid_rows, dropped_rows,
duplicate_rows, problems (each with its file), problem_counts, reasoning_rows, tokens ({p50, p90,
p99, max} per row as trained), prompt_tokens (masked), response_tokens (trained), total_tokens,
trainable_tokens, trainable_share, over_cutoff (rows that reach cutoff_len), over_cutoff_action,
no_trainable_tokens, train_rows, eval_rows, split_rows, val_size, packing, packed_sequences, gpus,
nodes, batch, grad_accum, world_size, rows_per_step, steps_per_epoch, cache_key, cached,
tokenized_path, plot, notes; with one dataset also its format, layout, places, data_file and
registration; with token figures and a known architecture `cost` and `cost_lines` (`sftkit.launch.cost`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit import seed
from sftkit.data import records, tokenized
from sftkit.data.validate import FileCheck
from sftkit.launch.cost import steps  # training's count of steps per epoch, also the run's cost
from sftkit.models import Preset


@dataclass
class CheckResult:
    report: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)  # numpy per trained row: tokens, trainable

    def figures(self) -> dict[str, Any]:
        """`arrays`; for a cached check (none kept) read from its saved dataset."""
        if not self.arrays and self.report.get("tokenized_path"):
            from datasets import load_from_disk

            saved = load_from_disk(self.report["tokenized_path"])
            tokens, trained = tokenized.row_figures(saved, self.report["packing"])
            self.arrays = {"tokens": tokens, "trainable": trained}
        return self.arrays


def plan_numbers(preset: Preset | None, cutoff_len: Any, gpus: int | None, nodes: int, batch: int | None,
                 grad_accum: int | None) -> dict[str, int]:
    """cutoff_len, gpus, nodes, batch, grad_accum: given, else the preset's override, else the seed's (a
    seed.SeedError when SEED_ARGS cannot be read, ValueError for a value that is not a positive number)."""
    overrides = preset.overrides if preset else {}
    plan = {
        "cutoff_len": int(first_set(cutoff_len, overrides.get("cutoff_len"), seed.seed_number("cutoff_len"))),
        "gpus": int(first_set(gpus, preset.default_gpus if preset else None, seed.TARGET_GPUS)),
        "nodes": int(first_set(nodes, 1)),
        "batch": int(first_set(batch, overrides.get("per_device_train_batch_size"),
                                seed.seed_number("per_device_train_batch_size"))),
        "grad_accum": int(first_set(grad_accum, overrides.get("gradient_accumulation_steps"),
                                     seed.seed_number("gradient_accumulation_steps"))),
    }
    for name, value in plan.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive number")
    return plan


def first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def rows_report(checks: list[FileCheck], names: list[str], entries: Mapping[str, dict] | None, choice: Any,
                plan: dict[str, int], enable_thinking: bool | None, options: Mapping[str, Any], digests: list[str],
                temporary_copies: bool = False) -> dict[str, Any]:
    """What validation found, per dataset and in total, and the thinking setting it implies."""
    parts = [check.summary() for check in checks]
    for part, check, name, digest in zip(parts, checks, names, digests, strict=True):
        entry = (entries or {}).get(name)
        if entry is not None and temporary_copies and check.invalid:
            entry = None  # the copy without the invalid rows was temporary
        part.update(data_file=entry["file_name"] if entry else None, registration=entry, sha256=digest)
    kinds = sum((Counter(part["problem_counts"]) for part in parts), Counter())
    report: dict[str, Any] = {
        "ok": False, "model": str(choice.local_dir or choice.path), "template": choice.template,
        "cutoff_len": plan["cutoff_len"],
        "datasets": parts, "file": ", ".join(part["file"] for part in parts),
        "problems": [item for part in parts for item in part["problems"]], "problem_counts": dict(kinds),
        "notes": [] if choice.local_dir else [
            f"no local tokenizer for {choice.path} (hub id only): the format and row checks ran, the token report is "
            "skipped; pass --model-path DIR for the full report"],
        "cached": False, "tokenized_path": None, "cache_key": None,
    }
    for key in ("rows_read", "rows", "invalid_rows", "duplicate_rows", "reasoning_rows"):
        report[key] = sum(part[key] for part in parts)
    report["fatal"] = any(part["fatal"] for part in parts)
    report["unreadable"] = any(part["unreadable"] for part in parts)
    if len(parts) == 1:
        report.update({key: parts[0][key] for key in ("dataset", "layout", "places", "format", "data_file",
                                                      "registration")})
    thinking, how = enable_thinking, "set"
    if thinking is None:
        thinking, how = choice.thinking, "template default"
        if thinking is False and report["reasoning_rows"]:
            thinking, how = True, "from the data"
            report["notes"].append(f"{report['reasoning_rows']} row(s) carry <think> reasoning in their answers: "
                                   "enable_thinking true, so training keeps and learns it (set enable_thinking false "
                                   "to drop it)")
    elif thinking is False and report["reasoning_rows"]:
        report["notes"].append(f"{report['reasoning_rows']} row(s) carry <think> reasoning, which the template drops "
                               "with enable_thinking false: train with enable_thinking true to keep it")
    report.update(enable_thinking=thinking, thinking=how, val_size=float(options.get("val_size") or 0),
                  packing=str(options.get("packing") or options.get("neat_packing")).lower() in ("true", "1"))
    return report


def token_report(report: dict[str, Any], dataset: Any, data_args: Any) -> CheckResult:
    """The token figures of the tokenized dataset (every split), from its columns."""
    tokens, trained = tokenized.row_figures(dataset, bool(data_args.packing))
    limit = data_args.cutoff_len  # LLaMA-Factory keeps one token back when packing
    total, trainable = int(tokens.sum()), int(trained.sum())
    action = f"truncated to cutoff_len {limit} tokens (counted: rows that reach it)"
    if data_args.packing:
        action = f"truncated to {limit} tokens (packing keeps one token back) before packing, none dropped"
    split_rows = {name: len(dataset[name]) for name in dataset}
    report.update({
        "tokens": percentiles(tokens), "prompt_tokens": percentiles(tokens - trained),
        "response_tokens": percentiles(trained), "total_tokens": total, "trainable_tokens": trainable,
        "trainable_share": round(trainable / total, 4) if total else None,
        "over_cutoff": int((tokens >= limit).sum()), "over_cutoff_action": action,
        "no_trainable_tokens": int((trained == 0).sum()), "effective_cutoff_len": limit, "split_rows": split_rows,
        "train_rows": split_rows.get("train", 0), "eval_rows": split_rows.get("validation", 0),
        "packed_sequences": split_rows.get("train") if data_args.packing else None,
        "lf_dropped_rows": None,
    })
    tokenized_rows = sum(split_rows.values()) if not data_args.packing else len(tokens)
    expected = report["rows"]
    if data_args.mix_strategy == "concat" and data_args.max_samples is None and tokenized_rows < expected:
        report["lf_dropped_rows"] = expected - tokenized_rows
        report["notes"].append(f"LLaMA-Factory's preprocessing dropped {expected - tokenized_rows} of {expected} rows "
                               "(turns that do not pair up)")
    return CheckResult(report, {"tokens": tokens, "trainable": trained})


def finish(result: CheckResult, plan: dict[str, int], plot_dir: str | Path | None, skip_invalid: bool) -> CheckResult:
    """Fill in what depends on this call only: the skip policy, the planned steps per epoch, the plot."""
    report = result.report
    report["skip_invalid"] = skip_invalid
    report["dropped_rows"] = report["invalid_rows"] if skip_invalid else 0
    report["ok"] = not report["fatal"] and (report["invalid_rows"] == 0 or skip_invalid)
    if "tokens" not in report:  # rows checked only (no tokenizer here, or the data cannot train)
        report.update(dict.fromkeys(("tokens", "prompt_tokens", "response_tokens", "total_tokens", "trainable_tokens",
                                     "trainable_share", "over_cutoff", "over_cutoff_action", "no_trainable_tokens",
                                     "packed_sequences", "split_rows")))
        val = report.get("val_size") or 0
        held = (int(val) if val >= 1 else math.ceil(report["rows"] * val)) if val and report["rows"] else 0
        report.update(eval_rows=held, train_rows=max(report["rows"] - held, 0))
    report.update(plan)
    world = plan["gpus"] * plan["nodes"]
    report["world_size"] = world
    report["rows_per_step"] = world * plan["batch"] * plan["grad_accum"]
    rows = report["packed_sequences"] if report.get("packing") and report["packed_sequences"] else report["train_rows"]
    report["steps_per_epoch"] = steps(rows, plan["batch"], world, plan["grad_accum"]) if report["ok"] else None
    report["plot"] = None
    if plot_dir is not None and report["ok"] and report.get("tokens"):
        report["plot"] = str(plot(result.figures(), report, Path(plot_dir)))
    return result


def percentiles(values: Any) -> dict[str, int] | None:
    import numpy as np

    if len(values) == 0:
        return None
    ordered = np.sort(np.asarray(values))
    size = len(ordered)

    def rank(q: float) -> int:  # nearest rank
        return int(ordered[max(0, math.ceil(q / 100 * size) - 1)])

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": int(ordered[-1])}


def plot(arrays: dict[str, Any], report: dict[str, Any], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, trained = arrays["tokens"], arrays["trainable"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token_lengths.png"
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.hist([tokens - trained, trained, tokens], bins=50, histtype="step", linewidth=1.5,
              label=["prompt (masked)", "response (trained)", "whole row"])
    limit = report.get("effective_cutoff_len", report["cutoff_len"])
    axes.axvline(limit, color="red", linestyle="--", label=f"cutoff_len {limit}")
    axes.set_xlabel(f"tokens per row as trained ({report['template']} template)")
    axes.set_ylabel("rows")
    axes.set_title(f"{', '.join(Path(p['file']).name for p in report['datasets'])}: {len(tokens)} rows, "
                   f"{report['over_cutoff']} at cutoff")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- text output


def render(report: dict[str, Any]) -> str:
    """The report as the terminal shows it."""
    lines = []
    for part in report["datasets"]:
        name = part["file"] + (f" (dataset {part['dataset']})" if part.get("dataset") else "")
        lines.append(f"data:       {name}: {part['layout']}, format {part['format']}, {part['rows_read']} rows read, "
                     f"{part['rows']} valid")
    thinking = report.get("enable_thinking")
    lines.append(f"model:      {report['model']} (template {report['template']}"
                 + (f", enable_thinking {str(thinking).lower()} ({report['thinking']})" if thinking is not None else "")
                 + ")")
    verdict = "will train" if report["ok"] else "valid"
    lines.append(f"rows:       {report['rows']} {verdict}; {report['invalid_rows']} invalid, "
                 f"{report['dropped_rows']} dropped, {report['duplicate_rows']} duplicates")
    if report.get("tokens"):
        for head, key, tail in (("tokens:     per row as trained ", "tokens", f"cutoff_len {report['cutoff_len']}"),
                                ("  prompt:   ", "prompt_tokens", "masked"),
                                ("  response: ", "response_tokens", "trained")):
            spread = report[key]
            lines.append(f"{head}p50 {spread['p50']}, p90 {spread['p90']}, p99 {spread['p99']}, max {spread['max']} "
                         f"({tail})")
        lines.append(f"cutoff:     {report['over_cutoff']} rows reach cutoff_len: {report['over_cutoff_action']}")
        lines.append(f"trainable:  {report['trainable_share']:.1%} of {report['total_tokens']} tokens; "
                     f"{report['no_trainable_tokens']} rows with no trainable token")
    if report.get("eval_rows"):
        lines.append(f"eval:       {report['eval_rows']} rows held out (val_size {report['val_size']:g}), "
                     f"{report['train_rows']} train")
    if report.get("steps_per_epoch") is not None:
        rows = report["packed_sequences"] if report.get("packing") else report["train_rows"]
        what = "packed sequences" if report.get("packing") else "rows"
        lines.append(f"steps:      {report['steps_per_epoch']} optimizer steps per epoch ({rows} {what}; "
                     f"{report['gpus']} GPUs x {report['nodes']} node(s) x batch {report['batch']} x grad-accum "
                     f"{report['grad_accum']} = {report['rows_per_step']} per step)")
    lines += report.get("cost_lines", [])
    if report.get("plot"):
        lines.append(f"plot:       {report['plot']}")
    if report.get("cached"):
        lines.append(f"cache:      {report['tokenized_path']}: identical data, tokenizer and settings (nothing "
                     "tokenized)")
    for note in report.get("notes", []):
        lines.append(f"note:       {note}")
    return "\n".join(lines)


def render_problems(report: dict[str, Any], limit: int | None = None) -> str:
    lines = []
    for item in report["problems"][:limit]:
        where = records.place_text(item.get("file", report["file"]), item)
        field_text = f" [{item['field']}]" if item.get("field") else ""
        lines.append(f"  {where}{field_text}: {item['message']}")
    counts = ", ".join(f"{kind} {count}" for kind, count in report["problem_counts"].items())
    if counts:
        lines.append(f"  counts: {counts}")
    return "\n".join(lines)


def failure_text(report: dict[str, Any]) -> str:
    """Why the data cannot train: the places, the counts per kind, and the fix."""
    shown, invalid = len(report["problems"]), report["invalid_rows"]
    if report.get("unreadable"):
        head = f"{report['file']}: cannot be read as a dataset"
        fix = ("fix the file at the place shown (a JSON array cannot be skipped row by row; JSON lines can, "
               "with --skip-invalid)")
        if report["problems"] and report["problems"][0]["kind"] == "empty_file":
            fix = "give a .json array or .jsonl file with at least one example"
    else:
        head = f"{report['file']}: {invalid} invalid rows of {report['rows_read']}"
        head += f" (first {shown} shown)" if shown < invalid else ""
        fix = ("no row is valid: is this the right file?" if report["rows"] == 0
               else "fix these rows, or pass --skip-invalid to drop them")
    return f"check-data: error: {head}:\n{render_problems(report)}\n{fix}"
