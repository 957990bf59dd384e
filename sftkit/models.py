"""The models: presets, and the one resolver of `--model PRESET|DIR` to weights, template, thinking, architecture.

Preset architectures are the published `config.json` values (PRODUCT.md, "Per-model facts"). A
preset's reason text is filled in from the run's own values (`Preset.reason`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sftkit.files import KIT_DIR, UsageError, check_placeholder, has_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
    override_reason: str = ""  # may name {cutoff_len}, {batch}, {logits_gb} and {lm_head_gb}: see `reason`
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
        """`override_reason` (or `text`) with the run's cutoff_len, micro-batch, fp32 logits and bf16 lm_head in GB."""
        cutoff, batch = int(final.get("cutoff_len", 0)), int(final.get("per_device_train_batch_size", 1))
        vocab, hidden = (self.architecture.vocab_size, self.architecture.hidden_size) if self.architecture else (0, 0)
        return (self.override_reason if text is None else text).format(
            cutoff_len=cutoff, batch=batch, logits_gb=f"{4 * cutoff * batch * vocab / 1e9:.1f}",
            lm_head_gb=f"{2 * vocab * hidden / 1e9:.1f}", eval_logits_gb=f"{4 * cutoff * vocab / 1e9:.1f}")


# Safe under ZeRO-3 (checked against liger-kernel 0.8.5, deepspeed 0.18.4, LLaMA-Factory 0.9.5; the GPU
# check in bench/gpu_run.sh runs it): Liger's fused forward reads lm_head.weight inside the model's forward,
# i.e. inside DeepSpeed's engine forward, where ZeROOrderedDict gathers a partitioned parameter on access
# (Liger-Kernel#1048 and TRL #6372 fail where the weight is trainable or the loss runs outside that forward).
# LoRA leaves lm_head frozen, so the fused loss computes only the input gradient, in the forward; its
# backward never touches the weight. The cost: lm_head stays gathered through the backward (the estimate
# counts it).
_LIGER_REASON = (
    "enable_liger_kernel=True: at cutoff_len {cutoff_len} and micro-batch {batch} the full-vocabulary logits in "
    "fp32 alone take {logits_gb} GB per GPU; the fused linear cross-entropy never materialises them (under "
    "ZeRO-3 it reads the frozen lm_head inside the model's forward, where DeepSpeed gathers it, and keeps "
    "it gathered through the backward: {lm_head_gb} GB)"
)
# Liger fuses the loss in training only: eval builds the logits of whole micro-batches and, by default,
# keeps them for metrics (8 sequences per device, gathered on the GPU until the end of the eval loop).
_EVAL = {"per_device_eval_batch_size": "1", "prediction_loss_only": "True", "eval_accumulation_steps": "1"}
_EVAL_REASON = (
    "eval at micro-batch 1, loss only, nothing accumulated on the GPU: the fused loss covers training only, "
    "so each eval sequence of cutoff_len {cutoff_len} builds its full-vocabulary logits ({eval_logits_gb} GB "
    "in fp32)"
)
# What every GPU preset changes, and why: the fused loss in training, and an eval that fits beside it
_GPU_SETTINGS = {"overrides": {"enable_liger_kernel": "True"}, "override_reason": _LIGER_REASON,
                 "eval_overrides": _EVAL, "eval_reason": _EVAL_REASON}

PRESETS: dict[str, Preset] = {
    name: Preset(name=name, hub_id=hub_id, template=template, enable_thinking=thinking, architecture=arch,
                 **_GPU_SETTINGS)
    for name, hub_id, template, thinking, arch in (
        ("qwen3-8b", "Qwen/Qwen3-8B", "qwen3", False,
         Architecture("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False)),
        ("qwen3-14b", "Qwen/Qwen3-14B", "qwen3", False,
         Architecture("qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False)),
        ("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama3", None,
         Architecture("llama", 3072, 28, 24, 8, 128, 8192, 128256, True)),
    )
}
# The demo: a tiny Qwen3 built locally by `python -m sftkit build-demo-model`, trained on CPU.
PRESETS["demo"] = Preset(
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
)

# model_type in a local folder's config.json -> (template, enable_thinking)
MODEL_TYPE_TEMPLATES: dict[str, tuple[str, bool | None]] = {
    "qwen3": ("qwen3", False),
}


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen3")  # what the memory estimate models
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


class ModelError(UsageError):
    """A model that cannot be used as given: one line that names the fix."""


@dataclass
class ModelChoice:
    path: str  # model_name_or_path as LLaMA-Factory gets it: the folder given, or the preset's hub id
    name: str  # <Model> in <Model>-lora
    template: str
    thinking: bool | None  # the template's enable_thinking, None: no switch
    preset: Preset | None
    local_dir: Path | None  # the folder on this machine (a hub id's local cache), None: not here


def resolve(model: str, model_path: str | None = None, template: str | None = None, *,
            weights: bool = True) -> ModelChoice:
    """`--model PRESET|DIR [--model-path DIR] [--template T]` as the launcher and the data check take it.

    A folder must hold config.json, a tokenizer and (with `weights`) its weights; a preset's folder
    must hold the preset's model type. `weights=False`: LLaMA-Factory builds them (`train_from_scratch`)
    or only the tokenizer is read (check-data)."""
    preset = PRESETS.get(model)
    if preset is not None:
        path_value = model_path or preset.hub_id
        check_placeholder(path_value, "--model-path")
        path_value, local = _existing(path_value)
        if local is None and preset.cpu and not model_path:
            raise ModelError(f"the demo model {preset.hub_id} is missing: build it with "
                             f"`python -m sftkit build-demo-model --out {preset.hub_id}`")
        if model_path or local is not None:
            local = local or Path(path_value)
            check_model_dir(local, weights)
            model_type = _model_type(local)
            if preset.architecture and model_type != preset.architecture.model_type:
                raise ModelError(f"model folder {path_value!r} holds a {model_type!r} model, but preset "
                                 f"{preset.name!r} expects {preset.architecture.model_type!r}: pass the matching "
                                 "--model, or --model DIR")
        chosen, thinking = preset.template, preset.enable_thinking
        if preset.architecture is None and model_path:  # demo settings on another tiny local model
            chosen, thinking = template_for_model_dir(local) or (chosen, thinking)
        if template and template != chosen:
            chosen, thinking = template, thinking_for(template)
        name = Path(path_value).name if model_path else preset.model_name
        return ModelChoice(path_value, name, chosen, thinking, preset, local or hub_cache_dir(path_value))

    check_placeholder(model, "--model")
    if model_path:
        raise ModelError(f"--model-path goes with a preset ({', '.join(PRESETS)}); with --model {model!r} the "
                         "folder is the model: drop --model-path")
    model, local = _existing(model)
    if local is None and "/" not in model:
        raise ModelError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    local = local or Path(model)
    check_model_dir(local, weights)
    if template:
        return ModelChoice(model, local.resolve().name, template, thinking_for(template), None, local)
    detected = template_for_model_dir(local)
    if detected is None:
        raise ModelError(f"model folder {model!r} has model type {_model_type(local)!r}, which the kit has no "
                         "template for: pass --template NAME (a LLaMA-Factory template, e.g. qwen3, llama3)")
    return ModelChoice(model, local.resolve().name, *detected, None, local)


def _model_type(folder: Path) -> str | None:
    """The model_type in the folder's config.json."""
    return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")


def thinking_for(template: str) -> bool | None:
    return False if template == "qwen3" else None


def _existing(value: str) -> tuple[str, Path | None]:
    """(the path LLaMA-Factory gets, the folder on this machine or None): `value` itself where it exists, else
    the same path under the kit's folder, passed on absolute so that it holds from any working directory."""
    for candidate in (Path(value), KIT_DIR / value):
        if candidate.exists():
            return (value if candidate == Path(value) else str(candidate)), candidate
    return value, None


def hub_cache_dir(hub_id: str) -> Path | None:
    """The snapshot folder of `hub_id` in the local Hugging Face cache, when its tokenizer is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(hub_id, name) for name in ("tokenizer_config.json", "tokenizer.json")]
    return Path(found[0]).parent if all(isinstance(item, str) for item in found) else None


def check_model_dir(path: Path, weights: bool = True) -> None:
    """A usable local model folder has config.json, weights and a tokenizer; say which is missing."""
    if not path.exists():
        raise ModelError(f"model folder {str(path)!r} does not exist: pass --model-path with the folder of the "
                         "weights")
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is a file, not a folder: pass the folder that holds config.json")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    else:
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelError(f"{path / 'config.json'} is not valid JSON ({err}): download the model again") from None
    if weights:
        missing += _missing_weights(path)
    if not has_tokenizer(path):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise ModelError(f"model folder {str(path)!r} lacks {', '.join(missing)}: download the complete model into "
                         "it (see README, 'Put the base model on the node')")


def _missing_weights(path: Path) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                return [f"a readable {index_name}"]
            absent = [shard for shard in shards if not (path / shard).is_file()]
            if absent:
                more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
                return [f"weight shards named in {index_name}: {', '.join(absent[:3])}{more}"]
            return []
    return [] if any(p.suffix in WEIGHT_SUFFIXES for p in path.glob("*")) else ["the weights (*.safetensors)"]


def load_architecture(model: str) -> tuple[Architecture, str, bool | None]:
    """(architecture, description, preset's liger default or None) for a preset, a config.json or a folder."""
    if (preset := PRESETS.get(model)) is not None:
        if preset.architecture is None:
            raise ModelError(f"preset {model!r} has no fixed architecture; pass its model folder (saves/demo)")
        return preset.architecture, f"{model} (preset)", preset.overrides.get("enable_liger_kernel") == "True"
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{model}: not a preset ({', '.join(p for p in PRESETS if p != 'demo')}) nor an "
                         "existing config.json or model folder")
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelError(f"{path}: no config.json in this folder; pass the model folder that holds it")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path}: not a readable JSON config ({exc}); pass the model's config.json") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{config_path}: model_type {model_type!r} is not supported by the estimate "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    bad = [k for k in REQUIRED_KEYS if not (isinstance(raw.get(k), int) and raw[k] > 0)]
    if bad:  # defaults are taken from transformers only for kv heads, head_dim and tied embeddings
        raise ModelError(f"{config_path}: {', '.join(bad)} missing or not a positive whole number")
    from transformers import AutoConfig  # transformers' own defaults (head_dim, kv heads, tied embeddings)

    try:
        config = AutoConfig.for_model(**raw)
        arch = Architecture(model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                            config.num_key_value_heads or config.num_attention_heads,
                            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                            config.intermediate_size, config.vocab_size, bool(config.tie_word_embeddings))
    except Exception as exc:  # any malformed config is a user error, reported in one line
        raise ModelError(f"{config_path}: cannot read the architecture ({type(exc).__name__}: {exc})") from exc
    return arch, str(config_path), None


def architecture(preset: Preset | None, model_dir: str) -> Architecture | None:
    """The preset's architecture, else the folder's (without importing transformers when config.json names
    every field); None when neither is known."""
    if preset is not None and preset.architecture is not None:
        return preset.architecture
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size")
    if config.get("model_type") and all(isinstance(config.get(k), int) for k in fields):
        return Architecture(config["model_type"], *(config[k] for k in fields),
                            bool(config.get("tie_word_embeddings", False)))
    try:
        return load_architecture(model_dir)[0]
    except ModelError:
        return None


def template_for_model_dir(model_dir: Path) -> tuple[str, bool | None] | None:
    """The template a local model folder gets from its config.json, or None when unknown."""
    model_type = _model_type(model_dir)
    if model_type == "llama" and _has_token(model_dir, "<|eot_id|>"):
        return ("llama3", None)  # Llama 3.x: turns end with <|eot_id|> (Llama 2 has no such token)
    return MODEL_TYPE_TEMPLATES.get(model_type)


def _has_token(model_dir: Path, token: str) -> bool:
    paths = (model_dir / name for name in ("tokenizer_config.json", "tokenizer.json"))
    return any(path.is_file() and token in path.read_text(encoding="utf-8", errors="replace") for path in paths)
