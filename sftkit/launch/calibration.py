"""The run's estimate beside what it really took, in run_manifest.json: every real run is a calibration point.

At launch the plan records `estimate`: `sftkit.launch.cost`'s hours, GPU, assumed MFU, tokens and FLOPs per GPU
per epoch, and the memory estimate's peak per GPU. When the run ends the supervisor adds `measured`,
from what the run itself wrote and nothing else:

- `train_seconds`: LLaMA-Factory's train_results.json `train_runtime` (the Trainer's wall time of
  train(): steps, its evaluations and checkpoint saves; not model loading).
- `epochs`: the epochs this launch trained (train_results.json `epoch`, less the epoch of the
  checkpoint it resumed from).
- `tokens`: the data check's tokens per epoch (real tokens, padding not counted) x those epochs;
  `tokens_per_second_per_gpu` = tokens / train_seconds / GPUs.
- `mfu`: the estimate's FLOPs per GPU per epoch x epochs / train_seconds / the GPU's dense bf16 peak
  (the same FLOPs the estimate divides by its assumed MFU; none without a GPU peak).
- `peak_memory_per_gpu_bytes`: on a GPU, the largest torch.cuda.max_memory_allocated over the ranks,
  which each worker writes at the end of training (`write_peak_memory`); `peak_memory_by_rank` has
  them all. It leaves out the CUDA context and allocator slack that the estimate's fixed overhead
  includes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sftkit.launch import cost, runs

PEAK_DIR = "peak-memory"
GIB = 2**30


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def estimate_record(plan: Any) -> dict[str, Any]:
    """The manifest's `estimate` for a plan (sftkit.launch.run_record.Plan) whose data check ran."""
    figures = (plan.data_report or {}).get("cost")
    record: dict[str, Any] = {"peak_memory_per_gpu_bytes": getattr(plan, "estimated_peak_bytes", None),
                              "hours": None, "tokens": None}
    if not figures:
        record["why"] = "no token figures (no local tokenizer) or no architecture for this model"
        return record
    layout = figures[figures["planned"]]
    state = _json(Path(plan.resume_from) / "trainer_state.json") if plan.resume_from else None
    start = float((state or {}).get("epoch") or 0.0)
    remaining = max(figures["epochs"] - start, 0.0)
    record.update({
        "hours": None if layout["hours"] is None else layout["hours"] * remaining / figures["epochs"],
        "gpu": figures["gpu"], "peak_flops": figures["peak_flops"], "mfu_assumed": figures["mfu"],
        "mfu_source": cost.MFU_SOURCE, "epochs": figures["epochs"], "start_epoch": start,
        "packing": figures["planned"] == "packed", "tokens_per_epoch": layout["tokens"],
        "tokens": round(layout["tokens"] * remaining), "positions_per_epoch": layout["positions"],
        "flops_per_gpu_per_epoch": layout["flops"],
    })
    if layout["hours"] is None:
        record["why"] = "no dense bf16 peak for this machine (no GPU visible, or an unknown one)"
    return record


def write_peak_memory(output_dir: str) -> None:
    """Called by every worker at the end of training: its torch.cuda.max_memory_allocated (on a GPU only)."""
    import torch

    if not torch.cuda.is_available():
        return
    rank = int(os.environ.get("RANK", "0"))
    folder = Path(output_dir) / runs.KIT_SUBDIR / PEAK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "device": torch.cuda.get_device_name(), "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(), "time": time.time()}), encoding="utf-8")


def measured_record(out: Path, estimate: dict | None, world: int, since: float) -> dict[str, Any] | None:
    """The manifest's `measured`, from the run's own files; None when it wrote no train_results.json.

    `since`: when this launch started (peak-memory files older than that are an earlier launch's)."""
    results = _json(out / "train_results.json")
    if not results or not results.get("train_runtime"):
        return None
    estimate = estimate or {}
    seconds = float(results["train_runtime"])
    epochs = max(float(results.get("epoch") or 0.0) - float(estimate.get("start_epoch") or 0.0), 0.0)
    record: dict[str, Any] = {"train_seconds": seconds, "hours": seconds / 3600, "epochs": epochs, "tokens": None,
                              "tokens_per_second_per_gpu": None, "mfu": None, "peak_memory_per_gpu_bytes": None}
    if estimate.get("tokens_per_epoch"):
        record["tokens"] = round(estimate["tokens_per_epoch"] * epochs)
        record["tokens_per_second_per_gpu"] = record["tokens"] / seconds / world
    if estimate.get("flops_per_gpu_per_epoch") and estimate.get("peak_flops"):
        record["mfu"] = estimate["flops_per_gpu_per_epoch"] * epochs / seconds / estimate["peak_flops"]
    entries = (_json(path) for path in sorted((out / runs.KIT_SUBDIR / PEAK_DIR).glob("rank-*.json")))
    ranks = {str(entry.get("rank")): entry.get("max_memory_allocated") for entry in entries
             if entry and float(entry.get("time") or 0) >= since}
    if ranks:
        record["peak_memory_by_rank"] = ranks
        record["peak_memory_per_gpu_bytes"] = max(ranks.values())
    return record


def summary(estimate: dict | None, measured: dict) -> str:
    """One line: what the run took against what was estimated."""
    estimate = estimate or {}
    hours = f" (estimate {estimate['hours']:.3g} h at {estimate['mfu_assumed']:.0%} MFU, assumed)" if estimate.get(
        "hours") is not None else " (no time estimate)"
    parts = [f"sftkit: measured: trained {measured['train_seconds']:.0f} s = {measured['hours']:.3g} h{hours}"]
    if measured["tokens_per_second_per_gpu"] is not None:
        parts.append(f"{measured['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU")
    if measured["mfu"] is not None:
        parts.append(f"MFU {measured['mfu']:.1%}")
    if measured["peak_memory_per_gpu_bytes"] is not None:
        planned = estimate.get("peak_memory_per_gpu_bytes")
        parts.append(f"peak {measured['peak_memory_per_gpu_bytes'] / GIB:.1f} GiB allocated per GPU"
                     + (f" (estimate {planned / GIB:.1f} GiB with CUDA context and slack)" if planned else ""))
    return "; ".join(parts)
