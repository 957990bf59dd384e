"""Ask a model prompts through its own chat template, greedy, with the run's thinking setting.

Also a merged folder's chat side for verify-merge: its record (sftkit_merge.json), EOS and thinking default.

    python -m sftkit chat --model saves/demo-merged --prompt "How do I run the demo?" [--prompt ...]

Thinking comes from the folder's `sftkit_merge.json` unless `--thinking on|off`; each prompt is one turn,
greedy, stopped at EOS; bfloat16 on a GPU (CUDA_VISIBLE_DEVICES= keeps it on CPU), else float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sftkit.files import has_tokenizer

MERGE_RECORD = "sftkit_merge.json"
FIXED_DATE = "26 Jul 2024"  # Llama 3.2's template prints today's date; the probes must not change daily


class ChatError(Exception):
    """A user mistake: one clear line, no traceback."""


def read_merge_record(model_dir: Path) -> dict | None:
    """The folder's sftkit_merge.json (None when absent or not an object); ValueError when it is not JSON."""
    path = Path(model_dir) / MERGE_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else None


def recorded_thinking(model_dir: Path) -> bool | None:
    """The enable_thinking the model was merged with (None: not recorded, or no such switch)."""
    try:
        value = (read_merge_record(model_dir) or {}).get("enable_thinking")
    except ValueError as err:
        raise ChatError(f"{err}: merge again, or pass --thinking on|off") from None
    return value if isinstance(value, bool) else None


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.exists():
        raise ChatError(f"{model_dir}: no such folder: pass a model folder (e.g. saves/demo-merged)")
    if not model_dir.is_dir():
        raise ChatError(f"{model_dir} is a file: pass the model folder that holds config.json")
    if not (model_dir / "config.json").is_file():
        hint = " (an adapter: merge it first with python -m sftkit merge)" if (
            model_dir / "adapter_config.json").is_file() else ""
        raise ChatError(f"{model_dir} has no config.json{hint}: pass a model folder")
    if not has_tokenizer(model_dir):
        raise ChatError(f"{model_dir} has no tokenizer files: copy them from the base model folder")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ChatError(f"{model_dir} holds no weights (*.safetensors): the model was not saved completely")


def load(model_dir: Path, device: str | None = None):
    """(model, tokenizer): bfloat16 on a GPU when there is one, else float32 on CPU; ChatError with one line
    when the folder cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - one line, never a traceback
        raise ChatError(f"{model_dir}: cannot load its tokenizer ({type(err).__name__}: {first_line(err)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device_map={"": device} if on_gpu else None
        ).eval()
    except Exception as err:  # noqa: BLE001
        raise ChatError(
            f"{model_dir}: cannot load its weights ({type(err).__name__}: {first_line(err)}); a truncated or partial "
            "copy? check it with python -m sftkit verify-merge"
        ) from None
    return model, tokenizer


def answer(model, tokenizer, question: str, enable_thinking: bool | None, max_new_tokens: int = 48,
           system: str | None = None) -> str:
    """The model's greedy reply to one user turn, special tokens removed."""
    import torch

    if not tokenizer.chat_template:
        raise ChatError("the model has no chat template (a base, not an instruct model?): chat needs one")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt", **kwargs
    )["input_ids"].to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_new_tokens,
                            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()


def first_line(err: BaseException) -> str:
    """An error's first line (its type when it says nothing), for one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def template_eos(template: str, base_tokenizer) -> str | None:
    """The token LLaMA-Factory's `template` ends an assistant turn with (its first stop word when it replaces EOS)."""
    from llamafactory.data.template import TEMPLATES

    spec = TEMPLATES.get(template)
    if spec is not None and spec.replace_eos and spec.stop_words:
        return spec.stop_words[0]
    return None if spec is None else base_tokenizer.eos_token


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, date_string=FIXED_DATE, **kwargs)


def check_eos_and_thinking(base_tokenizer, merged: Path, report):
    """verify-merge's template check: the merged folder ends a turn with training's EOS and thinks as trained.

    Returns the merged folder's tokenizer when it loaded it (for the served-prompt check), else None."""
    from transformers import AutoTokenizer

    template = report["template"]
    if template is None:
        return None
    eos = template_eos(template, base_tokenizer)
    if eos is None:
        report.problem("unknown-template", f"template {template!r} ({report['template_source']}) is not one "
                       "LLaMA-Factory knows: cannot tell which end-of-turn token training used")
        return None
    report["eos_token"] = eos
    eos_id = base_tokenizer.convert_tokens_to_ids(eos)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
    except Exception as err:  # noqa: BLE001
        report.problem("load-failed", f"--merged {merged}: cannot load its tokenizer ({type(err).__name__}: "
                       f"{first_line(err)})")
        report["eos_ok"] = False
        return None
    wrong = []
    if tokenizer.eos_token != eos or tokenizer.convert_tokens_to_ids(eos) != eos_id:
        wrong.append(f"the tokenizer's eos_token is {tokenizer.eos_token!r}")
    for name in ("config.json", "generation_config.json"):
        try:
            ids = json.loads((merged / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            wrong.append(f"{name} is missing or unreadable")
            continue
        ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
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
    _check_thinking_default(tokenizer, merged, report, probe[:1])
    return tokenizer


def _check_thinking_default(tokenizer, merged: Path, report, ask: list[dict]) -> None:
    """The merged template thinks as the run trained when a request does not say (and obeys one that does)."""
    thinking = report["enable_thinking"]
    if thinking is None or not tokenizer.chat_template:
        return
    trained, problem = str(thinking).lower(), None
    try:
        default, wanted, other = (render(tokenizer, ask, add_generation_prompt=True, **kwargs)
                                  for kwargs in ({}, {"enable_thinking": thinking}, {"enable_thinking": not thinking}))
    except Exception as err:  # noqa: BLE001
        problem = f"its chat template does not render ({first_line(err)})"
    else:
        if wanted == other:
            problem = ("its chat template ignores enable_thinking, but the run trained with enable_thinking "
                       f"{trained}: the model's own template was replaced; merge again with the kit")
        elif default != wanted:
            problem = (f"its chat template defaults to enable_thinking {str(not thinking).lower()}, but the run "
                       f"trained with {trained}: a server that does not pass enable_thinking will prompt it the other "
                       "way; merge with `python -m sftkit merge` (it records the setting in the template), or pass "
                       f"enable_thinking={trained} in every request")
    report["thinking_ok"] = problem is None
    if problem:
        report.problem("thinking-mismatch", f"{merged}: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (base or merged)")
    parser.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    parser.add_argument("--system", help="a system message for every prompt")
    parser.add_argument("--thinking", choices=["on", "off"], help="override the recorded thinking setting")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens {args.max_new_tokens}: give a positive number")
        if any(not prompt.strip() for prompt in args.prompt):
            raise ChatError("--prompt is empty: give the question to ask")
        check_model_dir(args.model)
        thinking = {"on": True, "off": False}.get(args.thinking, recorded_thinking(args.model))
        model, tokenizer = load(args.model)
        note = "model's default" if thinking is None else str(thinking).lower()
        print(f"model: {args.model} (chat template: its own; enable_thinking: {note})")
        for prompt in args.prompt:
            reply = answer(model, tokenizer, prompt, thinking, args.max_new_tokens, args.system)
            print(f"user:      {prompt}\nassistant: {reply}")
    except ChatError as err:
        print(f"sftkit chat: error: {err}", file=sys.stderr)
        return 1
    return 0
