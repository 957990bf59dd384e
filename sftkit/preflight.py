"""Checks before GPU hours are spent: bf16 support, GPU memory against the estimate, disk space.

`preflight(plan, dry_run)` returns the lines to print and raises PlanError for what would make
a real run fail. Memory: `sftkit.estimate.estimate_peak_memory` for the run's exact settings
against the smallest visible GPU's free memory (on a machine without GPUs, 80 GB is assumed and
said). Disk: every checkpoint holds the LoRA weights and their optimizer state, 16 bytes per
LoRA parameter (fp32 weight 4 + DeepSpeed's fp32 master 4 + Adam m 4 + v 4), kept as many times
as checkpoints are kept; plus the final adapter and, later, the merged model in bf16.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

from sftkit import estimate
from sftkit.plan import Plan, PlanError

GIB = 2**30
ASSUMED_GPU_BYTES = 80 * 10**9
CHECKPOINT_BYTES_PER_LORA_PARAM = 16


def _gpu_query(field: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _truthy(value: str | None) -> bool:
    return str(value).lower() in {"true", "1", "yes"}


def _architecture(plan: Plan) -> estimate.Architecture | None:
    if plan.preset is not None and plan.preset.architecture is not None:
        return plan.preset.architecture
    folder = Path(plan.model_name_or_path)
    if not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size")
    if config.get("model_type") and all(isinstance(config.get(k), int) for k in fields):  # no transformers import
        return estimate.Architecture(config["model_type"], *(config[k] for k in fields),
                                     bool(config.get("tie_word_embeddings", False)))
    try:
        return estimate.load_architecture(str(folder))[0]
    except estimate.EstimateError:
        return None


def _free_disk(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_bf16(plan: Plan, cpu: bool) -> str:
    if cpu or not _truthy(plan.final_args.get("bf16")):
        return "bf16:       not used"
    capabilities = _gpu_query("compute_cap")
    if not capabilities:
        return "bf16:       not checked (no GPU visible here)"
    lowest = min(float(c) for c in capabilities)
    if lowest < 8.0:
        raise PlanError(f"bf16 needs compute capability 8.0+ (A100, H100); this GPU has {lowest}: "
                        "train in fp16 instead (-- --bf16 False --fp16 True)")
    return f"bf16:       supported (compute capability {lowest})"


def check_memory(plan: Plan, arch: estimate.Architecture | None) -> list[str]:
    if arch is None:
        return ["memory:     not estimated (no architecture known for this model)"]
    final = plan.final_args
    settings = dict(gpus=plan.nproc_per_node, nodes=plan.nnodes, cutoff_len=int(final.get("cutoff_len", 2048)),
                    batch=int(final.get("per_device_train_batch_size", 1)),
                    lora_rank=int(final.get("lora_rank", 8)), liger=_truthy(final.get("enable_liger_kernel")),
                    offload=False, lora_dropout=float(final.get("lora_dropout", 0.0)))
    peak = estimate.estimate_peak_memory(arch, **settings).per_gpu_bytes
    free = [int(float(v)) * 2**20 for v in _gpu_query("memory.free")]
    if free:
        budget, where = min(free), "free on the emptiest-loaded GPU"
    else:
        budget, where = ASSUMED_GPU_BYTES, "assumed (80 GB GPUs; none visible here)"
    line = f"memory:     estimated peak {peak / GIB:.1f} GiB per GPU; {budget / GIB:.1f} GiB {where}"
    if peak <= budget:
        return [line + ": fits"]
    if os.environ.get("SFTKIT_MEMORY_CHECK") == "warn":  # the benchmark measures what the estimate predicts
        return [line + ": does NOT fit by the estimate (SFTKIT_MEMORY_CHECK=warn: launching anyway)"]
    options = estimate.suggestions(arch, settings, budget)
    fix = options[-1]["change"] if options else "fewer tokens per micro-batch"
    raise PlanError(f"estimated peak {peak / GIB:.1f} GiB per GPU exceeds {budget / GIB:.1f} GiB {where}: "
                    f"keep the global batch and change {fix} (python -m sftkit estimate shows the breakdown)")


def check_disk(plan: Plan, arch: estimate.Architecture | None) -> str:
    if arch is None or not plan.dataset_rows:
        return "disk:       not estimated"
    final = plan.final_args
    lora = estimate.lora_params(arch, int(final.get("lora_rank", 8)))
    world = plan.nproc_per_node * plan.nnodes
    global_batch = int(final.get("per_device_train_batch_size", 1)) * world * int(
        final.get("gradient_accumulation_steps", 1))
    steps = math.ceil(plan.dataset_rows / global_batch) * math.ceil(float(final.get("num_train_epochs", 1)))
    kept = math.ceil(steps / int(final.get("save_steps", 500)))
    if final.get("save_total_limit"):
        kept = min(kept, int(final["save_total_limit"]))
    need = kept * CHECKPOINT_BYTES_PER_LORA_PARAM * lora + 4 * lora + 2 * estimate.total_params(arch)
    free = _free_disk(plan.output_dir)
    line = (f"disk:       needs ~{need / GIB:.1f} GiB ({kept} checkpoint(s) of {16 * lora / GIB:.2f} GiB, the adapter, "
            f"the merged model later); {free / GIB:.1f} GiB free at {plan.output_dir}")
    if need > free:
        raise PlanError(line.removeprefix("disk:       ") + ": free space, or keep fewer checkpoints "
                        "(-- --save_total_limit 2)")
    return line


def preflight(plan: Plan) -> list[str]:
    cpu = plan.preset is not None and plan.preset.cpu
    arch = _architecture(plan)
    lines = [check_bf16(plan, cpu)]
    lines += ["memory:     CPU run: not checked"] if cpu else check_memory(plan, arch)
    lines.append(check_disk(plan, arch))
    return lines
