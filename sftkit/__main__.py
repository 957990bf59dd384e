"""`python -m sftkit COMMAND ...`: one module per command, imported only when called."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": ("sftkit.launch.plan", "resolve, check and supervise a training run (sft_train.sh execs it)"),
    "supervise": ("sftkit.launch.supervise", "hold the output dir, record and run torchrun from a JSON plan"),
    "build-demo-model": ("demo.tiny_model", "build a tiny Qwen3 or Llama-3 model locally"),
    "demo": ("demo.journey", "the whole journey on a tiny model: train, merge, chat"),
    "demo-real": ("demo.real", "the journey on SmolLM2-135M-Instruct: it learns a new identity"),
    "merge": ("sftkit.merge.export", "merge an adapter with LLaMA-Factory's export"),
    "chat": ("sftkit.merge.chat", "ask a model prompts through its own chat template"),
    "check-data": ("sftkit.data.check_data", "validate a dataset and report the tokens training will see"),
    "estimate": ("sftkit.launch.estimate", "per-GPU memory and FLOPs of a LoRA ZeRO-3 run, from the architecture"),
    "verify-merge": ("sftkit.merge.verify_merge", "prove a merged model equals base + adapter and keeps the EOS"),
}


def usage() -> str:
    lines = ["usage: python -m sftkit COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<18} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sftkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
