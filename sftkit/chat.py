"""Ask a model prompts through its own chat template, greedy, with the run's thinking setting.

    python -m sftkit chat --model saves/demo-merged --prompt "How do I run the demo?" [--prompt ...]

Thinking comes from the folder's `sftkit_merge.json` unless `--thinking on|off`; each prompt is one turn,
greedy, stopped at EOS; bfloat16 on a GPU (CUDA_VISIBLE_DEVICES= keeps it on CPU), else float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MERGE_RECORD = "sftkit_merge.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ChatError(Exception):
    """A user mistake: one clear line, no traceback."""


def recorded_thinking(model_dir: Path) -> bool | None:
    """The enable_thinking the model was merged with (None: not recorded, or no such switch)."""
    record = Path(model_dir) / MERGE_RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ChatError(f"{record} is not valid JSON ({err}): merge again, or pass --thinking on|off") from None
    value = data.get("enable_thinking") if isinstance(data, dict) else None
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
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ChatError(f"{model_dir} has no tokenizer files: copy them from the base model folder")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
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
        raise ChatError(f"{model_dir}: cannot load its tokenizer ({type(err).__name__}: {_line(err)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32, device_map={"": device} if on_gpu else None
        ).eval()
    except Exception as err:  # noqa: BLE001
        raise ChatError(
            f"{model_dir}: cannot load its weights ({type(err).__name__}: {_line(err)}); a truncated or partial "
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
    with torch.no_grad():
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
