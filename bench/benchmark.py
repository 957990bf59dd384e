"""The benchmark of the kit's own training path: tokens/s per GPU, LoRA-MFU and peak memory per variant.

    bash bench/run.sh --preset qwen3-8b --seq-len 16384 --gpus 1     (a GPU node)
    bash bench/run.sh --preset demo                                   (CPU: proves the harness)

For a preset it writes a model folder with the preset's real architecture (config.json and the family's
genuine tokenizer, as `build-demo-model` writes it; no weights: LLaMA-Factory builds random
weights from the config with `train_from_scratch`, under ZeRO-3 already partitioned on the GPUs), and
a synthetic alpaca dataset whose every example is longer than the cutoff, so LLaMA-Factory's own
truncation makes each one exactly `seq_len` tokens. Then, for each variant, it runs
`bash sft_train.sh ... -- <variant flags>`: the real launcher, torchrun, `sftkit.launch.worker`,
LLaMA-Factory, DeepSpeed ZeRO-3 with the kit's JSON and LoRA r64 on all linear layers, for
warm-up + measured optimizer steps. `sftkit.launch.worker` adds `ThroughputCallback` when SFTKIT_BENCH_OUT
is set; it times each optimizer step and counts the non-pad tokens each rank feeds the model.

Every variant gets the same cutoff, micro-batch, accumulation and processes, and the same data, so
the global batch holds the same number of tokens (micro-batch x processes x accumulation x seq_len).
A variant that runs out of memory is reported `oom` with the estimator's prediction, one that
cannot run here `skipped` with the reason, any other failure `error` with the last error line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import TrainerCallback

from sftkit import seed
from sftkit.files import KIT_DIR

# ---------------------------------------------------------------- LoRA-MFU

def gpu_peak_flops(gpu_name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 peak FLOP/s, note) for a GPU name, from the kit's one table (sftkit.launch.cost); (None, why) when
    unknown."""
    from sftkit.launch import cost

    if not gpu_name or gpu_name == "cpu":
        return None, "no GPU: LoRA-MFU is defined against a GPU's dense bf16 peak"
    peak = cost.gpu_peak_flops(gpu_name)
    if peak is None:
        return None, (f"unknown GPU {gpu_name!r}: no dense bf16 peak on record (add it to "
                      "sftkit.launch.cost.GPU_PEAK_BF16_FLOPS)")
    return peak, None


def lora_mfu(flops_per_token: int, tokens_per_s_per_gpu: float | None, peak_flops: float | None) -> float | None:
    """LoRA model-FLOPs utilisation: the model FLOPs a GPU does per second over its peak.

    flops_per_token is `sftkit.launch.estimate.lora_flops_per_token` (4 x frozen linear + lm_head params,
    6 x LoRA params, 3 x causal attention forward; gradient-checkpointing recompute not counted).
    """
    if tokens_per_s_per_gpu is None or peak_flops is None:
        return None
    return flops_per_token * tokens_per_s_per_gpu / peak_flops


# ---------------------------------------------------------------- the callback (runs in each worker)


def count_non_pad_tokens(kwargs: dict) -> int:
    """Non-pad tokens in one micro-batch, from the inputs the model is called with.

    - attention_mask 2-D: non-zero entries (padding is 0; neat packing numbers sequences 1, 2, ...).
    - attention_mask 4-D (LLaMA-Factory's block-diagonal mask for neat packing without FA2): a token
      is real when it may attend to itself: diagonal True (bool) or 0 (additive float mask).
    - no mask (neat packing with FA2: the collator removed the padding first): every input id.
    """
    input_ids = kwargs.get("input_ids")
    mask = kwargs.get("attention_mask")
    if mask is None:
        return int(input_ids.numel()) if input_ids is not None else 0
    if mask.dim() == 2:
        return int((mask != 0).sum().item())
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype.is_floating_point:
        return int((diagonal == 0).sum().item())
    return int(diagonal.sum().item())


class ThroughputCallback(TrainerCallback):
    """Per optimizer step: wall time and non-pad tokens; at the end, peak GPU memory; one JSON file.

    Step i's time is from the end of step i-1 (or the start of step 0) to the end of step i, with
    CUDA synchronised at both ends, so it holds the data loading, forward, backward and optimizer.
    The first `warmup` steps (env SFTKIT_BENCH_WARMUP, default 2) are left out of the figures.
    At train end the ranks all-reduce their token counts (sum) and peaks (max) and rank 0 writes
    `path`. With SFTKIT_BENCH_EXIT=1 every rank then exits 0 at once: the random-weight adapter is
    not saved (saving under ZeRO-3 gathers the whole 16-bit model, which would dominate the run).
    """

    def __init__(self, path: str | os.PathLike, warmup: int | None = None, exit_when_done: bool | None = None):
        self.path = Path(path)
        self.warmup = int(os.environ.get("SFTKIT_BENCH_WARMUP", "2")) if warmup is None else warmup
        self.exit_when_done = (os.environ.get("SFTKIT_BENCH_EXIT") == "1") if exit_when_done is None \
            else exit_when_done
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._micro_tokens = 0
        self._last: float | None = None
        self._hook = None
        self.step_logs: list[dict] = []  # the trainer's logs of loss and grad_norm (logging_steps 1)

    # -- time and tokens
    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _count(self, module, args, kwargs) -> None:  # noqa: ARG002 - forward pre-hook signature
        self._micro_tokens += count_non_pad_tokens(kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._sync()
            self._last = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.step_times.append(now - (self._last if self._last is not None else now))
        self._last = now
        self.step_tokens.append(self._micro_tokens)
        self._micro_tokens = 0
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.step_logs.append({k: logs[k] for k in ("loss", "grad_norm") if k in logs})
        return control

    # -- the result
    def result(self, world_size: int, tokens_per_step: list[int], peaks: dict[str, int | None],
               gpu: str) -> dict:
        """The figures from the measured steps (after warm-up); tokens_per_step summed over ranks."""
        warm = min(self.warmup, max(len(self.step_times) - 1, 0))
        times, tokens = self.step_times[warm:], tokens_per_step[warm:]
        elapsed = sum(times)
        per_gpu = sum(tokens) / world_size / elapsed if elapsed > 0 and tokens else None
        return {
            "gpu": gpu,
            "world_size": world_size,
            "warmup_steps": warm,
            "measured_steps": len(times),
            "step_time_s": elapsed / len(times) if times else None,
            "tokens_per_step": (sum(tokens) / len(tokens)) if tokens else None,
            "tokens_per_s_per_gpu": per_gpu,
            "step_times_s": [round(t, 6) for t in self.step_times],
            "step_tokens": list(tokens_per_step),
            "step_logs": list(self.step_logs),
            **peaks,
        }

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        world, rank = 1, 0
        tokens = list(self.step_tokens)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            gpu = torch.cuda.get_device_name(torch.cuda.current_device())
        else:
            allocated = reserved = -1
            gpu = "cpu"
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            summed = torch.tensor(tokens, dtype=torch.int64, device=device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            peak = torch.tensor([allocated, reserved], dtype=torch.int64, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            tokens = [int(v) for v in summed.tolist()]
            allocated, reserved = (int(v) for v in peak.tolist())
        peaks = {"peak_allocated_bytes": allocated if allocated >= 0 else None,
                 "peak_reserved_bytes": reserved if reserved >= 0 else None}
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.result(world, tokens, peaks, gpu), indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
            print(f"sftkit bench: figures written to {self.path}", flush=True)
        if self.exit_when_done:
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return control


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    flags: dict[str, str]  # LLaMA-Factory flags on top of the kit's defaults (the preset)
    what: str
    needs_cuda: str | None = None  # why it cannot run without CUDA
    needs_module: str | None = None  # importable module it needs
    estimate_note: str | None = None  # where the estimator does not model the variant


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("seed", {}, "the seed's flags as they are (no preset changes)"),
    Variant("kit", {}, "the kit's defaults: the seed's flags with the preset's changes"),
    Variant("liger", {"enable_liger_kernel": "True"}, "fused linear cross-entropy + Liger RMSNorm/SwiGLU",
            needs_cuda="Liger's Triton kernels need a CUDA GPU", needs_module="liger_kernel"),
    Variant("fa2", {"flash_attn": "fa2"}, "FlashAttention-2 instead of sdpa",
            needs_cuda="FlashAttention-2 needs a CUDA GPU", needs_module="flash_attn"),
    # LLaMA-Factory packs into cutoff_len - 1 tokens: each example is seq_len - 1 tokens here (counted).
    Variant("packing", {"neat_packing": "True"}, "neat packing (block-diagonal attention between sequences)",
            estimate_note="estimate does not model neat packing's 4-D block-diagonal mask"),
    Variant("no_gc", {"disable_gradient_checkpointing": "True"}, "no gradient checkpointing",
            estimate_note="estimate assumes gradient checkpointing"),
    # Not in the defaults: with DeepSpeed 0.18.4 ZeRO-3 frees the frozen norm weights before the
    # recompute, and non-reentrant checkpointing's metadata check raises CheckpointError (seen on CPU).
    Variant("nonreentrant_gc", {"use_reentrant_gc": "False"}, "non-reentrant gradient checkpointing",
            estimate_note="estimate assumes reentrant gradient checkpointing"),
    Variant("unsloth_gc", {"use_unsloth_gc": "True"}, "Unsloth's checkpointing (checkpoints offloaded to CPU)",
            needs_cuda="Unsloth's checkpointing moves checkpoints to 'cuda'",
            estimate_note="estimate keeps the checkpoints on the GPU"),
)}
DEFAULT_VARIANTS = ("seed", "kit", "liger", "fa2", "packing", "no_gc", "unsloth_gc")

# LLaMA-Factory's defaults for flags a preset may change that the seed does not name.
LF_DEFAULTS = {"enable_liger_kernel": "False", "flash_attn": "auto", "neat_packing": "False",
               "disable_gradient_checkpointing": "False", "use_reentrant_gc": "True", "use_unsloth_gc": "False"}

# Flags the benchmark sets for every variant alike: the same work per step, no saving, short logs.
# (`cutoff_len`, the micro-batch, the accumulation and bf16 are added per run.)
BENCH_FIXED = {
    "train_from_scratch": "True",  # random weights from config.json: nothing to load
    "save_strategy": "no",
    "logging_steps": "1",
    "report_to": "none",
    "plot_loss": "False",
    "disable_tqdm": "True",
    "warmup_ratio": "0.0",
    "warmup_steps": "0",
    "seed": "42",
}
FIXED_KEYS = {"cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "max_steps",
              "num_train_epochs", "learning_rate", "ddp_backend", *BENCH_FIXED}


def seed_args(script: Path = KIT_DIR / "sft_train.sh") -> dict[str, str]:
    """The seed's defaults, read from sft_train.sh's SEED_ARGS (so an edit there applies here too)."""
    try:
        return seed.seed_args(script)
    except seed.SeedError as err:
        raise BenchError(str(err)) from None


class BenchError(Exception):
    """A user mistake or an unusable setup: one line, no traceback."""


@dataclass
class Settings:
    preset: str
    seq_len: int
    batch: int
    grad_accum: int
    gpus: int
    warmup: int
    steps: int
    cpu: bool


def variant_flags(variant: str, preset_overrides: dict[str, str], seed: dict[str, str], settings: Settings
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """(extra LLaMA-Factory flags for `sft_train.sh -- ...`, the resolved flags of the run).

    Every variant: the benchmark's fixed flags and sizes (same global batch for all). `seed` puts
    back the seed's value (or LLaMA-Factory's default) of every flag the preset changes that is not
    one of those; the others are the kit's defaults plus the variant's flags.
    """
    fixed = dict(BENCH_FIXED)
    fixed.update({
        "cutoff_len": str(settings.seq_len),
        "per_device_train_batch_size": str(settings.batch),
        "gradient_accumulation_steps": str(settings.grad_accum),
        "max_steps": str(settings.warmup + settings.steps),
        "bf16": "False" if settings.cpu else "True",
    })
    extra: dict[str, str] = {}
    if variant == "seed":
        for key in preset_overrides:
            if key not in FIXED_KEYS:
                extra[key] = seed.get(key, LF_DEFAULTS.get(key, ""))
                if extra[key] == "":
                    raise BenchError(f"the seed value of {key!r} (changed by preset {settings.preset}) is unknown")
    else:
        extra.update(VARIANTS[variant].flags)
    extra.update(fixed)
    resolved = {**LF_DEFAULTS, **seed, **preset_overrides, **extra}
    return extra, resolved


def plan_variants(names: list[str], preset_overrides: dict[str, str], seed: dict[str, str], settings: Settings,
                  cuda: bool, importable) -> list[dict]:
    """One entry per variant: name, extra flags, resolved flags, and a skip reason or None."""
    planned: list[dict] = []
    for name in names:
        variant = VARIANTS[name]
        extra, resolved = variant_flags(name, preset_overrides, seed, settings)
        skip = None
        if variant.needs_cuda and not cuda:
            skip = f"not applicable on CPU: {variant.needs_cuda}"
        elif variant.needs_module and not importable(variant.needs_module):
            skip = f"not applicable here: {variant.needs_module} is not importable"
        else:
            same = next((p["variant"] for p in planned if p["resolved"] == resolved and p["skip"] is None), None)
            if same is not None:
                skip = f"identical flags to variant {same!r} (the kit's defaults already include it)"
        planned.append({"variant": name, "extra": extra, "resolved": resolved, "skip": skip})
    return planned


def extra_args(flags: dict[str, str]) -> list[str]:
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


# ---------------------------------------------------------------- outcome of one run

OOM_PATTERNS = (
    r"CUDA out of memory",
    r"torch\.OutOfMemoryError",
    r"torch\.cuda\.OutOfMemoryError",
    r"\bOutOfMemoryError\b",
    r"CUBLAS_STATUS_ALLOC_FAILED",
    r"CUDA error: out of memory",
    r"NCCL.*[Oo]ut of memory",
    r"DefaultCPUAllocator: can't allocate memory",
)
ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|Killed|SIGKILL|signal \d+)")


def detect_oom(log: str) -> str | None:
    """The first line of the log that reports running out of memory, or None."""
    pattern = re.compile("|".join(OOM_PATTERNS))
    for line in log.splitlines():
        if pattern.search(line):
            return line.strip()[:300]
    return None


ROOT_CAUSE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b:?")


def error_reason(log: str, returncode: int | None) -> str:
    """The first exception a worker raised (the root cause), else the last line that looks like an error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    causes = [line for line in lines if ROOT_CAUSE.match(line) and "ChildFailedError" not in line]
    picked = [line for line in lines if ERROR_LINE.search(line) and "Traceback" not in line]
    why = causes[0] if causes else picked[-1] if picked else lines[-1] if lines else "no output"
    code = "timed out" if returncode is None else f"exit status {returncode}"
    return f"{code}: {why[:300]}"


PREFLIGHT_REFUSAL = re.compile(r"sft_train\.sh: error: (estimated peak .*)")


def classify(returncode: int | None, log: str, figures: dict | None) -> tuple[str, str | None]:
    """(status, reason): ok when the run finished and wrote its figures; oom; else error.

    A run the launcher's preflight refused because the estimate exceeds the GPU's free memory is
    `oom` too, but predicted, not measured: its reason says so."""
    oom = detect_oom(log)
    if oom is not None:
        return "oom", oom
    refused = PREFLIGHT_REFUSAL.search(log) if returncode != 0 else None
    if refused:
        return "oom", f"not run: the launcher's preflight predicts it does not fit: {refused.group(1)[:300]}"
    if returncode == 0 and figures is not None and figures.get("tokens_per_s_per_gpu"):
        return "ok", None
    if returncode == 0:
        return "error", "the run ended without the benchmark's figures (SFTKIT_BENCH_OUT not written)"
    return "error", error_reason(log, returncode)


# ---------------------------------------------------------------- the one-step check of a preset

CHECK_LOSS_RTOL = 0.02  # bf16 on a random-weight model: the fused and the plain loss agree to ~1e-3
CHECK_GRAD_RTOL = 0.10  # the LoRA gradient norm after one step (bf16 gradients, reduced over the ranks)


def first_step_check(results: list[dict]) -> tuple[bool, str]:
    """(passed, one line): the `kit` run (the preset's settings, Liger under ZeRO-3) against the `seed` run
    (no Liger) on the same random weights and batch: both ran, and step 1's loss and gradient norm agree.

    A fused loss fed an un-gathered (0-element) or stale lm_head fails or drifts at the first step: an
    all-zero lm_head gives ln(V) exactly, random init ~0.8 more, far outside CHECK_LOSS_RTOL."""
    by_name = {r.get("variant"): r for r in results}
    seed_run, kit_run = by_name.get("seed"), by_name.get("kit")
    if seed_run is None or kit_run is None:
        return False, "first-step check: needs the seed and kit variants"
    for r in (seed_run, kit_run):
        if r.get("status") != "ok":
            return False, f"first-step check: {r['variant']} ended {r.get('status')}: {r.get('reason')}"
    try:
        first = {name: (r.get("step_logs") or [])[0] for name, r in (("seed", seed_run), ("kit", kit_run))}
    except IndexError:
        return False, "first-step check: no logged loss (logging_steps 1) in the seed or kit run"
    problems, parts = [], []
    for key, rtol in (("loss", CHECK_LOSS_RTOL), ("grad_norm", CHECK_GRAD_RTOL)):
        plain, fused = first["seed"].get(key), first["kit"].get(key)
        if plain is None or fused is None:
            problems.append(f"{key} not logged")
            continue
        ok = abs(fused - plain) <= rtol * max(abs(plain), 1e-12)
        parts.append(f"{key} {fused:.5g} vs {plain:.5g} (tolerance {rtol:.0%})")
        if not ok:
            problems.append(f"{key} differs")
    verdict = "ok" if not problems else "FAILED (" + ", ".join(problems) + ")"
    return not problems, f"first-step check {verdict}: kit (preset settings) vs seed (no Liger): " + "; ".join(parts)


# ---------------------------------------------------------------- model folder and data

WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zu", "pi")
         for b in ("n", "r", "s", "t", "l", "m", "x", "k")]


def architecture_config(preset: str, vocab_size: int, seq_len: int, layers: int | None = None) -> tuple[str, dict]:
    """(tokenizer family, config.json fields) for the preset's real architecture (demo: the toy one);
    `layers`: that many decoder layers instead of the published count (the one-step check)."""
    from demo.tiny_model import TOY_SIZE
    from sftkit.models import PRESETS

    arch = PRESETS[preset].architecture
    if arch is None:  # the demo: the same toy Qwen3 that `build-demo-model` builds, in fp32 on CPU
        return "qwen3", dict(TOY_SIZE, model_type="qwen3", vocab_size=vocab_size, dtype="float32",
                             max_position_embeddings=max(TOY_SIZE["max_position_embeddings"], seq_len + 8),
                             tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6)
    fields = {
        "model_type": arch.model_type,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": layers or arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "intermediate_size": arch.intermediate_size,
        "vocab_size": arch.vocab_size,  # the real vocabulary: the real embedding and lm_head cost
        "tie_word_embeddings": arch.tie_word_embeddings,
        "dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": max(40960 if arch.model_type == "qwen3" else 131072, seq_len + 8),
        "rope_theta": 1000000.0 if arch.model_type == "qwen3" else 500000.0,
        "rms_norm_eps": 1e-6 if arch.model_type == "qwen3" else 1e-5,
    }
    return ("qwen3" if arch.model_type == "qwen3" else "llama3"), fields


def build_model_dir(preset: str, out: Path, seq_len: int, layers: int | None = None) -> Path:
    """config.json + tokenizer, no weights (LLaMA-Factory's train_from_scratch builds them)."""
    from transformers import AutoConfig

    from demo.tiny_model import FAMILIES, genuine_tokenizer

    if out.exists():
        shutil.rmtree(out)
    family, _ = architecture_config(preset, 0, seq_len)
    tokenizer = genuine_tokenizer(family, out)
    _, fields = architecture_config(preset, len(tokenizer), seq_len, layers)
    spec = FAMILIES[family]
    ids = tokenizer.convert_tokens_to_ids
    fields.update(bos_token_id=ids(spec["generation_bos"]), eos_token_id=ids(spec["eos"]),
                  pad_token_id=ids(spec["pad"]) if spec["pad"] else None)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    return out


def build_dataset(path: Path, rows: int, seq_len: int) -> Path:
    """`rows` alpaca examples, each of at least seq_len words (>= 1 token each) in prompt and answer:
    LLaMA-Factory truncates both sides to fit cutoff_len = seq_len, so every example is seq_len tokens."""
    rng = random.Random(1)
    data = [{"instruction": " ".join(rng.choice(WORDS) for _ in range(seq_len)), "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(seq_len)), "system": "", "history": []}
            for _ in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


PLAN_WANTS_WEIGHTS = "lacks the weights"


def write_placeholder_weights(model_dir: Path) -> None:
    """An empty (valid, tensor-less) model.safetensors so that the launcher's model-folder check passes.

    Only used while sft_train.sh refuses a weightless folder even with --train_from_scratch True;
    LLaMA-Factory never reads it (the weights come from the config)."""
    header = b"{}      "  # 8-byte aligned JSON header: no tensors
    (model_dir / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


# ---------------------------------------------------------------- the run


def visible_gpus() -> tuple[int, str | None]:
    """(count, name of the first) of the GPUs this job was given: the kit's probe (`sftkit.hardware`: nvidia-smi
    narrowed by CUDA_VISIBLE_DEVICES, indices, UUIDs and MIG instances as CUDA reads them), CUDA not initialised."""
    from sftkit import hardware

    gpus = hardware.visible_gpus()
    return len(gpus), (gpus[0].name if gpus else None)


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


VERSION_PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "llamafactory", "trl", "datasets",
                    "liger-kernel", "flash-attn", "triton")


def versions() -> dict[str, str | None]:
    from sftkit.hardware import package_version

    return {"python": sys.version.split()[0], **{name: package_version(name) for name in VERSION_PACKAGES}}


def human_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def summary_line(r: dict) -> str:
    head = f"bench {r['variant']:<16} {r['status']:<7} {r['gpu'] or '-'} x{r['world_size']} seq {r['seq_len']}"
    if r["status"] == "ok":
        mfu = "-" if r["lora_mfu"] is None else f"{100 * r['lora_mfu']:.1f}%"
        return (f"{head}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, step {r['step_time_s']:.2f} s, "
                f"LoRA-MFU {mfu}, peak {human_bytes(r['peak_bytes'])} (estimate {human_bytes(r['estimate_bytes'])})")
    return f"{head}: {r.get('reason') or ''} (estimate {human_bytes(r['estimate_bytes'])})"


class Runner:
    def __init__(self, args: argparse.Namespace):
        from sftkit.models import PRESETS

        if args.preset not in PRESETS:
            raise BenchError(f"--preset {args.preset!r}: one of {', '.join(PRESETS)}")
        self.args = args
        self.preset = PRESETS[args.preset]
        self.cpu = self.preset.cpu
        gpu_count, self.gpu_name = (0, None) if self.cpu else visible_gpus()
        if not self.cpu and gpu_count == 0:
            raise BenchError(f"preset {args.preset} needs a GPU and none is visible: use --preset demo on CPU")
        gpus = args.gpus or (self.preset.default_gpus if self.cpu else gpu_count)
        if not self.cpu and gpus > gpu_count:
            raise BenchError(f"--gpus {gpus} but {gpu_count} GPU(s) are visible")
        seq_len = args.seq_len or (int(self.preset.overrides.get("cutoff_len", 0)) or 20480)
        warmup = args.warmup if args.warmup is not None else (1 if self.cpu else 2)
        self.settings = Settings(args.preset, seq_len, args.batch, args.grad_accum, gpus, warmup, args.steps, self.cpu)
        self.workdir = Path(args.workdir or KIT_DIR / "runs" / "bench" / f"{args.preset}-{seq_len}")
        self.out = Path(args.out) if args.out else self.workdir / "results.json"
        names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else \
            list(DEFAULT_VARIANTS)
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise BenchError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
        self.names = names
        self.results: list[dict] = []
        self.versions = versions()
        self.placeholder = False

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def env(self, figures: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SFTKIT_BENCH_OUT=str(figures), SFTKIT_BENCH_WARMUP=str(self.settings.warmup),
                   SFTKIT_BENCH_EXIT="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false",
                   SFTKIT_MEMORY_CHECK="warn")  # measure what the estimate says will not fit (if the launcher allows)
        env["PYTHONPATH"] = str(KIT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHON", sys.executable)
        return env

    def launcher(self, variant: str, extra: dict[str, str], dry_run: bool = False) -> list[str]:
        cmd = ["bash", str(KIT_DIR / "sft_train.sh"), "--model", self.args.preset, "--model-path",
               str(self.model_dir), "--dataset", str(self.data), "--output-dir", str(self.workdir / variant),
               "--gpus", str(self.settings.gpus), "--overwrite"]
        if dry_run:
            cmd.append("--dry-run")
        return cmd + ["--", *extra_args(extra)]

    def prepare(self) -> None:
        s = self.settings
        started = time.monotonic()
        self.model_dir = build_model_dir(s.preset, self.workdir / "model", s.seq_len, self.args.layers)
        rows = s.batch * s.gpus * s.grad_accum * (s.warmup + s.steps)
        self.data = build_dataset(self.workdir / "data.json", rows, s.seq_len)
        if self.preset.architecture is not None:
            self.arch = replace(self.preset.architecture, num_hidden_layers=self.args.layers or
                                            self.preset.architecture.num_hidden_layers)
        else:  # the demo: the toy architecture just written
            from sftkit.models import load_architecture

            self.arch = load_architecture(str(self.model_dir))[0]
        self.log(f"bench: model folder {self.model_dir} (config + tokenizer), {rows} examples of {s.seq_len} tokens "
                 f"in {self.data} ({time.monotonic() - started:.1f} s)")

    def record(self, planned: dict, status: str, reason: str | None, figures: dict | None,
               wall_s: float | None) -> dict:
        from sftkit.launch.estimate import estimate_peak_memory, lora_flops_per_token

        s, resolved = self.settings, planned["resolved"]
        liger = resolved.get("enable_liger_kernel") == "True"
        attn = "flash_attention_2" if resolved.get("flash_attn") == "fa2" else "sdpa"
        estimate = estimate_peak_memory(self.arch, gpus=s.gpus, cutoff_len=s.seq_len, batch=s.batch,
                                        lora_rank=int(resolved.get("lora_rank", 64)), liger=liger,
                                        lora_dropout=float(resolved.get("lora_dropout", 0.05)),
                                        attn_implementation=attn).per_gpu_bytes
        flops = lora_flops_per_token(self.arch, int(resolved.get("lora_rank", 64)), s.seq_len)
        figures = figures or {}
        gpu = figures.get("gpu") or (self.gpu_name if not self.cpu else "cpu")
        peak, peak_note = gpu_peak_flops(gpu)
        tokens = figures.get("tokens_per_s_per_gpu") if status == "ok" else None
        notes = [n for n in (peak_note if status == "ok" else None, VARIANTS[planned["variant"]].estimate_note) if n]
        return {
            "variant": planned["variant"],
            "what": VARIANTS[planned["variant"]].what,
            "status": status,
            "reason": reason,
            "tokens_per_s_per_gpu": tokens,
            "step_time_s": figures.get("step_time_s") if status == "ok" else None,
            "lora_mfu": lora_mfu(flops, tokens, peak),
            "flops_per_token": flops,
            "peak_bytes": figures.get("peak_reserved_bytes"),
            "peak_allocated_bytes": figures.get("peak_allocated_bytes"),
            "estimate_bytes": estimate,
            "gpu": gpu,
            "world_size": s.gpus,
            "seq_len": s.seq_len,
            "steps": s.steps,
            "warmup_steps": s.warmup,
            "micro_batch": s.batch,
            "grad_accum": s.grad_accum,
            "global_batch_tokens": s.batch * s.gpus * s.grad_accum * s.seq_len,
            "tokens_per_step": figures.get("tokens_per_step"),
            "step_times_s": figures.get("step_times_s"),
            "step_logs": figures.get("step_logs"),
            "flags": planned["extra"],
            "notes": notes,
            "wall_s": None if wall_s is None else round(wall_s, 1),
            "versions": self.versions,
        }

    def run_variant(self, planned: dict) -> dict:
        name = planned["variant"]
        figures_path = self.workdir / f"{name}.figures.json"
        log_path = self.workdir / f"{name}.log"
        figures_path.unlink(missing_ok=True)
        cmd = self.launcher(name, planned["extra"])
        self.log(f"bench: {name}: {' '.join(shlex.quote(c) for c in cmd)}  (log: {log_path})")
        started = time.monotonic()
        returncode: int | None
        with log_path.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, cwd=KIT_DIR, env=self.env(figures_path), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = proc.wait(timeout=self.args.variant_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)  # the supervisor stops the workers and leaves nothing behind
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                returncode = None
        wall = time.monotonic() - started
        text = log_path.read_text(encoding="utf-8", errors="replace")
        figures = json.loads(figures_path.read_text(encoding="utf-8")) if figures_path.is_file() else None
        if returncode != 0 and not self.placeholder and PLAN_WANTS_WEIGHTS in text:
            self.log("bench: sft_train.sh wants weights in the model folder even with --train_from_scratch True; "
                     "writing an empty placeholder model.safetensors (LLaMA-Factory does not read it) and retrying")
            write_placeholder_weights(self.model_dir)
            self.placeholder = True
            return self.run_variant(planned)
        status, reason = classify(returncode, text, figures)
        return self.record(planned, status, reason, figures, wall)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1) + "\n", encoding="utf-8")

    def run(self) -> list[dict]:
        started = time.monotonic()
        self.prepare()
        cuda = not self.cpu
        planned = plan_variants(self.names, dict(self.preset.overrides), seed_args(), self.settings, cuda,
                                importable)
        walls: list[float] = []
        for entry in planned:
            reason = entry["skip"]
            elapsed = time.monotonic() - started
            if reason is None and self.args.time_budget and walls:
                expected = sum(walls) / len(walls)
                if elapsed + expected > self.args.time_budget:
                    reason = (f"time budget: {elapsed:.0f} s spent, a variant takes ~{expected:.0f} s, "
                              f"budget {self.args.time_budget} s")
            if reason is not None:
                result = self.record(entry, "skipped", reason, None, None)
            else:
                result = self.run_variant(entry)
                walls.append(result["wall_s"])
            self.results.append(result)
            self.save()
            self.log(summary_line(result))
        self.log(f"bench: {len(self.results)} variant(s) in {time.monotonic() - started:.0f} s; JSON in {self.out}")
        return self.results


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash bench/run.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="qwen3-8b, qwen3-14b, llama3.2-3b or demo (CPU)")
    parser.add_argument("--seq-len", type=int, help="tokens per example = cutoff_len (default: the preset's "
                        "cutoff: 20480, demo 256)")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps (default 4)")
    parser.add_argument("--warmup", type=int, help="warm-up steps left out of the figures (default 2; CPU 1)")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch per GPU (default: the seed's 2)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation (default 1: one "
                        "micro-batch per optimizer step, so a step is short)")
    parser.add_argument("--gpus", type=int, help="processes (default: the visible GPUs; demo 2)")
    parser.add_argument("--variants", help=f"comma-separated, from {','.join(VARIANTS)} (default: "
                        f"{','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--out", help="the JSON list (default: runs/bench/PRESET-SEQ/results.json)")
    parser.add_argument("--workdir", help="model, data, logs (default: runs/bench/PRESET-SEQ)")
    parser.add_argument("--variant-timeout", type=int, default=1200, help="seconds per variant (default 1200)")
    parser.add_argument("--time-budget", type=int, help="start no variant that would end past this many seconds")
    parser.add_argument("--layers", type=int, help="decoder layers of the model (default: the preset's; fewer for "
                        "the one-step check of bench/gpu_run.sh)")
    args = parser.parse_args(argv)
    for name in ("seq_len", "steps", "batch", "grad_accum", "gpus", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive whole number")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        results = Runner(args).run()
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1))
    for result in results:
        print(summary_line(result))
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
