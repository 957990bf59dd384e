"""Checks before GPU hours are spent: the driver, bf16 support, GPU memory against the estimate, disk space.

`preflight(plan)` returns the lines to print and raises PreflightError for what would make a real run
fail. GPU facts come from `sftkit.hardware` for the GPUs this job was given (CUDA_VISIBLE_DEVICES
applied), and each line names them. Driver: the NVIDIA driver must be new enough for the CUDA
build of the installed torch. Memory: `sftkit.launch.estimate.estimate_peak_memory` for the run's exact
settings against the visible GPU with the least free memory (on a machine without GPUs, 80 GB is
assumed and said; SFTKIT_MEMORY_CHECK=warn launches anyway). Disk: every checkpoint holds the LoRA
weights and their optimizer state, 16 bytes per LoRA parameter (fp32 weight 4 + DeepSpeed's fp32
master 4 + Adam m 4 + v 4), times the checkpoints kept (`save_total_limit`; all of them when the
clock saves); plus the final adapter and, later, the merged model in bf16 (SFTKIT_DISK_CHECK=warn
launches anyway).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from sftkit import hardware, models
from sftkit.files import UsageError
from sftkit.launch import estimate
from sftkit.launch.cost import steps
from sftkit.launch.estimate import ASSUMED_GPU_BYTES, GIB

CHECKPOINT_BYTES_PER_LORA_PARAM = 16


class PreflightError(UsageError):
    """What would make the run fail on this machine: one line (the launcher prints it as its error)."""


class RunFacts(Protocol):
    """The plain values preflight reads (sftkit.launch.run_record.Plan has them); no import of the planner."""

    preset: Any
    model_name_or_path: str
    final_args: dict[str, str]
    nproc_per_node: int
    nnodes: int
    save_every_minutes: float
    dataset_rows: int | None
    output_dir: Path
    estimated_peak_bytes: int | None


def _truthy(value: str | None) -> bool:
    return str(value).lower() in {"true", "1", "yes"}


def _free_disk(path: Path) -> int:
    """Free space where `path` is, or will be: on its nearest existing ancestor."""
    return shutil.disk_usage(next(probe for probe in (path, *path.parents) if probe.exists())).free


def _no_gpu_facts() -> str:
    """Why the GPUs' facts are unknown: none visible, or no nvidia-smi to read them (the count came from torch)."""
    if shutil.which("nvidia-smi") or not hardware.visible_gpu_count():
        return "no GPU visible here"
    return "no nvidia-smi here to read the GPUs' facts"


def check_driver(gpus: list[hardware.Gpu], cpu: bool) -> str:
    cuda = hardware.torch_cuda_build()
    if cpu:
        return "driver:     CPU run: not checked"
    if not gpus:
        version = hardware.torch_version()
        torch_is = (f"the installed torch is built for CUDA {cuda}" if cuda else
                    "the installed torch is a CPU build" if version else "torch is not installed")
        return f"driver:     not checked ({_no_gpu_facts()}; {torch_is})"
    if cuda is None:
        raise PreflightError(f"the installed torch {hardware.torch_version()} is a CPU build: install the pinned "
                        "requirements (pip install -r requirements.txt) to train on GPUs")
    oldest = min((gpu.driver for gpu in gpus), key=hardware._version_tuple)
    problem = hardware.driver_problem(oldest, cuda)
    if problem:
        raise PreflightError(problem)
    return f"driver:     NVIDIA {oldest} runs torch's CUDA {cuda} build"


def check_bf16(plan: RunFacts, cpu: bool, gpus: list[hardware.Gpu]) -> str:
    if cpu or not _truthy(plan.final_args.get("bf16")):
        return "bf16:       not used"
    if not gpus:
        return f"bf16:       not checked ({_no_gpu_facts()})"
    weakest = min(gpus, key=lambda gpu: gpu.compute_capability)
    if weakest.compute_capability < 8.0:
        raise PreflightError(f"bf16 needs compute capability 8.0+ (A100, H100); {weakest.label} {weakest.name} has "
                        f"{weakest.compute_capability}: train in fp16 instead (-- --bf16 False --fp16 True)")
    return f"bf16:       supported (compute capability {weakest.compute_capability} or more)"


def check_memory(plan: RunFacts, arch: estimate.Architecture | None, gpus: list[hardware.Gpu]) -> list[str]:
    if arch is None:
        return ["memory:     not estimated (no architecture known for this model)"]
    final = plan.final_args
    settings = dict(gpus=plan.nproc_per_node, nodes=plan.nnodes, cutoff_len=int(final.get("cutoff_len", 2048)),
                    batch=int(final.get("per_device_train_batch_size", 1)),
                    lora_rank=int(final.get("lora_rank", 8)), liger=_truthy(final.get("enable_liger_kernel")),
                    offload=False, lora_dropout=float(final.get("lora_dropout", 0.0)),
                    eval_batch=(int(final.get("per_device_eval_batch_size", 8))
                                if float(final.get("val_size") or 0) > 0 else 0),
                    packing=_truthy(final.get("neat_packing")))
    peak = estimate.estimate_peak_memory(arch, **settings).per_gpu_bytes
    plan.estimated_peak_bytes = peak  # for the manifest's estimate
    if gpus:
        fullest = min(gpus, key=lambda gpu: gpu.memory_free_mib)
        budget = fullest.memory_free_mib * 2**20
        checked = hardware.describe(gpus)
        where = (f"free on {fullest.label}, the fullest of the GPUs this job was given: {checked}"
                 if len(gpus) > 1 else f"free on {checked}, the GPU this job was given")
    else:
        budget, where = ASSUMED_GPU_BYTES, "assumed (80 GB GPUs; none visible here)"
    line = f"memory:     estimated peak {peak / GIB:.1f} GiB per GPU; {budget / GIB:.1f} GiB {where}"
    if peak <= budget:
        return [line + ": fits"]
    if os.environ.get("SFTKIT_MEMORY_CHECK") == "warn":  # the benchmark measures what the estimate predicts
        return [line + ": does NOT fit by the estimate (SFTKIT_MEMORY_CHECK=warn: launching anyway)"]
    options = estimate.suggestions(arch, settings | {"grad_accum": int(final.get("gradient_accumulation_steps", 1))},
                                   budget)
    fix = options[-1]["change"] if options else "fewer tokens per micro-batch"
    raise PreflightError(f"estimated peak {peak / GIB:.1f} GiB per GPU exceeds {budget / GIB:.1f} GiB {where}: "
                    f"keep the global batch and change {fix} (python -m sftkit estimate shows the breakdown; "
                    "SFTKIT_MEMORY_CHECK=warn launches anyway)")


def check_checkpoints(plan: RunFacts, arch: estimate.Architecture | None) -> tuple[str, int]:
    """The `checkpoints:` line (what saves one, how many are kept), and how many the disk must hold at once."""
    final = plan.final_args
    strategy = str(final.get("save_strategy", "steps")).lower()
    steps_value = final.get("save_steps", "500")
    clock = plan.save_every_minutes > 0
    parts = [f"every {plan.save_every_minutes:g} min"] if clock else []
    if strategy == "steps":
        parts.append(f"every {steps_value} steps")
    elif strategy == "epoch":
        parts.append("every epoch")
    limit_value = str(final.get("save_total_limit", "None"))
    limit = int(limit_value) if limit_value.isdigit() else None  # None: all are kept
    step_saves = None  # step checkpoints over the run (None: unknown)
    if plan.dataset_rows and strategy == "steps" and str(steps_value).isdigit():
        per_epoch = steps(plan.dataset_rows, int(final.get("per_device_train_batch_size", 1)),
                          plan.nproc_per_node * plan.nnodes, int(final.get("gradient_accumulation_steps", 1)))
        total = math.ceil(per_epoch * float(final.get("num_train_epochs", 1)))  # as the HF Trainer's max_steps
        step_saves = math.ceil(total / max(int(steps_value), 1))
    what = " and ".join(parts) or "none during the run (save_strategy no, clock off)"
    if limit is not None:
        kept = limit if clock or step_saves is None else min(step_saves, limit)
    else:
        kept = step_saves or 1
    size = ""
    if arch is not None:
        size = f" x {_size(CHECKPOINT_BYTES_PER_LORA_PARAM * estimate.lora_params(arch, _lora_rank(plan)))}"
    keep = f"the newest {limit} kept ({kept}{size})" if limit is not None else (
        f"all kept (save_total_limit None: ~{kept}{size} by the steps alone, more by the clock)")
    return f"checkpoints: {what}; {keep}", kept


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _lora_rank(plan: RunFacts) -> int:
    return int(plan.final_args.get("lora_rank", 8))


def check_disk(plan: RunFacts, arch: estimate.Architecture | None, kept: int) -> str:
    if arch is None or not plan.dataset_rows:
        return "disk:       not estimated"
    lora = estimate.lora_params(arch, _lora_rank(plan))
    need = kept * CHECKPOINT_BYTES_PER_LORA_PARAM * lora + 4 * lora + 2 * estimate.total_params(arch)
    free = _free_disk(plan.output_dir)
    line = (f"disk:       needs ~{need / GIB:.1f} GiB ({kept} checkpoint(s) of "
            f"{CHECKPOINT_BYTES_PER_LORA_PARAM * lora / GIB:.2f} GiB, the adapter, the merged model later); "
            f"{free / GIB:.1f} GiB free at {plan.output_dir}")
    if need <= free:
        return line
    if os.environ.get("SFTKIT_DISK_CHECK") == "warn":  # the tests: their dry runs must not depend on this disk
        return line + ": does NOT fit (SFTKIT_DISK_CHECK=warn: launching anyway)"
    raise PreflightError(line.removeprefix("disk:       ") + ": free space, or keep fewer checkpoints "
                    "(-- --save_total_limit 2)")


def preflight(plan: RunFacts) -> list[str]:
    cpu = plan.preset is not None and plan.preset.cpu
    arch = models.architecture(plan.preset, plan.model_name_or_path)
    gpus = [] if cpu else hardware.visible_gpus()
    lines = [check_driver(gpus, cpu), check_bf16(plan, cpu, gpus)]
    lines += ["memory:     CPU run: not checked"] if cpu else check_memory(plan, arch, gpus)
    checkpoints, kept = check_checkpoints(plan, arch)
    lines += [checkpoints, check_disk(plan, arch, kept)]
    return lines
