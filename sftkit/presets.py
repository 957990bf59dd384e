"""Per-model presets: hub id, LLaMA-Factory template, thinking setting, architecture, and what they change.

The architecture numbers are the published `config.json` values of each model (PRODUCT.md,
"Per-model facts"); `sftkit.estimate` and the benchmark build configs from them without weights.
A preset's reason text is filled in from the run's own values (`Preset.reason`), so an edit of the
seed's SEED_ARGS in sft_train.sh shows there too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    template: str
    enable_thinking: bool | None  # None: the template has no thinking switch
    architecture: Architecture | None
    # LLaMA-Factory arguments that differ from the seed's defaults, each with the reason
    # printed at launch (PRODUCT.md: a preset changes a default only where it cannot work).
    overrides: dict[str, str] = field(default_factory=dict)
    override_reason: str = ""  # may name {cutoff_len}, {batch} and {logits_gb}: see `reason`
    # With a validation split: what eval needs on this hardware (LLaMA-Factory's eval would not fit otherwise)
    eval_overrides: dict[str, str] = field(default_factory=dict)
    eval_reason: str = ""
    default_dataset: str | None = None
    default_gpus: int | None = None  # None: the visible GPU count
    cpu: bool = False

    @property
    def model_name(self) -> str:
        """The folder name of the base model: `<Model>` in `<Model>-lora`, `<Model>-merged`."""
        return self.hub_id.rsplit("/", 1)[-1]

    def reason(self, final: Mapping[str, str], text: str | None = None) -> str:
        """`override_reason` (or `text`) with the run's cutoff_len and micro-batch, and their fp32 logits in GB."""
        cutoff, batch = int(final.get("cutoff_len", 0)), int(final.get("per_device_train_batch_size", 1))
        vocab = self.architecture.vocab_size if self.architecture else 0
        return (self.override_reason if text is None else text).format(
            cutoff_len=cutoff, batch=batch, logits_gb=f"{4 * cutoff * batch * vocab / 1e9:.1f}",
            eval_logits_gb=f"{4 * cutoff * vocab / 1e9:.1f}")


_LIGER_REASON = (
    "enable_liger_kernel=True: at cutoff_len {cutoff_len} and micro-batch {batch} the full-vocabulary logits in "
    "fp32 alone take {logits_gb} GB per GPU; the fused linear cross-entropy never materialises them"
)
# Liger fuses the loss in training only: eval builds the logits of whole micro-batches and, by default,
# keeps them for metrics (8 sequences per device, gathered on the GPU until the end of the eval loop).
_EVAL = {"per_device_eval_batch_size": "1", "prediction_loss_only": "True", "eval_accumulation_steps": "1"}
_EVAL_REASON = (
    "eval at micro-batch 1, loss only, nothing accumulated on the GPU: the fused loss covers training only, "
    "so each eval sequence of cutoff_len {cutoff_len} builds its full-vocabulary logits ({eval_logits_gb} GB "
    "in fp32)"
)

PRESETS: dict[str, Preset] = {
    "qwen3-8b": Preset(
        name="qwen3-8b",
        hub_id="Qwen/Qwen3-8B",
        template="qwen3",
        enable_thinking=False,
        architecture=Architecture("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False),
        overrides={"enable_liger_kernel": "True"},
        override_reason=_LIGER_REASON,
        eval_overrides=_EVAL,
        eval_reason=_EVAL_REASON,
    ),
    "qwen3-14b": Preset(
        name="qwen3-14b",
        hub_id="Qwen/Qwen3-14B",
        template="qwen3",
        enable_thinking=False,
        architecture=Architecture("qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False),
        overrides={"enable_liger_kernel": "True"},
        override_reason=_LIGER_REASON,
        eval_overrides=_EVAL,
        eval_reason=_EVAL_REASON,
    ),
    "llama3.2-3b": Preset(
        name="llama3.2-3b",
        hub_id="meta-llama/Llama-3.2-3B-Instruct",
        template="llama3",
        enable_thinking=None,
        architecture=Architecture("llama", 3072, 28, 24, 8, 128, 8192, 128256, True),
        overrides={"enable_liger_kernel": "True"},
        override_reason=_LIGER_REASON,
        eval_overrides=_EVAL,
        eval_reason=_EVAL_REASON,
    ),
    # The demo: a tiny Qwen3 built locally by `python -m sftkit build-demo-model`, trained on CPU.
    "demo": Preset(
        name="demo",
        hub_id="saves/demo",
        template="qwen3",
        enable_thinking=False,
        architecture=None,
        overrides={
            "bf16": "False",
            "cutoff_len": "256",
            "per_device_train_batch_size": "4",
            "gradient_accumulation_steps": "1",
            "learning_rate": "5e-3",
            "num_train_epochs": "30",
            "lora_dropout": "0.0",
            "warmup_ratio": "0.05",
            "logging_steps": "30",
            "ddp_backend": "gloo",
            "seed": "42",
        },
        override_reason=(
            "CPU demo on a random-weight tiny model: fp32 on CPU (gloo), short cutoff, micro-batch 4 without "
            "accumulation, no dropout, a 100x learning rate and 30 epochs so 40 answers are memorised in a minute"
        ),
        default_dataset="demo",
        default_gpus=2,
        cpu=True,
    ),
}

# model_type in a local folder's config.json -> (template, enable_thinking)
MODEL_TYPE_TEMPLATES: dict[str, tuple[str, bool | None]] = {
    "qwen3": ("qwen3", False),
}


def template_for_model_dir(model_dir: Path) -> tuple[str, bool | None] | None:
    """The template a local model folder gets from its config.json, or None when unknown."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type in MODEL_TYPE_TEMPLATES:
        return MODEL_TYPE_TEMPLATES[model_type]
    if model_type == "llama" and _has_token(model_dir, "<|eot_id|>"):
        return ("llama3", None)  # Llama 3.x: turns end with <|eot_id|> (Llama 2 has no such token)
    return None


def _has_token(model_dir: Path, token: str) -> bool:
    for name in ("tokenizer_config.json", "tokenizer.json"):
        path = model_dir / name
        if path.is_file() and token in path.read_text(encoding="utf-8", errors="replace"):
            return True
    return False
