"""Prove that a merged model is base + adapter, and that it stops and thinks the way it was trained.

    python -m sftkit verify-merge --base saves/demo --adapter saves/demo-lora --merged saves/demo-merged [--json]

Checks, each failing with a named problem (the JSON `problems` list, `name` + `message`):

- the adapter: every LoRA tensor PEFT expects from `adapter_config.json` (targets, rank) on this base is
  in the weights file, non-empty, of the right shape, finite, and no `lora_B` is all zero (as
  initialised, i.e. never trained or saved empty under ZeRO-3);
- the merged model against base + adapter applied through PEFT (unmerged), both computed in float32:
  the largest |logit difference| over a fixed set of prompts and their greedy continuations stays
  within a tolerance set by the merged weights' dtype (see `tolerance_for`), and the greedy
  continuation is the same;
- the merged model differs from the base model by more than that tolerance (the adapter took effect);
- the merged folder's tokenizer, chat template, config.json and generation_config.json carry the
  training template's end-of-turn token as EOS (`<|im_end|>` for qwen3, `<|eot_id|>` for llama3), and
  its chat template defaults to the run's thinking setting.

The training template and thinking setting come from the run's record (the adapter folder's
`merge_model.yaml`, or its parent's for a `checkpoint-N`), else the merged folder's `sftkit_merge.json`,
else the base model's config.json. Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import warnings
from pathlib import Path

import yaml

from sftkit.chat import MERGE_RECORD

RUN_RECORD = "merge_model.yaml"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")

# A fixed probe set: user turns rendered through the base model's own chat template with the run's
# thinking setting (what a served model sees), plus one raw-text prompt.
CHAT_PROMPTS = (
    "What can you help me with?",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
)
RAW_PROMPT = "The quick brown fox jumps over the lazy dog. 1 2 3 4 5"
NEW_TOKENS = 12
FIXED_DATE = "26 Jul 2024"  # Llama 3.2's template prints today's date; the probes must not change daily

# Unit roundoff u = 2^-p of each storage dtype, p = significand bits counting the implicit one:
# float32 24, float16 11, bfloat16 8 (7 stored mantissa bits + 1).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Tolerance = HEADROOM * u * max|logit|, never below FP32_TOLERANCE: see tolerance_for.
HEADROOM = {"float32": 256.0, "float16": 8.0, "bfloat16": 8.0}
FP32_TOLERANCE = 1e-4


def tolerance_for(dtype: str, max_abs_logit: float) -> float:
    """The largest |logit difference| a correct merge stored in `dtype` may show against base + adapter.

    Both sides are computed in float32, so the difference comes from how W' = W + scale * B @ A was
    stored, plus float32 re-association. Any relative perturbation of the weights of size e, random
    in sign, moves each matmul output by about e times the output itself (the errors add in
    quadrature, like the output does), and the network carries that relative error to the logits:
    a logit of size L moves by about c * e * L, with c of order one, growing slowly with depth.

    - bfloat16: each merged weight is rounded to 8 significant bits, e <= u = 2^-8 = 0.0039. Measured
      on the tiny models (fp32 and bf16 bases, 2 layers): max |diff| <= 1.2 * u * max|logit|.
      HEADROOM 8 leaves ~7x for the 28-40 layers of the real models: 0.03 per unit of logit, e.g.
      1.25 for logits of 40. float16 (u = 2^-11) follows the same argument.
    - float32: the weight rounding (u = 2^-24) is as small as the float32 arithmetic itself, which
      now dominates: measured ~16 * u * max|logit| (1.7e-5 at |logit| 18). HEADROOM 256: 1e-4 up to
      |logit| 6.6 (the floor), 2.7e-4 at 18, 6e-4 at 40.

    A merge that lost the adapter or wrote the base weights is off by the adapter's whole effect,
    orders of magnitude above these, and `differs_from_base` checks the merged model carries that effect.
    """
    u = UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["bfloat16"])
    headroom = HEADROOM.get(dtype, HEADROOM["bfloat16"])
    return max(FP32_TOLERANCE, headroom * u * max(1.0, max_abs_logit))


class Report:
    def __init__(self, base: Path, adapter: Path, merged: Path):
        self.data: dict = {
            "ok": False,
            "base": str(base),
            "adapter": str(adapter),
            "merged": str(merged),
            "template": None,
            "enable_thinking": None,
            "template_source": None,
            "merged_dtype": None,
            "adapter_tensors": None,
            "lora_rank": None,
            "max_abs_logit_diff": None,
            "max_abs_logit": None,
            "tolerance": None,
            "greedy_match": None,
            "differs_from_base": None,
            "max_abs_logit_diff_vs_base": None,
            "adapter_effect": None,
            "adapter_effect_in_merged": None,
            "eos_token": None,
            "eos_ok": None,
            "thinking_ok": None,
            "problems": [],
            "notes": [],
        }

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def problem(self, name: str, message: str) -> None:
        self.data["problems"].append({"name": name, "message": message})

    def note(self, message: str) -> None:
        self.data["notes"].append(message)


# ---------------------------------------------------------------- records


def run_record_path(adapter: Path) -> Path | None:
    """The run's merge_model.yaml: in the adapter folder, or beside a checkpoint-N in its run folder."""
    if (adapter / RUN_RECORD).is_file():
        return adapter / RUN_RECORD
    if CHECKPOINT_NAME.fullmatch(adapter.name) and (adapter.parent / RUN_RECORD).is_file():
        return adapter.parent / RUN_RECORD
    return None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read it as YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected 'key: value' lines, found {type(data).__name__}")
    return data


def read_merge_record(merged: Path) -> dict | None:
    path = merged / MERGE_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else None


def training_setup(base: Path, adapter: Path, merged: Path, report: Report) -> None:
    """Fill template / enable_thinking from the run's record; flag a merge made with other settings."""
    run = None
    run_path = run_record_path(adapter)
    try:
        if run_path is not None:
            run = read_yaml(run_path)
        merge_record = read_merge_record(merged)
    except ValueError as err:
        report.problem("bad-record", str(err))
        return
    if run is not None and run.get("template"):
        report["template"], report["enable_thinking"] = run["template"], run.get("enable_thinking")
        report["template_source"] = str(run_path)
        recorded = Path(str(run.get("model_name_or_path", "")))
        if recorded.is_dir() and recorded.resolve() != base.resolve():
            report.note(f"{run_path} names base model {recorded}, not --base {base}")
    elif merge_record is not None and merge_record.get("template"):
        report["template"], report["enable_thinking"] = merge_record["template"], merge_record.get("enable_thinking")
        report["template_source"] = str(merged / MERGE_RECORD)
        report.note(f"no {RUN_RECORD} in {adapter}: took the template from {merged / MERGE_RECORD}")
    else:
        from sftkit.presets import template_for_model_dir

        found = template_for_model_dir(base) if (base / "config.json").is_file() else None
        if found is None:
            report.problem(
                "unknown-template",
                f"no {RUN_RECORD} in {adapter} and no {MERGE_RECORD} in {merged}, and {base}/config.json names "
                "no known family: cannot tell which end-of-turn token training used",
            )
            return
        report["template"], report["enable_thinking"] = found
        report["template_source"] = f"{base / 'config.json'} (model_type)"
        report.note(f"no run record: assumed the {found[0]} template from {base}/config.json")

    if merge_record is None:
        report.note(f"{merged} has no {MERGE_RECORD} (not merged by `python -m sftkit merge`)")
        return
    if merge_record.get("template") != report["template"]:
        report.problem(
            "template-mismatch",
            f"{merged / MERGE_RECORD}: merged with template {merge_record.get('template')!r}, but the run trained "
            f"with {report['template']!r} ({report['template_source']}): merge again with the run's template",
        )
    if report["enable_thinking"] is not None and merge_record.get("enable_thinking") != report["enable_thinking"]:
        report.problem(
            "thinking-mismatch",
            f"{merged / MERGE_RECORD}: merged with enable_thinking {merge_record.get('enable_thinking')!r}, "
            f"but the run trained with {report['enable_thinking']!r}: merge again with the run's setting",
        )


# ---------------------------------------------------------------- files


def weight_files(folder: Path, stem: str) -> tuple[list[Path], list[str]]:
    """(safetensors files of `folder`, problems as strings). Follows a sharded index when present."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
            return [], [f"{index}: unreadable shard index ({err})"]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            return [], [f"{index} lists {', '.join(missing)}, missing from {folder}: copy the whole folder again"]
        return [folder / name for name in names], []
    single = folder / f"{stem}.safetensors"
    return ([single], []) if single.is_file() else ([], [])


def unreadable_safetensors(files: list[Path]) -> list[str]:
    """A message per file safetensors cannot open (truncated, corrupt, not safetensors)."""
    from safetensors import SafetensorError, safe_open

    bad = []
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            bad.append(f"{path}: {err} (truncated or corrupt: copy or write it again)")
    return bad


def stored_dtype(files: list[Path]) -> str:
    """The floating dtype most of the stored tensors have: float32, bfloat16 or float16."""
    from collections import Counter

    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    counts: Counter = Counter()
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype in names:
                    counts[names[dtype]] += 1
    return counts.most_common(1)[0][0] if counts else "float32"


def readable_weights(folder: Path, stem: str, report: Report, absent: str, absent_message: str) -> list[Path] | None:
    """The folder's `stem` safetensors files, or None after naming why they cannot be read."""
    files, errors = weight_files(folder, stem)
    for error in errors:
        report.problem("missing-shard", error)
    if errors:
        return None
    if not files:
        report.problem(absent, absent_message)
        return None
    bad = unreadable_safetensors(files)
    for message in bad:
        report.problem("truncated-safetensors", message)
    return None if bad else files


def check_model_folder(folder: Path, role: str, report: Report) -> bool:
    if not (folder / "config.json").is_file():
        report.problem("no-config", f"--{role} {folder} has no config.json: pass the model folder itself")
        return False
    files = readable_weights(
        folder, "model", report, "no-weights",
        f"--{role} {folder} holds no model.safetensors (or sharded index): nothing to compare",
    )
    if files is None:
        return False
    if role == "merged":
        report["merged_dtype"] = stored_dtype(files)
    return True


# ---------------------------------------------------------------- adapter


def check_adapter(base: Path, adapter: Path, report: Report) -> bool:
    """Every LoRA tensor PEFT expects is there, non-empty, the right shape, finite, trained. True if loadable."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        report.problem(
            "no-adapter-config",
            f"{adapter} has no adapter_config.json: pass the adapter folder training wrote (--output-dir) "
            "or one of its checkpoint-N folders",
        )
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        report.problem("bad-adapter-config", f"{config_path}: not valid JSON ({err})")
        return False
    if config.get("peft_type") != "LORA":
        report.problem(
            "bad-adapter-config", f"{config_path}: peft_type {config.get('peft_type')!r}, not a LoRA adapter"
        )
        return False
    report["lora_rank"] = config.get("r")

    files = readable_weights(
        adapter, "adapter_model", report, "no-adapter-weights",
        f"{adapter} has no adapter_model.safetensors: the adapter was not saved",
    )
    if files is None:
        return False

    try:
        expected = expected_lora_shapes(base, adapter)
    except Exception as err:  # noqa: BLE001 - a config PEFT cannot apply to this base is a user error
        report.problem(
            "bad-adapter-config",
            f"{config_path}: PEFT cannot apply it to {base} ({type(err).__name__}: {first_line(err)})",
        )
        return False

    import torch
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for path in files:
        saved.update(load_file(str(path)))
    report["adapter_tensors"] = len(saved)
    missing = sorted(set(expected) - set(saved))
    if missing:
        report.problem(
            "adapter-tensor-missing",
            f"{adapter}: {len(missing)} of {len(expected)} LoRA tensors that adapter_config.json implies are missing "
            f"(first: {missing[0]}): the adapter was saved incompletely; save it again from the run",
        )
    empty = sorted(name for name, tensor in saved.items() if tensor.numel() == 0)
    if empty:
        report.problem(
            "adapter-tensor-empty",
            f"{adapter}: {len(empty)} LoRA tensors hold no values (first: {empty[0]}, shape "
            f"{tuple(saved[empty[0]].shape)}): a ZeRO-3 run saved its partitions, not the gathered weights",
        )
    wrong = sorted(
        name for name in set(expected) & set(saved)
        if saved[name].numel() and tuple(saved[name].shape) != expected[name]
    )
    if wrong:
        name = wrong[0]
        report.problem(
            "adapter-shape-mismatch",
            f"{adapter}: {len(wrong)} LoRA tensors have the wrong shape (first: {name} is {tuple(saved[name].shape)}, "
            f"rank {config.get('r')} on this base needs {expected[name]}): adapter_config.json does not match the "
            "weights, or --base is another model",
        )
    nonfinite = sorted(name for name, t in saved.items() if t.numel() and not bool(torch.isfinite(t).all()))
    if nonfinite:
        report.problem(
            "adapter-not-finite", f"{adapter}: {len(nonfinite)} LoRA tensors hold NaN or inf (first: {nonfinite[0]})"
        )
    b_tensors = [name for name in saved if ".lora_B." in name or ".lora_embedding_B" in name]
    zero_b = sorted(name for name in b_tensors if saved[name].numel() and not bool(saved[name].any()))
    if zero_b:
        report.problem(
            "adapter-untrained",
            f"{adapter}: {len(zero_b)} of {len(b_tensors)} lora_B tensors are all zero, as PEFT initialises them "
            f"(first: {zero_b[0]}): those layers were never trained or were saved empty",
        )
    elif not b_tensors and not missing:
        report.problem("adapter-tensor-missing", f"{adapter}: the weights file holds no lora_B tensor at all")
    return not wrong and not empty


def expected_lora_shapes(base: Path, adapter: Path) -> dict[str, tuple[int, ...]]:
    """The tensors PEFT itself would save for this adapter config on this base (built on the meta device)."""
    import torch
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_config = PeftConfig.from_pretrained(str(adapter))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "base_model_name_or_path was renamed": the base is --base here
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
        peft_model = get_peft_model(model, peft_config)
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}


# ---------------------------------------------------------------- logits


def probe_prompts(tokenizer, enable_thinking: bool | None):
    import torch

    prompts = []
    if tokenizer.chat_template:
        kwargs = {"date_string": FIXED_DATE}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        for question in CHAT_PROMPTS:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True,
                **kwargs,
            )["input_ids"]
            prompts.append(torch.tensor(ids, dtype=torch.long))
    prompts.append(torch.tensor(tokenizer(RAW_PROMPT)["input_ids"], dtype=torch.long))
    return prompts


def greedy(model, ids, steps: int):
    """`steps` greedy tokens after `ids` (no EOS stop: the comparison wants the same length)."""
    import torch

    out = model(input_ids=ids[None], use_cache=True)
    tokens = []
    for step in range(steps):
        token = out.logits[0, -1].argmax()
        tokens.append(token)
        if step + 1 < steps:
            out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens)


@contextlib.contextmanager
def threads_for(model_dir: Path, device: str):
    """One CPU thread for toy-sized models: their matmuls are too small to split, and on a busy
    machine the threads' synchronisation costs more than the work (measured 6x slower on 2 cores)."""
    import torch

    files, _ = weight_files(model_dir, "model")
    small = device == "cpu" and files and sum(f.stat().st_size for f in files) < 200 * 2**20
    previous = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(previous)


def compare_logits(base: Path, adapter: Path, merged: Path, tokenizer, device: str, report: Report) -> None:
    with threads_for(base, device):
        _compare_logits(base, adapter, merged, tokenizer, device, report)


def _compare_logits(base: Path, adapter: Path, merged: Path, tokenizer, device: str, report: Report) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = probe_prompts(tokenizer, report["enable_thinking"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device).eval()
    except Exception as err:  # noqa: BLE001
        report.problem("load-failed", f"--base {base}: transformers cannot load it ({type(err).__name__}: "
                       f"{first_line(err)})")
        return
    try:
        reference = PeftModel.from_pretrained(model, str(adapter)).eval()
    except Exception as err:  # noqa: BLE001
        report.problem("load-failed", f"--adapter {adapter}: PEFT cannot load it onto {base} ({type(err).__name__}: "
                       f"{first_line(err)})")
        return
    runs = []
    with torch.no_grad():
        for ids in prompts:
            ids = ids.to(device)
            continuation = greedy(reference, ids, NEW_TOKENS)
            sequence = torch.cat([ids, continuation])
            ref_logits = reference(input_ids=sequence[None]).logits[0].float()
            with reference.disable_adapter():
                base_logits = reference(input_ids=sequence[None]).logits[0].float()
            runs.append((ids, continuation, sequence, ref_logits, base_logits))
    del reference, model
    gc.collect()

    try:
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).to(device).eval()
    except Exception as err:  # noqa: BLE001
        report.problem("load-failed", f"--merged {merged}: transformers cannot load it ({type(err).__name__}: "
                       f"{first_line(err)})")
        return
    max_logit = max(float(ref.abs().max()) for _, _, _, ref, _ in runs)
    tolerance = tolerance_for(report["merged_dtype"] or "float32", max_logit)
    report["max_abs_logit"], report["tolerance"] = max_logit, tolerance
    worst = worst_base = effect = 0.0
    along = squared = 0.0  # <merged - base, (base + adapter) - base> and |(base + adapter) - base|^2
    greedy_same = True
    divergences = []
    with torch.no_grad():
        for ids, continuation, sequence, ref_logits, base_logits in runs:
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
            merged_continuation = greedy(merged_model, ids, NEW_TOKENS)
            if not torch.equal(merged_continuation, continuation):
                greedy_same = False
                step = int((merged_continuation != continuation).nonzero()[0])
                position = len(ids) + step - 1
                gap = float(ref_logits[position, continuation[step]] - ref_logits[position, merged_continuation[step]])
                divergences.append((step, gap))
    del merged_model

    report["max_abs_logit_diff"] = worst
    report["max_abs_logit_diff_vs_base"] = worst_base
    report["greedy_match"] = greedy_same
    # How much of the adapter's effect on the logits the merged model carries: 1 for base + adapter, 0 for
    # the base. Rounding noise is uncorrelated with the adapter's effect and averages out over the
    # thousands of logits, so this tells a merge from the base even for an adapter whose effect is
    # smaller than the tolerance.
    share = along / squared if squared > 0 else 0.0
    report["adapter_effect"] = effect
    report["adapter_effect_in_merged"] = share
    report["differs_from_base"] = worst_base > 0 and share >= 0.5
    dtype = report["merged_dtype"]
    if worst > tolerance:
        report.problem(
            "logits-differ",
            f"the merged model's logits differ from base + adapter (through PEFT) by up to {worst:.3g}, over the "
            f"{dtype} tolerance {tolerance:.3g}: {merged} is not this base merged with this adapter",
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


# ---------------------------------------------------------------- EOS and thinking


def template_eos(template: str, base_tokenizer) -> str | None:
    """The token LLaMA-Factory's `template` ends an assistant turn with (its first stop word when it replaces EOS)."""
    from llamafactory.data.template import TEMPLATES

    spec = TEMPLATES.get(template)
    if spec is None:
        return None
    if spec.replace_eos and spec.stop_words:
        return spec.stop_words[0]
    return base_tokenizer.eos_token


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, date_string=FIXED_DATE, **kwargs)


def check_eos_and_thinking(base_tokenizer, merged: Path, report: Report) -> None:
    from transformers import AutoTokenizer

    template = report["template"]
    if template is None:
        return
    eos = template_eos(template, base_tokenizer)
    if eos is None:
        report.problem("unknown-template", f"template {template!r} ({report['template_source']}) is not one "
                       "LLaMA-Factory knows: cannot tell which end-of-turn token training used")
        return
    report["eos_token"] = eos
    eos_id = base_tokenizer.convert_tokens_to_ids(eos)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
    except Exception as err:  # noqa: BLE001
        report.problem("load-failed", f"--merged {merged}: cannot load its tokenizer ({type(err).__name__}: "
                       f"{first_line(err)})")
        report["eos_ok"] = False
        return
    wrong = []
    if tokenizer.eos_token != eos or tokenizer.convert_tokens_to_ids(eos) != eos_id:
        wrong.append(f"the tokenizer's eos_token is {tokenizer.eos_token!r}")
    for name in ("config.json", "generation_config.json"):
        path = merged / name
        try:
            ids = as_list(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            wrong.append(f"{name} is missing or unreadable")
            continue
        if eos_id not in ids:
            wrong.append(f"{name} has eos_token_id {ids or None}, without {eos_id}")
    probe = [{"role": "user", "content": "sftkit probe"}, {"role": "assistant", "content": "sftkit answer"}]
    if not tokenizer.chat_template:
        wrong.append("the folder has no chat template")
    else:
        try:
            if "sftkit answer" + eos not in render(tokenizer, probe):
                wrong.append(f"its chat template does not end an assistant turn with {eos}")
        except Exception as err:  # noqa: BLE001 - a broken template is the finding
            wrong.append(f"its chat template does not render ({first_line(err)})")
    report["eos_ok"] = not wrong
    if wrong:
        report.problem(
            "eos-mismatch",
            f"{merged}: training ended every turn with {eos} (template {template}), but " + "; ".join(wrong)
            + ": generation will not stop where training taught it to; merge again with the run's template",
        )

    thinking = report["enable_thinking"]
    if thinking is None or not tokenizer.chat_template:
        return
    ask = probe[:1]
    try:
        default = render(tokenizer, ask, add_generation_prompt=True)
        wanted = render(tokenizer, ask, add_generation_prompt=True, enable_thinking=thinking)
        other = render(tokenizer, ask, add_generation_prompt=True, enable_thinking=not thinking)
    except Exception as err:  # noqa: BLE001
        report["thinking_ok"] = False
        report.problem("thinking-mismatch", f"{merged}: its chat template does not render ({first_line(err)})")
        return
    if wanted == other:
        report["thinking_ok"] = False
        report.problem(
            "thinking-mismatch",
            f"{merged}: its chat template ignores enable_thinking, but the run trained with enable_thinking "
            f"{str(thinking).lower()}: the model's own template was replaced; merge again with the kit",
        )
    elif default != wanted:
        report["thinking_ok"] = False
        report.problem(
            "thinking-mismatch",
            f"{merged}: its chat template defaults to enable_thinking {str(not thinking).lower()}, but the run trained "
            f"with {str(thinking).lower()}: a server that does not pass enable_thinking will prompt it the other way; "
            "merge with `python -m sftkit merge` (it records the setting in the template), or pass "
            f"enable_thinking={str(thinking).lower()} in every request",
        )
    else:
        report["thinking_ok"] = True


# ---------------------------------------------------------------- driver


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(base: Path, adapter: Path):
    from transformers import AutoTokenizer

    for folder in (base, adapter):
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # noqa: BLE001,S112 - try the next folder
            continue
    return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def verify(base: Path, adapter: Path, merged: Path, device: str | None = None) -> dict:
    """Run every check; the report's `ok` is True only when no problem was found."""
    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    report = Report(base, adapter, merged)
    for role, folder in (("base", base), ("adapter", adapter), ("merged", merged)):
        if not folder.is_dir():
            report.problem("missing-folder", f"--{role} {folder}: no such folder")
    if report["problems"]:
        return finish(report)

    training_setup(base, adapter, merged, report)
    base_ok = check_model_folder(base, "base", report)
    merged_ok = check_model_folder(merged, "merged", report)
    adapter_ok = base_ok and check_adapter(base, adapter, report)
    tokenizer = load_tokenizer(base, adapter)
    if tokenizer is None:
        report.problem("load-failed", f"neither {base} nor {adapter} holds a tokenizer transformers can load")
        return finish(report)
    if base_ok and merged_ok and adapter_ok:
        compare_logits(base, adapter, merged, tokenizer, device or default_device(), report)
    if merged_ok or (merged / "tokenizer_config.json").is_file():
        check_eos_and_thinking(tokenizer, merged, report)
    return finish(report)


def finish(report: Report) -> dict:
    report["ok"] = not report["problems"]
    return report.data


def summary(report: dict) -> list[str]:
    """Human-readable lines for a report."""
    lines = [f"verify-merge: {'ok' if report['ok'] else 'FAILED'}: {report['merged']}"]
    if report["max_abs_logit_diff"] is not None:
        lines.append(
            f"  logits vs base + adapter (PEFT): max |diff| {report['max_abs_logit_diff']:.3g}, tolerance "
            f"{report['tolerance']:.3g} ({report['merged_dtype']} weights, max |logit| {report['max_abs_logit']:.3g})"
        )
        lines.append(f"  greedy continuation: {'same' if report['greedy_match'] else 'different'}; differs from base: "
                     f"{'yes' if report['differs_from_base'] else 'NO'} (max |diff| "
                     f"{report['max_abs_logit_diff_vs_base']:.3g}; carries {report['adapter_effect_in_merged']:.0%} "
                     "of the adapter's effect)")
    if report["eos_token"] is not None:
        thinking = report["enable_thinking"]
        lines.append(
            f"  template {report['template']} (from {report['template_source']}): EOS {report['eos_token']} "
            f"{'ok' if report['eos_ok'] else 'WRONG'}"
            + ("" if thinking is None else f"; enable_thinking {str(thinking).lower()} "
               f"{'ok' if report['thinking_ok'] else 'WRONG'}")
        )
    lines += [f"  problem {p['name']}: {p['message']}" for p in report["problems"]]
    lines += [f"  note: {note}" for note in report["notes"]]
    return lines


@contextlib.contextmanager
def stdout_to_stderr():
    """Keep library chatter (also from C extensions) off stdout, which --json reserves for the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit verify-merge", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder (or one checkpoint-N)")
    parser.add_argument("--merged", type=Path, required=True, help="the merged model folder")
    parser.add_argument("--device", help="where to compute (default: cuda if available, else cpu); float32 needs "
                        "4 bytes per parameter (32 GB for Qwen3-8B)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = parser.parse_args(argv)
    guard = stdout_to_stderr() if args.json else contextlib.nullcontext()
    with guard:
        try:
            report = verify(args.base, args.adapter, args.merged, args.device)
        except Exception as err:  # noqa: BLE001 - one line, never a traceback
            report = Report(args.base, args.adapter, args.merged)
            report.problem("error", f"{type(err).__name__}: {first_line(err)}")
            report = finish(report)
    if args.json:
        print(json.dumps(report, allow_nan=False, default=str))
    else:
        print("\n".join(summary(report)))
    return 0 if report["ok"] else 1

