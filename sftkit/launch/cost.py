"""What the run costs before it starts: hours on this node, how full each micro-step is, what packing does.

From the per-row token lengths the data check counted (LLaMA-Factory's own preprocessing), the run's
micro-steps are laid out as training lays them out, and their FLOPs summed:

- Rows are shuffled once with a fixed seed (numpy, seed 42: a stand-in for the sampler's own order,
  not the same order) and dealt to the ranks, `batch` rows per rank per micro-step.
- The collator pads each micro-batch to its longest row, rounded up to a multiple of 8
  (LLaMA-Factory's SFT workflow: `pad_to_multiple_of=8` when training); padded positions go
  through every linear layer, so they cost like tokens.
- A sequence of P positions costs P x `estimate.lora_flops_per_token(arch, rank, P)` (4 x frozen
  linear + lm_head params, 6 x LoRA params, 3 x the causal attention forward, per token; the
  derivation is in its docstring). With neat packing (`--packing`) the rows of a packed sequence do
  not attend to each other: the linear work covers all positions of the pack, the attention only
  each row with itself (what flash-attention's varlen kernels compute; sdpa, with LLaMA-Factory's
  4-D mask, computes the whole square and `sdpa_attention_factor` says how much more that is).
- The ranks wait for each other every micro-step (ZeRO-3 gathers each layer), so a micro-step takes
  as long as its busiest rank: hours = epochs x sum over micro-steps of the busiest rank's FLOPs /
  (the GPU's dense bf16 peak x MFU) / 3600.

MFU is an assumption, printed with its source (ASSUMED_MFU): gradient-checkpointing recompute is not
counted in the FLOPs, as the MFU convention has it, so its cost is inside the MFU. Packing uses
LLaMA-Factory's own `greedy_knapsack` per preprocessing batch of rows, as its packed processor does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sftkit import hardware
from sftkit.files import UsageError
from sftkit.launch.estimate import lora_flops_per_token, lora_params
from sftkit.models import Architecture

# Dense bf16 peak (no sparsity), FLOP/s, by the name nvidia-smi gives, most specific first (NVIDIA's data
# sheets: H100 SXM and H200 989.4 TFLOP/s, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362, A10 125).
GPU_PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12),
]
# NVIDIA NeMo AutoModel's performance summary, LoRA on DGX-H100 bf16, seq 4096 unpadded: Llama3 8B at 402
# model TFLOP/s per GPU (41% of 989), counted as 4 FLOPs per frozen weight per token as here. This kit
# recomputes the forward (gradient checkpointing, 2 more per weight): 41% x 4/6 = 27%.
ASSUMED_MFU = 0.27
MFU_SOURCE = ("assumed: NVIDIA NeMo AutoModel's LoRA Llama3-8B on H100, 402 TFLOP/s = 41% MFU, x 4/6 for "
              "the forward gradient checkpointing recomputes")
PAD_MULTIPLE = 8
SHUFFLE_SEED = 42
PACK_CHUNK_ROWS = 1000  # LLaMA-Factory's preprocessing_batch_size: each batch of rows is packed on its own


def steps(rows: int, batch: int, world: int, grad_accum: int) -> int:
    """Optimizer steps per epoch as the HF Trainer counts them under accelerate (even batches, no drop_last)."""
    if rows <= 0:
        return 0
    batches_per_rank = math.ceil(math.ceil(rows / batch) / world)
    return max(math.ceil(batches_per_rank / grad_accum), 1)


class CostError(UsageError):
    """A bad --gpu-type or --epochs: one line."""


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named `name` (nvidia-smi's name or a short one: 'H100'); None if unknown."""
    return next((peak for key, peak in GPU_PEAK_BF16_FLOPS if key.lower() in name.lower()), None)


def sequence_flops(arch: Architecture, lora_rank: int, rows: Sequence[int], positions: int) -> int:
    """FLOPs of one sequence of `positions` positions holding `rows` (one row unpacked; several packed).

    Linear work on every position; causal attention within each row (a row of n tokens: n x the
    per-token attention at n). One row padded to P: P x lora_flops_per_token(P), the padding attended too.
    """
    if len(rows) == 1:
        return positions * lora_flops_per_token(arch, lora_rank, positions)
    linear = lora_flops_per_token(arch, lora_rank, 0)
    return positions * linear + sum(n * (lora_flops_per_token(arch, lora_rank, n) - linear) for n in rows)


def pack(lengths: Sequence[int], capacity: int, shards: int = 1) -> list[list[int]]:
    """Rows packed as the data check's LLaMA-Factory preprocessing packs them: `shards` contiguous shards
    (one per worker, as `datasets.Dataset.shard(contiguous=True)` cuts them), each packed per batch of
    1000 rows with LLaMA-Factory's own greedy knapsack."""
    import numpy as np
    from llamafactory.data.processor.processor_utils import greedy_knapsack

    packs: list[list[int]] = []
    for shard in np.array_split(np.asarray(lengths), max(1, min(shards, len(lengths)))):  # sizes as `shard` cuts
        for start in range(0, len(shard), PACK_CHUNK_ROWS):
            packs += greedy_knapsack([int(n) for n in shard[start:start + PACK_CHUNK_ROWS]], capacity)
    return packs


def epoch_work(arch: Architecture, lora_rank: int, sequences: list[tuple[list[int], int]], batch: int,
               world: int) -> dict[str, Any]:
    """One epoch laid out in micro-steps: `sequences` are (rows, positions before padding) per trained sequence.

    Returns the busiest rank's FLOPs summed over micro-steps, the positions (padding included) and
    tokens over all ranks, the micro-steps, and the mean and largest positions per micro-batch.
    """
    import numpy as np

    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(sequences))
    critical = positions = tokens = micro_steps = micro_batches = largest = 0
    per_step = world * batch
    for start in range(0, len(order), per_step):
        step = [sequences[i] for i in order[start:start + per_step]]
        busiest = 0
        for rank in range(0, len(step), batch):
            micro = step[rank:rank + batch]
            width = math.ceil(max(length for _, length in micro) / PAD_MULTIPLE) * PAD_MULTIPLE  # the collator pads
            busiest = max(busiest, sum(sequence_flops(arch, lora_rank, rows, width) for rows, _ in micro))
            positions += width * len(micro)
            tokens += sum(sum(rows) for rows, _ in micro)
            largest = max(largest, width * len(micro))
            micro_batches += 1
        critical += busiest
        micro_steps += 1
    return {"flops": critical, "positions": positions, "tokens": tokens, "micro_steps": micro_steps,
            "mean_micro_batch_positions": positions / micro_batches if micro_batches else 0,
            "max_micro_batch_positions": largest}


def run_cost(arch: Architecture, lengths: Sequence[int], *, cutoff_len: int, batch: int, world: int,
             lora_rank: int, epochs: float, peak: float | None, packing: bool, mfu: float = ASSUMED_MFU,
             shards: int = 1) -> dict:
    """The cost of training `lengths` (tokens per row) as planned, and as neat-packed to cutoff_len.

    `packing`: the run packs (cutoff_len is the run's; each pack holds up to cutoff_len - 1 tokens and
    is padded to cutoff_len, as LLaMA-Factory does). Both layouts are returned: `planned` and `packed`.
    """
    rows_alone = [([int(n)], int(n)) for n in lengths]
    packs = [(rows, cutoff_len) for rows in pack(lengths, cutoff_len - 1, shards)]
    layouts = {"unpacked": epoch_work(arch, lora_rank, rows_alone, batch, world),
               "packed": epoch_work(arch, lora_rank, packs, batch, world)}
    for name, work in layouts.items():
        work["hours"] = epochs * work["flops"] / (peak * mfu) / 3600 if peak else None  # busiest rank's FLOPs
        work["padding_share"] = 1 - work["tokens"] / work["positions"] if work["positions"] else 0.0
        work["fill"] = work["mean_micro_batch_positions"] / (batch * cutoff_len)
        work["sequences"] = len(packs) if name == "packed" else len(rows_alone)
    layouts["packed"]["rows_per_sequence"] = len(lengths) / len(packs) if packs else 0.0
    layouts["packed"]["sdpa_attention_factor"] = sdpa_attention_factor(arch, lora_rank, packs)
    return {"planned": "packed" if packing else "unpacked", **layouts, "epochs": epochs, "mfu": mfu,
            "peak_flops": peak, "lora_params": lora_params(arch, lora_rank)}


def sdpa_attention_factor(arch: Architecture, lora_rank: int, packs: list[tuple[list[int], int]]) -> float:
    """How many times the packed FLOPs sdpa does: its 4-D mask makes it compute the whole P x P square."""
    model = sum(sequence_flops(arch, lora_rank, rows, positions) for rows, positions in packs)
    linear = lora_flops_per_token(arch, lora_rank, 0)
    square = sum(positions * linear + 2 * positions * (lora_flops_per_token(arch, lora_rank, positions) - linear)
                 for _, positions in packs)
    return square / model if model else 1.0


# ---------------------------------------------------------------- the report's figures and lines


def gpu_for(gpu_type: str | None) -> tuple[str | None, float | None]:
    """(GPU name, dense bf16 peak): --gpu-type NAME, else the first GPU nvidia-smi shows; (None, None) without one."""
    if gpu_type is not None:
        peak = gpu_peak_flops(gpu_type)
        if peak is None:
            raise CostError(f"--gpu-type {gpu_type!r}: no dense bf16 peak on record for it; give one of "
                            f"{', '.join(key for key, _ in GPU_PEAK_BF16_FLOPS)}")
        return gpu_type, peak
    gpus = hardware.visible_gpus()
    return (gpus[0].name, gpu_peak_flops(gpus[0].name)) if gpus else (None, None)


def add_cost(report: dict[str, Any], lengths: Sequence[int], arch: Architecture, *, lora_rank: int, epochs: float,
             gpu_type: str | None, shards: int = 1) -> None:
    """Fill report["cost"] (figures) and report["cost_lines"] (time:, fill:, packing:) for the planned run.

    Rows short against the cutoff (p99 at most half of it) and no packing: also `shorter`, neat packing
    to the shortest power of two (1024 or more) that holds two of the longest rows."""
    name, peak = gpu_for(gpu_type)
    world, batch, cutoff = report["gpus"] * report["nodes"], report["batch"], report["cutoff_len"]
    settings = dict(batch=batch, world=world, lora_rank=lora_rank, epochs=epochs, peak=peak, shards=shards)
    figures = run_cost(arch, lengths, cutoff_len=cutoff, packing=bool(report.get("packing")), **settings)
    longest = int(max(lengths)) if len(lengths) else 0
    shorter = max(1024, 1 << (2 * longest - 1).bit_length())
    if not report.get("packing") and report["tokens"]["p99"] * 2 <= cutoff and shorter < cutoff:
        figures["shorter"] = dict(run_cost(arch, lengths, cutoff_len=shorter, packing=True, **settings)["packed"],
                                  cutoff_len=shorter)
    for layout in figures.keys() & {"unpacked", "packed", "shorter"}:
        figures[layout]["steps_per_epoch"] = steps(figures[layout]["sequences"], batch, world, report["grad_accum"])
    figures["gpu"] = name
    report["cost"] = figures
    report["cost_lines"] = cost_lines(report, figures)


def duration(hours: float) -> str:
    """'~2.4 h', '~35 min', '~40 s'."""
    if hours >= 10:
        return f"~{hours:.0f} h"
    if hours >= 1:
        return f"~{hours:.1f} h"
    return f"~{hours * 60:.0f} min" if hours * 60 >= 1 else f"~{hours * 3600:.0f} s"


def _sdpa(layout: dict[str, Any]) -> str:
    factor = layout["sdpa_attention_factor"]
    if factor < 1.05:
        return ""
    later = f", {duration(layout['hours'] * factor)}" if layout["hours"] is not None else ""
    return (f" (with sdpa attention LLaMA-Factory's 4-D mask makes the kernel compute each pack's whole square: "
            f"~{factor:.1f}x these FLOPs{later}; flash-attention skips it)")


def cost_lines(report: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    planned = figures[figures["planned"]]
    gpus, nodes, cutoff = report["gpus"], report["nodes"], report["cutoff_len"]
    epochs = f"{figures['epochs']:g} epoch{'' if figures['epochs'] == 1 else 's'}"
    if planned["hours"] is None:
        why = (f"no dense bf16 peak on record for {figures['gpu']}" if figures["gpu"] else
               "no GPU visible here") + ": pass --gpu-type NAME (e.g. H100)"
        lines = [f"time:       not estimated ({why})"]
    else:
        on = f"{gpus} x {figures['gpu']}" + (f" x {nodes} nodes" if nodes > 1 else "")
        lines = [f"time:       {duration(planned['hours'])} ({planned['hours']:.3g} h) for {epochs} on {on} (at "
                 f"{figures['mfu']:.0%} MFU, {MFU_SOURCE}; {planned['flops'] / 1e15:.3g} PFLOP per GPU per epoch)"
                 + (_sdpa(planned) if figures["planned"] == "packed" else "")]
    lines.append(f"fill:       a micro-batch holds {planned['mean_micro_batch_positions']:,.0f} positions on average "
                 f"(largest {planned['max_micro_batch_positions']:,}) of the {report['batch'] * cutoff:,} (batch "
                 f"{report['batch']} x cutoff {cutoff}) the memory estimate plans for: {planned['fill']:.1%} full, "
                 f"{planned['padding_share']:.0%} of it padding")
    packed, unpacked = figures["packed"], figures["unpacked"]
    if figures["planned"] == "packed":
        lines.append(f"packing:    neat packing (rows do not attend to each other): {unpacked['sequences']} rows in "
                     f"{packed['sequences']} sequences of {cutoff}, ~{packed['rows_per_sequence']:.0f} rows each")
    elif "shorter" in figures:
        short = figures["shorter"]

        def option(layout: dict[str, Any], length: int) -> str:
            hours = f", {duration(layout['hours'])}" if layout["hours"] is not None else ""
            steps = f"{layout['steps_per_epoch']} optimizer step{'' if layout['steps_per_epoch'] == 1 else 's'}"
            return (f"{layout['sequences']} sequences of {length} (~{layout['rows_per_sequence']:.0f} rows each), "
                    f"{steps} per epoch{hours}")

        lines.append(
            f"packing:    rows are short against the cutoff (p99 {report['tokens']['p99']} of {cutoff}): micro-steps "
            f"run mostly empty. --packing (neat packing) would make {option(packed, cutoff)}{_sdpa(packed)}; "
            f"with --cutoff-len {short['cutoff_len']} too: {option(short, short['cutoff_len'])}{_sdpa(short)}. "
            f"The learning-rate schedule (warmup, decay) then runs over fewer steps "
            f"({math.ceil(packed['steps_per_epoch'] * figures['epochs'])} or "
            f"{math.ceil(short['steps_per_epoch'] * figures['epochs'])} instead of "
            f"{math.ceil(unpacked['steps_per_epoch'] * figures['epochs'])}), each carrying more rows: "
            "keep the rows per step with a smaller --global-batch, or retune learning_rate and warmup")
    return lines
