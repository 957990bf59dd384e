"""Tiny models of the real families, built locally: no hub, no download.

`build_tiny_model("qwen3", out_dir, texts)` writes a folder that loads like a real checkpoint:
random weights of the family's architecture at toy size (`Qwen3ForCausalLM` or
`LlamaForCausalLM`), and a byte-level BPE tokenizer trained on `texts` that carries the family's
real special tokens, its real chat template (`chat_templates/*.jinja`) and its EOS conventions.
Training, merge and chat then run the same code paths as on Qwen3-8B or Llama-3.2-3B-Instruct.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"

# Special tokens in the order the real vocabularies append them after the BPE merges.
FAMILIES: dict[str, dict] = {
    "qwen3": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        # added but not "special" in Qwen3's tokenizer: they stay visible in decoded text
        "added": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "chat_template": "qwen3.jinja",
        "tie_word_embeddings": False,
        # Qwen3-8B's generation_config.json: stop on <|im_end|> or <|endoftext|>
        "generation_eos": ["<|im_end|>", "<|endoftext|>"],
        "generation_bos": "<|endoftext|>",
    },
    "llama3": {
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ],
        "added": [],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,  # Llama-3.2-Instruct ships no pad token
        "chat_template": "llama3.jinja",
        "tie_word_embeddings": True,
        # Llama-3.2-3B-Instruct's generation_config.json
        "generation_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        "generation_bos": "<|begin_of_text|>",
    },
}

TOY_SIZE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}
LOGIT_SCALE = 4.0


def _train_tokenizer(family: str, texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(spec["special"])
    if spec["added"]:
        tok.add_tokens(spec["added"])
    if spec["bos"]:  # Llama 3 prepends <|begin_of_text|> when add_special_tokens=True
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    hf_tok.chat_template = (TEMPLATES_DIR / spec["chat_template"]).read_text(encoding="utf-8")
    return hf_tok


def build_tiny_model(family: str, out_dir: Path, texts: list[str], seed: int = 0, vocab_size: int = 800) -> Path:
    """Write a tiny random-weight model of `family` ("qwen3" or "llama3") into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = FAMILIES[family]
    tokenizer = _train_tokenizer(family, texts, vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    common = dict(
        TOY_SIZE,
        vocab_size=len(tokenizer),
        tie_word_embeddings=spec["tie_word_embeddings"],
        bos_token_id=ids(spec["generation_bos"]),
        eos_token_id=ids(spec["eos"]),
        pad_token_id=ids(spec["pad"]) if spec["pad"] else None,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    if family == "qwen3":
        config = Qwen3Config(**common, rope_theta=1000000.0)
        model = Qwen3ForCausalLM(config)
    else:
        config = LlamaConfig(**common, rope_theta=500000.0)
        model = LlamaForCausalLM(config)
    # A random lm_head at the usual std 0.02 gives logits of std ~0.2, far too flat for a toy model
    # to ever answer confidently; std LOGIT_SCALE/sqrt(hidden) gives logits of std ~LOGIT_SCALE.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, LOGIT_SCALE / TOY_SIZE["hidden_size"] ** 0.5)
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids(spec["generation_bos"]),
        eos_token_id=[ids(t) for t in spec["generation_eos"]],
        pad_token_id=common["pad_token_id"],
        do_sample=True,
        temperature=0.6,
        top_p=0.95 if family == "qwen3" else 0.9,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def texts_from_alpaca(path: Path) -> list[str]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [" ".join(str(row.get(key, "")) for key in ("system", "instruction", "input", "output")) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit build-demo-model", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--data", type=Path, default=Path("data/demo.json"), help="alpaca file the tokenizer learns")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_model(args.family, args.out, texts_from_alpaca(args.data), seed=args.seed)
    print(f"built a tiny {args.family} model in {args.out}")
    return 0
