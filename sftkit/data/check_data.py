"""`python -m sftkit check-data FILE|NAME[,FILE|NAME...] --model PRESET|DIR`: validate, tokenize once, report.

Every row of every dataset is validated first, streaming (`sftkit.data.validate`: each problem with its
file, line or row, field and fix). Then LLaMA-Factory's own preprocessing builds the dataset that
trains (`sftkit.data.tokenized`), and the token report is read from its columns (`sftkit.data.data_report`),
after truncation: a row that reaches cutoff_len is counted as over it. With a cache dir (the
launcher: `<output_dir>/sftkit`) the dataset is saved as `tokenized-<key>`, the `--tokenized_path`
training loads; a second check with the same inputs reads the report from it and tokenizes nothing.
Without one it is built in a temporary folder and deleted. LLaMA-Factory's `get_dataset` loads and
tokenizes the rows with `workers` processes (its preprocessing_num_workers; default: all cores).

Qwen3's hybrid template trains with enable_thinking false unless the data carries reasoning: when
answers hold a <think> block and enable_thinking was not set, the check turns it on and says so.

API (paths may be str or Path; `data` may be a comma-separated list or a list):

    check_dataset(data, model, *, model_path=None, template=None, enable_thinking=None, cutoff_len=None,
                  gpus=None, nodes=1, batch=None, grad_accum=None, lf_options=None, skip_invalid=False,
                  cache_dir=None, plot_dir=None, workers=None, max_problems=10, progress=False) -> dict
        `lf_options`: the run's LLaMA-Factory arguments ({key: value}, e.g. the launcher's final
        arguments): LLaMA-Factory's own dataclasses pick the data arguments (val_size, packing,
        mix_strategy, interleave_probs, train_on_prompt, mask_history, tool_format, ...).
        `template`, `enable_thinking` (None: decided by the template and the data) and `cutoff_len`
        win over `lf_options`. Unset cutoff_len/gpus/batch/grad_accum take the preset's override,
        else the seed's (sft_train.sh's SEED_ARGS). Raises a UsageError (one line) for a missing file or
        model, an unknown template, or arguments LLaMA-Factory refuses.
    run_check(...) -> CheckResult         the same, plus per trained row `.arrays` tokens and trainable
    tokenized_path(output_dir, key) -> Path     <output_dir>/sftkit/tokenized-<key>

Report (`--json`): per dataset in `datasets` (file, format, rows, invalid_rows, problems, data_file,
registration, ...) and in total (`rows` the sum; tokens, prompt/response tokens, over_cutoff,
train_rows, eval_rows, steps_per_epoch, enable_thinking, cache_key, tokenized_path, notes, ...; see
`sftkit.data.data_report`). Token figures are None when the preset's weights are not on this machine
(hub id only): then only the rows are checked. With token figures `check_dataset` adds the run's
cost (`sftkit.launch.cost`): `cost` (hours, fill, padding, packing, per layout) and `cost_lines` (time:,
fill:, packing:); `--epochs N` and `--gpu-type NAME` decide the time, `--packing` is neat_packing.
Exit status: 0 the data can train, 1 it cannot (problems listed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from sftkit import models, seed
from sftkit.data import build_lock, data_report, tokenized
from sftkit.data.data_report import CheckResult, failure_text, render, render_problems
from sftkit.data.validate import register, resolve_datasets, trainable, validate_file
from sftkit.files import KIT_DATA_DIR, TOKENIZER_FILES, UsageError, file_sha256
from sftkit.launch import cost
from sftkit.models import PRESETS


class CheckError(UsageError):
    """A usage error (missing file or model, bad option): one line that names the fix."""


# ---------------------------------------------------------------- cache keys


def tokenizer_fingerprint(model: str | Path) -> str:
    """A hash of the tokenizer files of a local model folder; `hub:<id>` for a hub id without local files."""
    folder = Path(model)
    if not folder.is_dir():
        return f"hub:{model}"
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cache_key(parts: Mapping[str, Any]) -> str:
    """16 hex characters over everything that decides the tokenized dataset (and the library versions)."""
    versions = {}
    for package in ("llamafactory", "transformers", "tokenizers", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    payload = json.dumps({**parts, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenized_path(output_dir: str | Path, key: str) -> Path:
    """Where the launcher keeps the tokenized dataset (`--tokenized_path`)."""
    return tokenized.folder(Path(output_dir) / "sftkit", key)


# ---------------------------------------------------------------- the check


def check_dataset(data: Any, model: str, *, epochs: float | None = None, gpu_type: str | None = None,
                  lora_rank: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """The report that `check-data --json` prints (see the module docstring for the arguments).

    With token figures it adds the run's cost (`sftkit.launch.cost`): `epochs` (default: the seed's), the GPU
    (`gpu_type`, else nvidia-smi's) and `lora_rank` (default: the seed's) decide the time line."""
    result = run_check(data, model, **kwargs)
    report = result.report
    arch = models.architecture(PRESETS.get(model), report["model"])
    if report["ok"] and report.get("tokens") and arch is not None and result.figures():
        lengths = result.arrays["tokens"]
        lengths = lengths if report["packing"] else lengths[:report["train_rows"]]
        shards = tokenizing_workers(kwargs.get("workers"), kwargs.get("lf_options"))  # packed per shard
        cost.add_cost(report, lengths, arch, gpu_type=gpu_type, shards=shards,
                      epochs=seed.seed_number("num_train_epochs", float) if epochs is None else epochs,
                      lora_rank=seed.seed_number("lora_rank") if lora_rank is None else lora_rank)
    return report


def run_check(data: Any, model: str, *, model_path: str | Path | None = None, template: str | None = None,
              enable_thinking: bool | None = None, cutoff_len: int | None = None, gpus: int | None = None,
              nodes: int = 1, batch: int | None = None, grad_accum: int | None = None,
              lf_options: Mapping[str, Any] | None = None, skip_invalid: bool = False,
              cache_dir: str | Path | None = None, plot_dir: str | Path | None = None, workers: int | None = None,
              max_problems: int = 10, progress: bool = False, data_dir: Path = KIT_DATA_DIR) -> CheckResult:
    """Validate `data`, build the tokenized dataset with LLaMA-Factory for `model`, and report."""
    sources = resolve_datasets(data, data_dir)
    options = {key: value for key, value in (lf_options or {}).items()
               if key not in ("enable_thinking", "template", "cutoff_len", "dataset", "dataset_dir")}
    choice = models.resolve(model, model_path and str(model_path), template or (lf_options or {}).get("template"),
                            weights=False)
    try:
        plan = data_report.plan_numbers(choice.preset, cutoff_len or (lf_options or {}).get("cutoff_len"), gpus, nodes,
                                        batch, grad_accum)
    except ValueError as err:
        raise CheckError(str(err)) from None
    options.update(template=choice.template, cutoff_len=plan["cutoff_len"])
    workers = tokenizing_workers(workers, lf_options)
    cache = Path(cache_dir) if cache_dir else None
    digests = [file_sha256(source.path) for source in sources]
    names = [source.name or f"sftkit_data_{number}" for number, source in enumerate(sources, 1)]
    options["dataset"] = ",".join(names)
    checks = None
    # a hub id only: the rows are checked, nothing is tokenized (a template other than the preset's, or a thinking
    # switch the user set, is checked in LLaMA-Factory's templates); nothing saved to load: rows that cannot train
    # fail before LLaMA-Factory loads (register() gives None for them)
    if choice.local_dir is None or cache is None or not any(cache.glob(f"{tokenized.PREFIX}*")):
        checks = [validate_file(source, max_problems, progress) for source in sources]
        can_train = trainable(checks, skip_invalid)
        # the preset's own template needs no LLaMA-Factory import: whether it has the switch is known (thinking None)
        own_template = choice.preset is not None and choice.template == choice.preset.template
        refusable = not own_template or (enable_thinking is not None and choice.thinking is None)
        if choice.local_dir is None and can_train and refusable:
            tokenized.check_template(choice.template, enable_thinking)
        if choice.local_dir is None or not can_train:
            entries = register(checks, names, digests, skip_invalid, cache)
            report = data_report.rows_report(checks, names, entries, choice, plan, enable_thinking, options, digests)
            return data_report.finish(data_report.CheckResult(report), plan, plot_dir, skip_invalid)
    lf_model, lf_data, lf_seed = tokenized.parse_arguments(str(choice.local_dir), options)
    tokenized.check_template(choice.template, enable_thinking)
    key = _cache_key({
        "data": [[digest, {k: v for k, v in (source.entry or {}).items() if k != "file_name"}]
                 for digest, source in zip(digests, sources, strict=True)],
        "tokenizer": tokenizer_fingerprint(choice.local_dir), "enable_thinking": enable_thinking,
        "lf": {**tokenized.key_fields(lf_model, lf_data, workers), "enable_thinking": None}, "seed": lf_seed,
    })
    notes = []
    fresh = [folder for folder in (cache, *cache.parents) if not folder.exists()] if cache else []
    lock = build_lock.BuildLock(tokenized.folder(cache, key)) if cache is not None else None
    while lock is not None:  # one builder at a time (other nodes on a shared filesystem wait, then load it)
        building = lock.wait_for_turn(lambda line: print(f"sftkit: {line}", file=sys.stderr, flush=True))
        stored, note = tokenized.load_cached(cache, key)
        notes += [note] if note else []
        if stored is not None:
            lock.release()
            stored.update(cached=True, tokenized_path=str(tokenized.folder(cache, key)))
            tokenized.prune(cache, key, keep=_in_use(stored))
            return data_report.finish(data_report.CheckResult(stored), plan, plot_dir, skip_invalid)
        if building:
            break
    try:
        quiet = tokenized.QuietLibraries(progress)
        work = tokenized.work_dir(cache)
        built = tokenized.partial(cache, key) if cache is not None else work / "tokenized"
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        if checks is None:  # the cache holds other keys only: the rows are validated now
            checks = [validate_file(source, max_problems, progress) for source in sources]
        entries = register(checks, names, digests, skip_invalid, cache or work)
        module = tokenized.load_tokenizer(lf_model) if entries else None
        report = data_report.rows_report(checks, names, entries, choice, plan, enable_thinking, options, digests,
                              temporary_copies=cache is None)
        report["cache_key"] = key
        report["notes"] = notes + report["notes"]
        if entries is None:
            return data_report.finish(data_report.CheckResult(report), plan, plot_dir, skip_invalid)
        if report["enable_thinking"] is not None:  # else LLaMA-Factory's default, as in training
            lf_data.enable_thinking = report["enable_thinking"]
        template_obj = tokenized.template(module, lf_data)
        dataset = tokenized.tokenize(entries, lf_model, lf_data, lf_seed, module, template_obj, workers, work, built)
        result = data_report.token_report(report, dataset, lf_data)
        if cache is not None:
            report["tokenized_path"] = str(tokenized.save(built, cache, key, report))
            tokenized.prune(cache, key, keep=_in_use(report))
        return data_report.finish(result, plan, plot_dir, skip_invalid)
    finally:
        if lock is not None:
            lock.release()
        quiet.restore()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(built, ignore_errors=True)  # a build that was not saved (renamed into place) whole
        for folder in fresh:  # a check that kept nothing leaves no new (empty) folder behind
            try:
                folder.rmdir()
            except OSError:
                break


def tokenizing_workers(workers: int | None, lf_options: dict[str, Any] | None) -> int:
    """The check's LLaMA-Factory preprocessing_num_workers (each packs its own shard): `workers`, else the
    run's preprocessing_num_workers, else every core."""
    return max(1, workers or int((lf_options or {}).get("preprocessing_num_workers") or 0) or _cores())


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _in_use(report: Mapping[str, Any]) -> set[str]:
    return {Path(part["data_file"]).name for part in report["datasets"] if part.get("data_file")}


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sftkit check-data",
        description="Validate datasets and build the tokens training will see (LLaMA-Factory's own preprocessing).",
    )
    parser.add_argument("data", metavar="FILE|NAME[,FILE|NAME...]",
                        help="a .json/.jsonl file or a name in data/dataset_info.json; several separated by commas")
    parser.add_argument("--model", required=True, metavar="PRESET|DIR", help=f"{', '.join(PRESETS)}, or a model folder")
    parser.add_argument("--model-path", metavar="DIR", help="where a preset's weights are")
    parser.add_argument("--template", help="LLaMA-Factory template (default: the preset's, or from config.json)")
    parser.add_argument("--enable-thinking", choices=("true", "false"),
                        help="default: false for qwen3, true when the answers carry <think> reasoning")
    parser.add_argument("--cutoff-len", type=int, metavar="N", help="default: the preset's, else the seed's")
    parser.add_argument("--gpus", type=int, metavar="N", help=f"processes per node (default: the preset's, else "
                                                               f"{seed.TARGET_GPUS})")
    parser.add_argument("--nodes", type=int, default=1, metavar="N")
    parser.add_argument("--batch", type=int, metavar="N", help="per-device batch (default: the preset's, else the "
                                                                "seed's)")
    parser.add_argument("--grad-accum", type=int, metavar="N", help="default: the preset's, else the seed's")
    parser.add_argument("--val-size", type=float, metavar="F", help="hold out this share (or count) of the rows")
    parser.add_argument("--mix-strategy", help="LLaMA-Factory's mix_strategy for several datasets (default concat)")
    parser.add_argument("--interleave-probs", metavar="P,P,...", help="LLaMA-Factory's interleave_probs")
    parser.add_argument("--packing", action="store_true",
                        help="LLaMA-Factory's neat_packing: rows packed to cutoff_len, not attending to each other")
    parser.add_argument("--epochs", type=float, metavar="N", help="for the time line (default: the seed's "
                                                                   "num_train_epochs)")
    parser.add_argument("--gpu-type", metavar="NAME", help="GPU for the time line, e.g. H100 (default: nvidia-smi's)")
    parser.add_argument("--train-on-prompt", action="store_true", help="as LLaMA-Factory's --train_on_prompt")
    parser.add_argument("--mask-history", action="store_true", help="as LLaMA-Factory's --mask_history")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid rows instead of failing")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument("--plot-dir", metavar="DIR", help="write token_lengths.png there")
    parser.add_argument("--cache-dir", metavar="DIR", help="keep the tokenized dataset (and a cleaned copy) there")
    parser.add_argument("--workers", type=int, metavar="N", help="processes for tokenizing (default: all cores)")
    parser.add_argument("--max-problems", type=int, default=10, metavar="N", help="problems listed (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    options: dict[str, Any] = {key: True for key in ("train_on_prompt", "mask_history") if getattr(args, key)}
    if args.packing:  # plain packing lets packed rows attend to each other (LLaMA-Factory #4744, #8277)
        options["neat_packing"] = True
    if args.epochs is not None and not args.epochs > 0:
        print(f"check-data: error: --epochs {args.epochs:g}: give a positive number of epochs", file=sys.stderr)
        return 2
    try:  # a GPU name with no peak on record is refused before any work
        cost.gpu_for(args.gpu_type) if args.gpu_type else None
    except cost.CostError as err:
        print(f"check-data: error: {err}", file=sys.stderr)
        return 2
    for key in ("val_size", "mix_strategy", "interleave_probs"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the tokenizer comes from disk
    saved_stdout = None
    if args.json:  # libraries print to stdout (LLaMA-Factory's logger does): send all of it to stderr
        sys.stdout.flush()
        saved_stdout = os.dup(1)
        os.dup2(2, 1)
    try:
        report = check_dataset(
            args.data, args.model, model_path=args.model_path, template=args.template, enable_thinking=thinking,
            cutoff_len=args.cutoff_len, gpus=args.gpus, nodes=args.nodes, batch=args.batch,
            grad_accum=args.grad_accum, lf_options=options, skip_invalid=args.skip_invalid,
            cache_dir=args.cache_dir, plot_dir=args.plot_dir, workers=args.workers,
            max_problems=max(0, args.max_problems), progress=not args.no_progress, epochs=args.epochs,
            gpu_type=args.gpu_type,
        )
    except UsageError as err:
        report, error = None, str(err)
    except OSError as err:  # an unreadable file, an unwritable --cache-dir or --plot-dir
        report, error = None, f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")
    except KeyboardInterrupt:
        report, error = None, "interrupted"
    finally:
        if saved_stdout is not None:
            sys.stdout.flush()
            os.dup2(saved_stdout, 1)
            os.close(saved_stdout)
    if report is None:
        if args.json:
            print(json.dumps({"ok": False, "error": error}))
        print(f"check-data: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0 if report["ok"] else 1
    if report["ok"]:
        print(render(report))
        if report["dropped_rows"]:
            where = ("LLaMA-Factory read " + ", ".join(p["data_file"] for p in report["datasets"] if p["data_file"])
                     if any(p["data_file"] for p in report["datasets"]) else "pass --cache-dir DIR to keep a copy")
            print(f"skipped:    {report['dropped_rows']} invalid rows dropped (--skip-invalid); {where}")
            print(render_problems(report))
        print("check-data: ok")
        return 0
    if report.get("rows_read"):
        print(render(report))
    print(failure_text(report), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
