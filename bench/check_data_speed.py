"""Benchmark (not a test): `check-data` against LLaMA-Factory's own preprocessing of the same file.

    python bench/check_data_speed.py                      # 100,000 generated rows
    python bench/check_data_speed.py --target-gb 1.05     # a file of at least 1 GB (memory figure)
    python bench/check_data_speed.py --target-gb 1.05 --skip-lf   # the check alone on the big file

Both sides run in fresh processes, after their imports, with the same tokenizer, template and
cutoff_len:
- check: `sftkit.check_data.run_check` (streaming read, validation, duplicates, LLaMA-Factory's
  converter + SupervisedDatasetProcessor per row) with all cores (`--workers`, default all).
- LLaMA-Factory: `llamafactory.data.get_dataset` (load the JSON, align, tokenize) with
  `preprocessing_num_workers` = the same number of cores, a fresh datasets cache and
  `overwrite_cache`, i.e. what the first training run does before its first step.
Reported: seconds (best of --repeat, the sides alternating), rows/s, MB/s, CPU seconds (main process
and workers), the ratio check/LF (the check must not be slower: ratio <= 1.0) and peak resident
memory (getrusage ru_maxrss of the main process, also right after the imports, and of the largest
worker process). Importing LLaMA-Factory (torch, transformers) alone takes ~1 GB resident.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent.parent
WORDS = ("the model reads every row of the data set and learns to answer questions about training runs with "
         "LoRA adapters on four GPUs while DeepSpeed shards optimizer states across ranks so that memory stays "
         "within limits and the loss goes down epoch after epoch until the adapter is merged").split()


def generate(path: Path, rows: int | None, target_bytes: int | None, layout: str, seed: int = 0) -> int:
    """Alpaca rows of varied length (some with system prompt and history); returns the row count."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    count, size = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        if layout == "array":
            out.write("[\n")
        while (rows is not None and count < rows) or (target_bytes is not None and size < target_bytes):
            row = {"instruction": text(4, 30), "input": text(0, 40) if rng.random() < 0.4 else "",
                   "output": text(8, 120)}
            if rng.random() < 0.2:
                row["system"] = text(3, 12)
            if rng.random() < 0.1:
                row["history"] = [[text(3, 15), text(5, 30)]]
            line = json.dumps(row, ensure_ascii=False)
            if layout == "array":
                line = ("" if count == 0 else ",\n") + line
            else:
                line += "\n"
            out.write(line)
            size += len(line)
            count += 1
        if layout == "array":
            out.write("\n]\n")
    return count


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_memory(cpu_start: float = 0.0) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"peak_rss_main_mb": round(own.ru_maxrss / 1024, 1),
            "peak_rss_largest_worker_mb": round(children.ru_maxrss / 1024, 1),
            "cpu_s": round(cpu_seconds() - cpu_start, 1)}


def measure_check(args: argparse.Namespace) -> dict:
    if not args.no_tokens:
        import llamafactory.data  # noqa: F401  (imported before the clock, as on the LLaMA-Factory side)

    from sftkit.check_data import run_check

    baseline = peak_memory()["peak_rss_main_mb"]
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    # --no-tokens: a preset whose tokenizer is not on this machine (empty HF cache): rows are read, validated
    # and hashed for duplicates, the token report is skipped
    model = "qwen3-8b" if args.no_tokens else args.model
    result = run_check(args.file, model, template=args.template, cutoff_len=args.cutoff_len, workers=args.workers)
    seconds = time.perf_counter() - start
    report = result.report
    assert report["ok"], report["problems"]
    assert (report["tokens"] is None) == args.no_tokens
    return {"seconds": seconds, "rows": report["rows"], "total_tokens": report.get("total_tokens"),
            "baseline_rss_mb": baseline, **peak_memory(cpu_start)}


def measure_lf(args: argparse.Namespace, workdir: Path) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from sftkit.data_formats import registration_entry

    # registered as the kit registers it for a run (the system and history columns named)
    entry = registration_entry(args.file, "alpaca", fields=("instruction", "input", "output", "system", "history"))
    (workdir / "dataset_info.json").write_text(json.dumps({"bench": entry}))
    lf_args = dict(stage="sft", do_train=True, model_name_or_path=args.model, template=args.template,
                   dataset="bench", dataset_dir=str(workdir), cutoff_len=args.cutoff_len,
                   output_dir=str(workdir / "out"), overwrite_cache=True, cache_dir=str(workdir / "hf-cache"),
                   preprocessing_num_workers=args.workers, report_to="none")
    if args.template == "qwen3":
        lf_args["enable_thinking"] = False
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    model_args, data_args, training_args, _, _ = get_train_args(lf_args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # LLaMA-Factory prints a training example
    try:
        dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    finally:
        sys.stdout = stdout
    seconds = time.perf_counter() - start
    train = dataset["train_dataset"]
    total = sum(len(ids) for ids in train["input_ids"])
    return {"seconds": seconds, "rows": len(train), "total_tokens": total, **peak_memory(cpu_start)}


def run_side(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--measure", side, "--file", str(args.file), "--model", args.model,
               "--template", args.template, "--cutoff-len", str(args.cutoff_len), "--workers", str(args.workers)]
    env = dict(os.environ, PYTHONPATH=str(KIT_DIR), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               LLAMAFACTORY_VERBOSITY="ERROR")
    empty_cache = tempfile.TemporaryDirectory(prefix="empty-hf-cache-")
    if args.no_tokens:
        command.append("--no-tokens")
        env["HF_HUB_CACHE"] = empty_cache.name
    with empty_cache:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--target-gb", type=float, help="generate at least this many GB instead of --rows")
    parser.add_argument("--layout", choices=("jsonl", "array"), default="jsonl")
    parser.add_argument("--model", help="model folder (default: saves/demo, built if missing)")
    parser.add_argument("--template", default="qwen3")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--file", type=Path, help="use this file instead of generating one")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; the best counts")
    parser.add_argument("--skip-lf", action="store_true", help="time the check only (no ratio)")
    parser.add_argument("--no-tokens", action="store_true",
                        help="the check without a tokenizer (validation, duplicates; no LLaMA-Factory side)")
    parser.add_argument("--measure", choices=("check", "lf"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        with tempfile.TemporaryDirectory(prefix="lf-bench-") as workdir:
            result = measure_check(args) if args.measure == "check" else measure_lf(args, Path(workdir))
        print(json.dumps(result))
        return 0

    if args.model is None:
        args.model = str(KIT_DIR / "saves" / "demo")
        if not (Path(args.model) / "tokenizer.json").is_file():
            subprocess.run([sys.executable, "-m", "sftkit", "build-demo-model", "--out", args.model], cwd=KIT_DIR,
                           check=True, env=dict(os.environ, PYTHONPATH=str(KIT_DIR)))
    generated = args.file is None
    if generated:
        handle, name = tempfile.mkstemp(prefix="check-data-bench-", suffix=f".{args.layout}".replace(".array", ".json"))
        os.close(handle)
        args.file = Path(name)
        target = int(args.target_gb * 1e9) if args.target_gb else None
        start = time.perf_counter()
        rows = generate(args.file, None if target else args.rows, target, args.layout)
        print(f"generated {rows:,} rows, {args.file.stat().st_size / 1e6:,.1f} MB in "
              f"{time.perf_counter() - start:.0f}s: {args.file}")
    try:
        print(f"model {args.model} (template {args.template}), cutoff_len {args.cutoff_len}, {args.workers} cores "
              f"for both sides (LLaMA-Factory: preprocessing_num_workers={args.workers}); best of {args.repeat}, "
              "sides alternating (the machine may be shared)")
        sides = ["check"] if args.skip_lf or args.no_tokens else ["check", "lf"]
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.repeat):
            for side in sides:
                runs[side].append(run_side(side, args))
        best = {side: min(results, key=lambda item: item["seconds"]) for side, results in runs.items()}
        size_mb = args.file.stat().st_size / 1e6
        for side, label in (("check", "check-data"), ("lf", "LLaMA-Factory")):
            if side not in best:
                continue
            item = best[side]
            extra = f" (after imports {item['baseline_rss_mb']:,.0f} MB)" if "baseline_rss_mb" in item else ""
            print(f"{label + ':':<15}{item['seconds']:8.1f} s  {item['rows'] / item['seconds']:9,.0f} rows/s  "
                  f"{size_mb / item['seconds']:6.2f} MB/s  CPU {item['cpu_s']:7.1f} s  peak RSS main "
                  f"{item['peak_rss_main_mb']:,.0f} MB{extra}, largest worker "
                  f"{item['peak_rss_largest_worker_mb']:,.0f} MB"
                  + ("  [no tokenizer: validation only]" if args.no_tokens else ""))
            if args.repeat > 1:
                times = ", ".join(f"{run['seconds']:.1f} s" for run in runs[side])
                print(f"{'':15}all runs: {times}")
        if "lf" not in best:
            return 0
        check, lf = best["check"], best["lf"]
        if (lf["rows"], lf["total_tokens"]) != (check["rows"], check["total_tokens"]):
            print(f"MISMATCH: LLaMA-Factory {lf['rows']} rows / {lf['total_tokens']} tokens, check "
                  f"{check['rows']} rows / {check['total_tokens']} tokens")
            return 1
        print(f"same rows ({check['rows']:,}) and tokens ({check['total_tokens']:,}) on both sides")
        ratio = check["seconds"] / lf["seconds"]
        print(f"ratio check/LLaMA-Factory = {ratio:.2f} wall ({'not slower' if ratio <= 1.0 else 'SLOWER'}), "
              f"{check['cpu_s'] / lf['cpu_s']:.2f} CPU time")
        return 0 if ratio <= 1.0 else 1
    finally:
        if generated and not args.keep:
            args.file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
