"""The behaviour check of a merge, where it fits: logits and greedy continuations against base + adapter.

Against base + adapter through PEFT (unmerged), over fixed prompts: logits within `tolerance_for`, the same
greedy continuation, and the adapter's effect carried. `plan` decides from sizes and free memory whether it runs.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from sftkit.merge import merge_proof
from sftkit.merge.chat import FIXED_DATE, first_line

CHAT_PROMPTS = (
    "What can you help me with?",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
)
RAW_PROMPT = "The quick brown fox jumps over the lazy dog. 1 2 3 4 5"
NEW_TOKENS = 12

# Unit roundoff u = 2^-p of each dtype, p = significand bits counting the implicit one:
# float32 24, float16 11, bfloat16 8 (7 stored mantissa bits + 1).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Tolerance = HEADROOM * u * max|logit|, never below FP32_TOLERANCE: see tolerance_for.
HEADROOM = {"float32": 256.0, "float16": 8.0, "bfloat16": 8.0}
BF16_COMPUTE_HEADROOM = 32.0
FP32_TOLERANCE = 1e-4

MODES = ("auto", "always", "never")
BYTES_PER_PARAMETER = {"cpu": 4, "cuda": 2}  # float32 on CPU, bfloat16 on a GPU
LOAD_OVERHEAD = 1.7  # loading holds the file's pages beside the converted weights: 1.62 measured (1.7B, CPU)
GPU_RESERVE = 2**30  # CUDA context, kernels' workspace
MEMORY_SHARE = 0.8  # of the free memory the check may plan to use
CPU_AUTO_LIMIT = 4 * 2**30  # auto runs on CPU up to ~0.6B parameters (float32): seconds to minutes, not hours


def tolerance_for(dtype: str, max_abs_logit: float, compute: str = "float32") -> float:
    """The largest |logit difference| a correct merge stored in `dtype` may show against base + adapter.

    A relative weight perturbation e moves a logit L by about c e L (c of order one, growing with depth).
    Measured (bench/README.md): bfloat16 up to 4.0 u max|logit| (random 28-layer 1.7B Qwen3), HEADROOM 8;
    float32 ~16 u max|logit| (arithmetic dominates), HEADROOM 256; computed in bfloat16 on a GPU up to
    4 u max|logit|, BF16_COMPUTE_HEADROOM 32. A lost adapter is off by its whole effect, far above these.
    """
    stored = dtype if dtype in UNIT_ROUNDOFF and compute != "bfloat16" else "bfloat16"
    headroom = BF16_COMPUTE_HEADROOM if compute == "bfloat16" else HEADROOM[stored]
    return max(FP32_TOLERANCE, headroom * UNIT_ROUNDOFF[stored] * max(1.0, max_abs_logit))


# ---------------------------------------------------------------- whether it runs


@dataclass
class Plan:
    ran: bool
    device: str
    dtype: str
    needed_gb: float
    available_gb: float | None
    reason: str  # why it runs or not, for the report


def available_bytes(device: str) -> int | None:
    """Free memory on `device`: the GPU's free memory, or the RAM the OS says is available."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except RuntimeError:  # a GPU in a bad state or taken: none of it is free for the check
            return 0
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def plan(parameters: int, adapter_bytes: int, device: str | None, mode: str) -> tuple[Plan, str | None]:
    """Where and whether the behaviour check runs; and a resource problem (the message) when it cannot."""
    import torch

    gpu = torch.cuda.is_available()
    chosen = device or ("cuda" if gpu else "cpu")
    kind = "cuda" if chosen.startswith("cuda") else "cpu"
    dtype = "bfloat16" if kind == "cuda" else "float32"
    needed = parameters * BYTES_PER_PARAMETER[kind] * LOAD_OVERHEAD + adapter_bytes + (GPU_RESERVE * (kind == "cuda"))
    gb = needed / 1e9
    if mode == "never":
        return Plan(False, chosen, dtype, gb, None, "not run (--behaviour never)"), None
    if kind == "cuda" and not gpu:
        return (Plan(False, chosen, dtype, gb, None, "not run: no GPU"),
                f"--device {chosen}, but torch sees no GPU here: pass --device cpu, or leave --device out")
    free = available_bytes(chosen)
    free_gb = None if free is None else free / 1e9
    where = f"{chosen} in {dtype}: needs ~{gb:.1f} GB" + ("" if free is None else f", {free_gb:.1f} GB free")
    if mode == "always":
        return Plan(True, chosen, dtype, gb, free_gb, f"forced (--behaviour always) on {where}"), None
    fits = free is None or needed <= MEMORY_SHARE * free
    if fits and (kind == "cuda" or needed <= CPU_AUTO_LIMIT):
        return Plan(True, chosen, dtype, gb, free_gb, f"on {where}"), None
    if kind == "cuda" and device is None:  # the GPU is too small or busy: CPU, if the model is small enough
        fallback, problem = plan(parameters, adapter_bytes, "cpu", mode)
        fallback.reason += f" (the GPU has {free_gb:.1f} GB free, ~{gb:.1f} GB needed there)"
        return fallback, problem
    why = (f"over {MEMORY_SHARE:.0%} of the free memory" if not fits else
           f"over the {CPU_AUTO_LIMIT / 2**30:.0f} GiB a default CPU run takes on (float32 on CPU is slow)")
    return Plan(False, chosen, dtype, gb, free_gb, f"skipped: {where}, {why}; the weights proof "
                "is the check then; --behaviour always forces it"), None


# ---------------------------------------------------------------- the check


def probe_prompts(tokenizer, enable_thinking: bool | None):
    """Token ids of each CHAT_PROMPTS question through the chat template (when there is one), then of RAW_PROMPT."""
    kwargs = {"date_string": FIXED_DATE, **({} if enable_thinking is None else {"enable_thinking": enable_thinking})}
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt", **kwargs)["input_ids"][0]
             for question in (CHAT_PROMPTS if tokenizer.chat_template else ())]
    return [*chats, tokenizer(RAW_PROMPT, return_tensors="pt")["input_ids"][0]]


def greedy(model, ids, steps: int):
    """`ids` and `steps` greedy tokens after them: the plain argmax continuation (`load_model` blanks the generation
    config: no EOS stop, penalty or sampling, as the comparison wants the same length)."""
    return model.generate(input_ids=ids[None], max_new_tokens=steps, do_sample=False)[0]


@contextlib.contextmanager
def threads_for(parameters: int, device: str):
    """One CPU thread for toy-sized models: splitting their matmuls was measured 6x slower on 2 busy cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1 if device == "cpu" and parameters < 50_000_000 else previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_model(folder: Path, the_plan: Plan):
    """The model as planned, with a blank generation config: `greedy` must not stop at EOS nor penalise."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    device_map = {"": the_plan.device} if the_plan.device.startswith("cuda") else None
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, the_plan.dtype),
                                                 device_map=device_map).eval()
    model.generation_config = GenerationConfig()
    return model


MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA, torch's CPU, mmap


def out_of_memory(err: BaseException) -> bool:
    import torch

    text = str(err).lower()
    return isinstance(err, MemoryError | torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(words in text for words in MEMORY_WORDS))


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check(base: Path, adapter: Path, merged: Path, tokenizer, device: str | None, mode: str, report,
          base_index: dict | None = None) -> None:
    """The logits check where it fits (`plan`): a note when skipped, a problem when it cannot run (running out of
    memory is a resource problem, never a finding). `base_index`: the base's `merge_proof.tensor_index`, when the
    caller has read it already."""
    if base_index is None:
        base_index = merge_proof.tensor_index(merge_proof.weight_files(base, "model")[0])
    parameters = sum(math.prod(stored.shape) for stored in base_index.values())
    adapter_bytes = sum(path.stat().st_size for path in merge_proof.weight_files(adapter, "adapter_model")[0])
    the_plan, resource_problem = plan(parameters, adapter_bytes, device, mode)
    report["behaviour"] = asdict(the_plan)
    if resource_problem:
        report.problem("behaviour-no-gpu", resource_problem, kind="unverified")
        return
    if not the_plan.ran:
        report.note(f"behaviour check {the_plan.reason}")
        return
    try:
        with threads_for(parameters, the_plan.device):
            compare_logits(base, adapter, merged, tokenizer, the_plan, report)
    except Exception as err:  # noqa: BLE001 - only memory is expected here; re-raised otherwise
        if not out_of_memory(err):
            raise
        report["behaviour"]["ran"] = False
        report.problem("behaviour-out-of-memory", f"the behaviour check ran out of memory on {the_plan.device} "
                       f"({the_plan.reason}); it is not a finding about the merge: free memory, or pass "
                       "--behaviour never", kind="unverified")
    finally:
        release_memory()


def loaded(report, role: str, folder: Path, what: str, load, *args):
    """`load(*args)`, or None after a named load-failed problem (running out of memory is raised on)."""
    try:
        return load(*args)
    except Exception as err:  # noqa: BLE001
        if out_of_memory(err):
            raise
        report.problem("load-failed", f"{role} {folder}: {what} ({type(err).__name__}: {first_line(err)})")
        return None


def reference_runs(base: Path, adapter: Path, prompts, the_plan: Plan, report):
    """Per prompt: (prompt length, prompt + greedy continuation, base + adapter logits, base logits), or None."""
    import torch
    from peft import PeftModel

    model = loaded(report, "--base", base, "transformers cannot load it", load_model, base, the_plan)
    reference = None if model is None else loaded(report, "--adapter", adapter, f"PEFT cannot load it onto {base}",
                                                  PeftModel.from_pretrained, model, str(adapter))
    if reference is None:
        return None
    reference.eval()
    runs = []
    with torch.no_grad():
        for ids in prompts:
            sequence = greedy(reference, ids.to(the_plan.device), NEW_TOKENS)
            ref_logits = reference(input_ids=sequence[None]).logits[0].float()
            with reference.disable_adapter():
                base_logits = reference(input_ids=sequence[None]).logits[0].float()
            runs.append((len(ids), sequence, ref_logits, base_logits))
    del reference, model
    release_memory()
    return runs


def compare_logits(base: Path, adapter: Path, merged: Path, tokenizer, the_plan: Plan, report) -> None:
    import torch

    runs = reference_runs(base, adapter, probe_prompts(tokenizer, report["enable_thinking"]), the_plan, report)
    merged_model = None if runs is None else loaded(report, "--merged", merged, "transformers cannot load it",
                                                    load_model, merged, the_plan)
    if merged_model is None:
        return
    max_logit = max(float(ref.abs().max()) for _, _, ref, _ in runs)
    tolerance = tolerance_for(report["merged_dtype"] or "float32", max_logit, the_plan.dtype)
    report["max_abs_logit"], report["tolerance"] = max_logit, tolerance
    worst = worst_base = effect = 0.0
    along = squared = 0.0  # <merged - base, (base + adapter) - base> and |(base + adapter) - base|^2
    divergences = []  # (token, gap) where the greedy continuations part
    with torch.no_grad():
        for length, sequence, ref_logits, base_logits in runs:
            logits = merged_model(input_ids=sequence[None]).logits[0].float()
            if logits.shape != ref_logits.shape:
                report.problem(
                    "architecture-mismatch",
                    f"--merged {merged} gives logits of shape {tuple(logits.shape)}, base + adapter "
                    f"{tuple(ref_logits.shape)}: it is not a merge of this base",
                )
                return
            worst = max(worst, float((logits - ref_logits).abs().max()))
            worst_base = max(worst_base, float((logits - base_logits).abs().max()))
            adapter_delta = (ref_logits - base_logits).double()
            effect = max(effect, float(adapter_delta.abs().max()))
            along += float(((logits - base_logits).double() * adapter_delta).sum())
            squared += float((adapter_delta**2).sum())
            continuation = sequence[length:]
            merged_continuation = greedy(merged_model, sequence[:length], NEW_TOKENS)[length:]
            if not torch.equal(merged_continuation, continuation):
                step = int((merged_continuation != continuation).nonzero()[0])
                position = length + step - 1
                gap = float(ref_logits[position, continuation[step]] - ref_logits[position, merged_continuation[step]])
                divergences.append((step, gap))
    del merged_model

    # The share of the adapter's effect the merged model carries (1: base + adapter, 0: the base); rounding
    # noise averages out, so it tells a merge from the base even for an effect below the tolerance.
    share = along / squared if squared > 0 else 0.0
    report.update(max_abs_logit_diff=worst, max_abs_logit_diff_vs_base=worst_base, greedy_match=not divergences,
                  adapter_effect=effect, adapter_effect_in_merged=share,
                  differs_from_base=worst_base > 0 and share >= 0.5)
    if worst > tolerance:
        report.problem(
            "logits-differ",
            f"the merged model's logits differ from base + adapter (through PEFT) by up to {worst:.3g}, over the "
            f"{report['merged_dtype']} tolerance {tolerance:.3g}: {merged} is not this base merged with this adapter",
        )
    for step, gap in divergences:
        if gap > 2 * tolerance:  # two logits each off by <= tolerance cannot swap a gap wider than 2x
            report.problem(
                "greedy-mismatch",
                f"the merged model's greedy continuation leaves base + adapter's at token {step + 1} of {NEW_TOKENS}, "
                f"where base + adapter prefers its token by {gap:.3g} (> 2x tolerance)",
            )
            break
        report.note(f"greedy continuations part at token {step + 1} on a near-tie (gap {gap:.3g} <= 2x tolerance)")
    if not report["differs_from_base"]:
        report.problem(
            "same-as-base",
            f"the merged model carries {share:.0%} of the adapter's effect on the logits (max |diff| from the base "
            f"{worst_base:.3g}; the adapter moves them by up to {effect:.3g}): the adapter did not take effect "
            "(the export wrote the base weights, or the adapter is empty)",
        )

