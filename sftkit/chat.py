"""Ask a model prompts through its own chat template, greedy, with the run's thinking setting.

    python -m sftkit chat --model saves/demo-merged --prompt "How do I run the demo?"

The thinking setting comes from the folder's `sftkit_merge.json` (written by the kit's merge)
unless `--thinking on|off` says otherwise, so a merged Qwen3 is asked the way it was trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MERGE_RECORD = "sftkit_merge.json"


def recorded_thinking(model_dir: Path) -> bool | None:
    record = model_dir / MERGE_RECORD
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("enable_thinking")
    return None


def load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def answer(model, tokenizer, question: str, enable_thinking: bool | None, max_new_tokens: int = 48) -> str:
    """The model's greedy reply to one user turn, special tokens removed."""
    import torch

    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt",
        **kwargs,
    )["input_ids"]
    with torch.no_grad():
        output = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (base or merged)")
    parser.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    parser.add_argument("--thinking", choices=["on", "off"], help="override the recorded thinking setting")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"sftkit chat: error: {args.model} has no config.json: pass a model folder", file=sys.stderr)
        return 1
    thinking = {"on": True, "off": False}.get(args.thinking, recorded_thinking(args.model))
    model, tokenizer = load(args.model)
    for prompt in args.prompt:
        print(f"user:      {prompt}\nassistant: {answer(model, tokenizer, prompt, thinking)}")
    return 0
