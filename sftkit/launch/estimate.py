"""`python -m sftkit estimate`: per-GPU peak memory and FLOPs per token of a LoRA + ZeRO-3 run.

From the architecture alone (no weights) it models one training step as the kit runs it: LLaMA-Factory,
LoRA on every decoder linear (`lora_target: all`, not `lm_head`), bf16, DeepSpeed ZeRO-3, reentrant
gradient checkpointing per decoder layer, sdpa attention, lora_dropout 0.05, and optionally the Liger
kernels the presets turn on (fused linear cross-entropy, RMSNorm, SwiGLU). Tokens per GPU per
micro-batch: T = batch x cutoff_len (worst case: LLaMA-Factory pads to the longest in the batch).
Parts are always there (weight shard, LoRA state, fixed overhead) or belong to one of the phases,
which never coexist: "loss" (end of forward) and "layer_backward" (backward of the last layer), both
with every activation checkpoint alive, and, with a validation split (`eval_batch`), "eval": a
forward without gradients whose full-vocabulary logits Liger does not fuse (its fused loss covers
training only). per_gpu_bytes = always + the largest phase. Defaults are the seed's, read from
sft_train.sh's SEED_ARGS (`sftkit.seed`). First principles, to be calibrated on a GPU (issue 7).
Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from sftkit import hardware, seed
from sftkit.files import UsageError
from sftkit.models import Architecture, load_architecture

GIB = 2**30
# CUDA context + cuBLAS/NCCL workspaces ~1.5 GiB, allocator fragmentation ~2 GiB with the expandable-segments
# allocator (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which the launcher sets for the workers)
FIXED_OVERHEAD_BYTES = int(3.5 * GIB)
ASSUMED_GPU_BYTES = 80 * 10**9
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask (on CPU a bf16 noise tensor: 2)
# estimate argument -> the SEED_ARGS key it defaults to
SEED_KEYS = {"cutoff_len": "cutoff_len", "batch": "per_device_train_batch_size", "lora_rank": "lora_rank",
             "grad_accum": "gradient_accumulation_steps", "lora_dropout": "lora_dropout"}
ALWAYS = ("weights_shard", "lora_states", "fixed_overhead")
TRAINING = ("activation_checkpoints", "attention_mask")  # alive through the forward and backward of a step
PHASES = {
    "loss": (*TRAINING, "lm_head_gathered", "final_hidden_states", "logits_and_loss"),
    "layer_backward": (*TRAINING, "gathered_layer_params", "lm_head_held", "recomputed_layer_activations",
                       "backward_gradients"),
    "eval": ("lm_head_gathered", "eval_logits"),
}


class EstimateError(UsageError):
    """A user mistake: one clear line, no traceback."""


def _linears(arch: Architecture) -> list[tuple[int, int]]:
    """(in, out) of the decoder layer's linear layers: q, k, v, o, gate, up, down (no biases)."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def layer_params(arch: Architecture) -> int:
    """One decoder layer: its 7 linear weights, 2 RMSNorm weights, and Qwen3's q/k RMSNorms (head_dim each)."""
    norms = 2 * arch.hidden_size + (2 * arch.head_dim if arch.model_type == "qwen3" else 0)
    return sum(i * o for i, o in _linears(arch)) + norms


def total_params(arch: Architecture) -> int:
    """Embedding + layers + final norm + lm_head; a tied lm_head is the embedding, counted once."""
    embed = arch.vocab_size * arch.hidden_size
    lm_head = 0 if arch.tie_word_embeddings else embed
    return embed + arch.num_hidden_layers * layer_params(arch) + arch.hidden_size + lm_head


def lora_params(arch: Architecture, lora_rank: int) -> int:
    """PEFT's count for `lora_target: all`: A (r x in) + B (out x r) on each of the 7 linears per layer."""
    return arch.num_hidden_layers * sum(lora_rank * (i + o) for i, o in _linears(arch))


def lora_flops_per_token(arch: Architecture, lora_rank: int, seq_len: int) -> int:
    """Model FLOPs of one training token: 4 x frozen linear params + 6 x LoRA params + 3 x attention forward.

    A matmul costs 2 FLOPs per weight per token (multiply + add) in the forward pass. Backward
    costs 2 more for the input gradient and 2 more for the weight gradient. Frozen weights (decoder
    linears and lm_head; embeddings are a lookup) need no weight gradient, but their input
    gradient is still computed, since the LoRA weights below them need it: 2 + 2 = 4. LoRA weights
    get both: 2 + 2 + 2 = 6. Attention scores QK^T and the weighted sum AV each cost 2 x head_dim
    FLOPs per head per (query, key) pair; a causal query attends to seq/2 keys on average, so the
    forward is 4 x layers x heads x head_dim x seq/2 per token, and backward is twice that: 3x.
    Recomputation by gradient checkpointing is not counted (the MFU convention).
    """
    frozen = arch.num_hidden_layers * sum(i * o for i, o in _linears(arch)) + arch.vocab_size * arch.hidden_size
    attention_forward = 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * seq_len // 2
    return 4 * frozen + 6 * lora_params(arch, lora_rank) + 3 * attention_forward


@dataclass(frozen=True)
class MemoryEstimate:
    breakdown: dict[str, int]  # named parts in bytes, per GPU
    peak_phase: str  # "loss" or "layer_backward"
    per_gpu_bytes: int  # always-there parts + the parts of the peak phase


def layer_activation_bytes_per_token(arch: Architecture, rank: int, liger: bool, dropout: bool,
                                     kv_repeated: bool) -> int:
    """Bytes per token that autograd saves while one decoder layer is recomputed for its backward (bf16 = 2).

    Autograd saves a matmul's input only when the weight needs a gradient: frozen linears and norm
    weights save nothing per token; the LoRA A matrices save what they multiply.
    Norms: HF RMSNorm saves an fp32 copy of its input (4h) and 1/rms (4); Liger's saves its bf16
    input, for the first norm the checkpoint itself, so 2h in all, + 1/rms. Qwen3's per-head q/k
    norms likewise save 4 (fp32) or 2 (Liger) bytes per q and k element, + 4 per head.
    LoRA: with dropout each of the 7 modules keeps its own dropped bf16 copy of its input (2) and
    the dropout mask (DROPOUT_MASK_BYTES); without, the A matrices save the normed inputs of q/k/v
    and of gate/up (2h each; o's input is the attention output, down's is the MLP product). Each A
    output (2r) is saved by B.
    Attention (sdpa / flash kernels: no seq x seq score matrix): q, k, v, the output (o_proj's input
    is a view of it) and the fp32 log-sum-exp per head. With a padding mask transformers repeats k
    and v to all heads before sdpa (no native GQA with a mask).
    MLP: SiLU's input (gate), SiLU(gate) and up (3 x 2I); Liger's SwiGLU keeps gate and up only. The
    product (2I) is saved by down's LoRA A when there is no dropout.
    """
    h, inter = arch.hidden_size, arch.intermediate_size
    heads, kv_heads = arch.num_attention_heads, arch.num_key_value_heads
    q, kv = heads * arch.head_dim, kv_heads * arch.head_dim
    norms = (2 * h if liger else 8 * h) + 2 * 4
    if arch.model_type == "qwen3":
        norms += (2 if liger else 4) * (q + kv) + 4 * (heads + kv_heads)
    per_input = 2 + DROPOUT_MASK_BYTES
    lora = 7 * 2 * rank + (per_input * (5 * h + q + inter) if dropout else 2 * h + 2 * h + 2 * inter)
    attention = 2 * q + 2 * 2 * (q if kv_repeated else kv) + 2 * q + 4 * heads
    mlp = (2 if liger else 3) * 2 * inter
    return norms + lora + attention + mlp


def seed_settings() -> dict[str, int | float]:
    """The seed's cutoff_len, micro-batch, LoRA rank, accumulation and dropout, from sft_train.sh."""
    return {name: seed.seed_number(key, float if name == "lora_dropout" else int) for name, key in SEED_KEYS.items()}


def estimate_peak_memory(arch: Architecture, *, gpus: int, nodes: int = 1, cutoff_len: int | None = None,
                         batch: int | None = None, lora_rank: int | None = None, liger: bool = True,
                         offload: bool = False, lora_dropout: float | None = None,
                         attn_implementation: str = "sdpa", eval_batch: int = 0,
                         packing: bool = False) -> MemoryEstimate:
    """Per-GPU peak memory of one ZeRO-3 LoRA training step; each term is documented where it is computed.

    Unset cutoff_len, batch, lora_rank and lora_dropout take the seed's values (sft_train.sh's SEED_ARGS),
    with the presets' Liger kernels and sdpa; `attn_implementation="flash_attention_2"` drops the padding
    mask. `eval_batch`: the per-device eval micro-batch of a run with a validation split (0: none).
    `packing`: neat packing, whose block-diagonal 4-D mask sdpa gets even at micro-batch 1.
    """
    defaults = seed_settings()
    cutoff_len = defaults["cutoff_len"] if cutoff_len is None else cutoff_len
    batch = defaults["batch"] if batch is None else batch
    lora_rank = defaults["lora_rank"] if lora_rank is None else lora_rank
    lora_dropout = defaults["lora_dropout"] if lora_dropout is None else lora_dropout
    world, tokens = gpus * nodes, batch * cutoff_len
    h, vocab, layers = arch.hidden_size, arch.vocab_size, arch.num_hidden_layers
    layer = layer_params(arch) + lora_params(arch, lora_rank) // layers  # one decoder layer with its LoRA
    masked = attn_implementation == "sdpa" and (batch > 1 or packing)  # padding or packs -> an explicit mask
    part: dict[str, int] = {}
    # ZeRO-3 partitions every bf16 weight across the world; offload_param keeps them in CPU memory instead.
    part["weights_shard"] = 0 if offload else 2 * total_params(arch) // world
    # LoRA, per parameter: bf16 weight 2 + fp32 master 4 + Adam m 4 + v 4 + fp32 grad 4 + bf16 grad 2 = 20
    # bytes, all partitioned by ZeRO-3 (LLaMA-Factory leaves trainable params in bf16 under ZeRO-3; the
    # optimizer holds the fp32 copy). Optimizer + parameter offload moves all of it to CPU.
    part["lora_states"] = 0 if offload else 20 * lora_params(arch, lora_rank) // world
    # Reentrant checkpointing keeps each decoder layer's bf16 input until its backward: L x T x h x 2.
    part["activation_checkpoints"] = layers * tokens * h * 2
    # One bool (batch, 1, seq, seq) mask for all layers when the micro-batch has padding (sdpa); none at batch 1.
    part["attention_mask"] = batch * cutoff_len**2 if masked else 0
    part["fixed_overhead"] = FIXED_OVERHEAD_BYTES
    # Loss phase. ZeRO-3 gathers the whole output projection (tied or not) for the logits, and keeps the
    # last decoder layer gathered: it is recomputed right after, within stage3_max_reuse_distance (1e9).
    part["lm_head_gathered"] = 2 * vocab * h + 2 * layer
    # The final norm's saved fp32 copy of the last layer's output (4h); Liger: its bf16 input (2h) + the
    # normed output alive during the fused loss (2h). The frozen lm_head saves nothing per token.
    part["final_hidden_states"] = tokens * h * 4
    if liger:
        # Fused linear cross-entropy: bf16 logits for chunks of rows (chunk x V ~ T x h, rounded up to a
        # power of two rows), the input gradient computed in the forward (T x h x 2) and fp32 losses.
        inc = -(-vocab // h)
        chunk = min(tokens, 1 << (-(-tokens // inc) - 1).bit_length())
        part["logits_and_loss"] = chunk * vocab * 2 + tokens * h * 2 + tokens * 4
    else:
        # Full logits: forward holds bf16 logits 2 + their fp32 upcast 4 + log-softmax 4 = 10 bytes per
        # (token, vocab) entry; the backward then holds the saved log-softmax 4 + its gradient 4 + the
        # logits' fp32 gradient 4 = 12 bytes, the peak (the bf16 logits are gone by then).
        part["logits_and_loss"] = 12 * tokens * vocab
    # Layer-backward phase. The layer being recomputed stays gathered through its backward (its reuse
    # distance is below stage3_max_reuse_distance 1e9) and the next one is prefetched: 2 layers in bf16.
    part["gathered_layer_params"] = 2 * 2 * layer
    # Liger's fused loss reads lm_head.weight inside the model's own forward, so DeepSpeed registers it as
    # an external parameter of the top-level module and frees it only with that module, after the whole
    # backward: the bf16 output projection stays gathered through every layer's backward (seen with
    # DeepSpeed 0.18.4 ZeRO-3 on CPU; without Liger, lm_head's own backward hook frees it first).
    part["lm_head_held"] = 2 * vocab * h if liger else 0
    # One layer's saved activations (see layer_activation_bytes_per_token) + the mask's bf16 additive
    # copy that sdpa makes and keeps for backward (batch x seq^2 x 2).
    per_token = layer_activation_bytes_per_token(arch, lora_rank, liger, lora_dropout > 0, kv_repeated=masked)
    part["recomputed_layer_activations"] = tokens * per_token + (2 * batch * cutoff_len**2 if masked else 0)
    # Gradients in flight: the residual stream's incoming and outgoing gradient (2 x 2h) and two
    # MLP-wide gradients at once (2 x 2I) per token, bf16.
    part["backward_gradients"] = tokens * (4 * h + 4 * arch.intermediate_size)
    # Eval phase (between steps: no checkpoints, no gradients). Liger fuses the loss only in training, so
    # eval builds the full logits of eval_batch x cutoff tokens: bf16 2 + the loss's fp32 upcast 4 + its
    # log-softmax 4 = 10 bytes per (token, vocab) entry, with the output projection gathered.
    part["eval_logits"] = 10 * eval_batch * cutoff_len * vocab
    phase_bytes = {name: sum(part[k] for k in keys) for name, keys in PHASES.items() if name != "eval" or eval_batch}
    peak_phase = max(phase_bytes, key=phase_bytes.__getitem__)
    return MemoryEstimate(part, peak_phase, sum(part[k] for k in ALWAYS) + phase_bytes[peak_phase])


def suggestions(arch: Architecture, settings: dict, gpu_bytes: int) -> list[dict]:
    """Changes that keep the global batch, cheapest first, cumulative, up to the first that fits (the last entry).

    Fused loss (if off; it is faster too), then a smaller micro-batch (a divisor) with the accumulation
    multiplied to match, then ZeRO-3 offload of optimizer and parameters to CPU (slow). The accumulation
    is `settings["grad_accum"]`, else the seed's."""
    rungs: list[tuple[list[str], dict]] = []  # (changes, estimate_peak_memory keyword arguments)
    kwargs, fused, smaller_batch = dict(settings), [], []
    accum = kwargs.pop("grad_accum", None) or seed_settings()["grad_accum"]
    if not kwargs["liger"]:
        kwargs["liger"], fused = True, ["enable_liger_kernel: True (fused loss)"]
        rungs.append((fused, dict(kwargs)))
    batch = settings["batch"]
    for smaller in (d for d in range(batch - 1, 0, -1) if batch % d == 0):
        kwargs["batch"] = smaller
        smaller_batch = [f"per_device_train_batch_size: {smaller}, gradient_accumulation_steps x{batch // smaller}"
                         f" ({accum} -> {accum * batch // smaller})"]
        rungs.append((fused + smaller_batch, dict(kwargs)))
    kwargs["offload"] = True
    rungs.append((fused + smaller_batch + ["ZeRO-3 offload_optimizer and offload_param to CPU"], dict(kwargs)))
    result = []
    for change, kwargs in rungs:
        estimate = estimate_peak_memory(arch, **kwargs)
        result.append({"change": "; ".join(change), "settings": {k: kwargs[k] for k in ("batch", "liger", "offload")},
                       "per_gpu_bytes": estimate.per_gpu_bytes, "fits": estimate.per_gpu_bytes <= gpu_bytes})
        if result[-1]["fits"]:
            break
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, no usage dump
        raise EstimateError(message)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _gigabytes(text: str) -> float:
    if not text.replace(".", "", 1).isdigit() or float(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of GB")
    return float(text)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m sftkit estimate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset, config.json, or model folder")
    parser.add_argument("--gpus", type=_positive, required=True, help="GPUs (processes) per node")
    defaults = seed_settings()
    for flag, default, text in (("--nodes", 1, "nodes"), ("--cutoff-len", defaults["cutoff_len"], "cutoff_len"),
                                ("--batch", defaults["batch"], "per-device micro-batch"),
                                ("--lora-rank", defaults["lora_rank"], "LoRA rank")):
        parser.add_argument(flag, type=_positive, default=default, help=f"{text} (default {default}, the seed's)")
    parser.add_argument("--eval-batch", type=int, default=0, metavar="N",
                        help="per-device eval micro-batch of a run with a validation split (default 0: no eval)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                        help="Liger kernels incl. fused loss (default: on for presets, as they run; off otherwise)")
    parser.add_argument("--gpu-memory-gb", type=_gigabytes, default=None, help="GB = 1e9 bytes (default: nvidia-smi)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(list(sys.argv[1:] if argv is None else argv))
        arch, source, preset_liger = load_architecture(args.model)
        dropout = seed_settings()["lora_dropout"]
    except UsageError as exc:
        print(f"estimate: {exc}", file=sys.stderr)
        return 2
    liger = args.liger if args.liger is not None else bool(preset_liger)
    liger_note = "set by the flag" if args.liger is not None else (
        "preset default" if preset_liger is not None else "launcher default for a local model; --liger to turn on")
    assumptions = [f"fused loss (Liger) {'on' if liger else 'off'}: {liger_note}",
                   f"every sequence {args.cutoff_len} tokens (worst case); bf16; ZeRO-3; gradient checkpointing; sdpa"
                   f"; lora_dropout {dropout:g}; fixed overhead {FIXED_OVERHEAD_BYTES / GIB:.1f} GiB (CUDA, NCCL, "
                   "allocator fragmentation with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, as the launcher "
                   "runs); unset sizes are the seed's (sft_train.sh SEED_ARGS)",
                   "per_gpu_bytes = always-there parts + the largest phase ('loss', 'layer_backward'"
                   + (f", 'eval' at eval micro-batch {args.eval_batch})" if args.eval_batch else ")")]
    if args.gpu_memory_gb is not None:
        gpu_bytes = int(args.gpu_memory_gb * 1e9)
    elif gpus := hardware.visible_gpus():  # the smallest visible GPU (CUDA_VISIBLE_DEVICES applied)
        gpu_bytes = min(gpu.memory_total_mib for gpu in gpus) * 2**20
        assumptions.append("GPU memory: the smallest visible GPU (nvidia-smi)")
    else:
        gpu_bytes = ASSUMED_GPU_BYTES
        assumptions.append("no GPU visible: assumed 80 GB per GPU (pass --gpu-memory-gb)")
    settings = {"gpus": args.gpus, "nodes": args.nodes, "cutoff_len": args.cutoff_len, "batch": args.batch,
                "lora_rank": args.lora_rank, "liger": liger, "offload": False, "lora_dropout": dropout,
                "eval_batch": args.eval_batch}
    estimate = estimate_peak_memory(arch, **settings)
    fits = estimate.per_gpu_bytes <= gpu_bytes
    report = {
        "model": source, "total_params": total_params(arch), "lora_params": lora_params(arch, args.lora_rank),
        "per_gpu_bytes": estimate.per_gpu_bytes, "breakdown": estimate.breakdown, "fits": fits,
        "suggestions": [] if fits else suggestions(arch, settings, gpu_bytes),
        "flops_per_token": lora_flops_per_token(arch, args.lora_rank, args.cutoff_len),
        "gpu_memory_bytes": gpu_bytes, "peak_phase": estimate.peak_phase,
        "phases": {"always": list(ALWAYS), **{k: list(v) for k, v in PHASES.items() if k != "eval" or args.eval_batch}},
        "settings": settings, "assumptions": assumptions,
    }
    print(json.dumps(report) if args.json else _human(report))
    return 0 if fits else 1


def _human(r: dict) -> str:
    s, spare = r["settings"], r["gpu_memory_bytes"] - r["per_gpu_bytes"]
    lines = [f"estimate: {r['model']}, {s['gpus']} GPU(s) x {s['nodes']} node(s), micro-batch {s['batch']}, "
             f"cutoff {s['cutoff_len']}, LoRA r{s['lora_rank']}: {r['lora_params'] / 1e6:.1f}M trainable of "
             f"{r['total_params'] / 1e9:.2f}B params", f"{'part (per GPU)':<32}{'GiB':>8}  when"]
    when = {k: ["always"] for k in ALWAYS}
    for phase, keys in r["phases"].items():
        for key in keys:
            when.setdefault(key, []).append(phase)
    for key, value in r["breakdown"].items():
        if key not in when:
            continue
        mark = "" if {"always", r["peak_phase"]} & set(when[key]) else " (not at peak)"
        lines.append(f"{key:<32}{value / GIB:>8.2f}  {'+'.join(dict.fromkeys(when[key]))}{mark}")
    lines += [f"{'peak per GPU':<32}{r['per_gpu_bytes'] / GIB:>8.2f}  during {r['peak_phase']}",
              f"{'GPU memory':<32}{r['gpu_memory_bytes'] / GIB:>8.2f}",
              f"fits: yes, {spare / GIB:.2f} GiB to spare" if r["fits"] else f"fits: no, {-spare / GIB:.2f} GiB short",
              f"FLOPs per token: {r['flops_per_token'] / 1e9:.1f}e9"]
    lines += [f"{'fits' if x['fits'] else 'not enough'}: {x['change']} -> {x['per_gpu_bytes'] / GIB:.2f} GiB"
              for x in r["suggestions"]]
    if r["suggestions"] and not r["suggestions"][-1]["fits"]:
        lines.append("nothing above fits: use a shorter --cutoff-len")
    lines += [f"assumes: {a}" for a in r["assumptions"]]
    return "\n".join(lines)
