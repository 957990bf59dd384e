"""`make demo`: the whole journey on a tiny Qwen3, on CPU, offline.

1. build the tiny base model in saves/demo (random weights, the genuine Qwen3 tokenizer and chat template);
2. train through the real launcher: `bash sft_train.sh --model demo` (torchrun, 2 CPU processes,
   ds_z3_config.json) into saves/demo-lora;
3. merge with merge_model.yaml's settings, overridden to the demo paths, into saves/demo-merged;
4. ask the merged and the base model every demo question, greedy, through the chat template.

The last line is `demo: merged model answered N/M demo prompts exactly (base model: K/M)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from demo import tiny_model as demo_model
from sftkit.files import KIT_DIR
from sftkit.merge import chat
from sftkit.merge import export as merge

DEMO_DATA = KIT_DIR / "data" / "demo.json"
FINGERPRINT_FILE = "sftkit_demo.json"


def fingerprint() -> str:
    """Changes when the model builder changes (it pins the tokenizer files' sha256), so a stale base is rebuilt."""
    return hashlib.sha256(Path(demo_model.__file__).read_bytes()).hexdigest()[:16]


def ensure_base_model(base: Path) -> None:
    record = base / FINGERPRINT_FILE
    wanted = fingerprint()
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("fingerprint") == wanted:
        print(f"demo: tiny Qwen3 base model already built in {base}")
        return
    print(f"demo: building a tiny Qwen3 base model in {base}")
    demo_model.build_tiny_model("qwen3", base)
    record.write_text(json.dumps({"fingerprint": wanted}) + "\n", encoding="utf-8")


def score(model_dir: Path, pairs: list[tuple[str, str]], thinking: bool | None) -> int:
    """Exact greedy answers, on one CPU thread (a toy model's matmuls are too small to split; on a busy
    machine two threads' synchronisation costs more than the work). An answer can match only if it
    stops within a few tokens of the expected one's length, so generation stops there."""
    import torch

    torch.set_num_threads(1)
    model, tokenizer = chat.load(model_dir)
    return sum(
        chat.answer(model, tokenizer, question, thinking, max_new_tokens=len(tokenizer(expected)["input_ids"]) + 4)
        == expected
        for question, expected in pairs
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=Path, default=Path("saves"), help="where demo, demo-lora, demo-merged go")
    args = parser.parse_args(argv)
    base, adapter, merged = args.saves / "demo", args.saves / "demo-lora", args.saves / "demo-merged"

    try:
        ensure_base_model(base)
    except demo_model.DemoModelError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    print("demo: training with bash sft_train.sh --model demo")
    train = [
        "bash", str(KIT_DIR / "sft_train.sh"), "--model", "demo", "--model-path", str(base),
        "--output-dir", str(adapter), "--overwrite",
    ]
    if subprocess.run(train, check=False).returncode != 0:
        print("demo: training failed; see the output above", file=sys.stderr)
        return 1

    print(f"demo: merging {adapter} into {merged}")
    try:
        settings = merge.load_config(adapter, None, ["infer_dtype=float32"])  # the tiny model is fp32
        merge.merge(adapter, merged, settings, overwrite=True)
    except merge.MergeError as err:
        print(f"demo: merge failed: {err}", file=sys.stderr)
        return 1

    rows = json.loads(DEMO_DATA.read_text(encoding="utf-8"))
    pairs = [(row["instruction"], row["output"]) for row in rows]
    thinking = chat.recorded_thinking(merged)
    trained = score(merged, pairs, thinking)
    untrained = score(base, pairs, thinking)
    total = len(pairs)
    print(f"demo: merged model answered {trained}/{total} demo prompts exactly (base model: {untrained}/{total})")
    return 0 if trained > untrained else 1
