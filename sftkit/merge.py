"""Merge a LoRA adapter into its base model with LLaMA-Factory's export, safely.

    python -m sftkit merge --adapter saves/Qwen3-8B-lora [--out saves/Qwen3-8B-merged] [--overwrite]

Settings come from the run's own `merge_model.yaml` (written into the adapter folder by
sft_train.sh: base model, template, thinking), else from the kit's top-level `merge_model.yaml`;
`--set key=value` overrides single keys. The export goes to a temporary folder next to the
destination and is renamed into place only when it finished, so a failed or interrupted merge
never leaves a folder under the final name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from sftkit.chat import MERGE_RECORD

KIT_MERGE_CONFIG = Path(__file__).resolve().parent.parent / "merge_model.yaml"


class MergeError(Exception):
    pass


def load_config(adapter: Path, config: Path | None, overrides: list[str]) -> dict:
    source = config or (adapter / "merge_model.yaml" if (adapter / "merge_model.yaml").is_file() else KIT_MERGE_CONFIG)
    try:
        settings = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise MergeError(f"{source}: cannot read it as YAML ({err}): restore it from the kit") from None
    if not isinstance(settings, dict):
        raise MergeError(f"{source}: expected 'key: value' lines, found {type(settings).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise MergeError(f"--set {item!r}: write it as key=value")
        settings[key] = yaml.safe_load(value)
    settings["adapter_name_or_path"] = str(adapter)
    return settings


def default_destination(adapter: Path) -> Path:
    name = adapter.name[: -len("-lora")] if adapter.name.endswith("-lora") else adapter.name
    return adapter.parent / f"{name}-merged"


def merge(adapter: Path, out: Path, settings: dict, overwrite: bool) -> Path:
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter} has no adapter_config.json: pass the folder sft_train.sh wrote (--output-dir)")
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists: pass --overwrite to replace it, or --out another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        settings = dict(settings, export_dir=str(staging / "model"))
        config_file = staging / "merge.yaml"
        config_file.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        result = subprocess.run(["llamafactory-cli", "export", str(config_file)], check=False)
        if result.returncode != 0:
            raise MergeError(f"llamafactory-cli export failed (exit {result.returncode}); see its output above")
        merged = staging / "model"
        if not any(merged.glob("*.safetensors")):
            raise MergeError(f"the export wrote no weights into {merged}")
        record = {key: settings.get(key) for key in ("model_name_or_path", "adapter_name_or_path", "template",
                                                    "enable_thinking")}
        (merged / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            merged.rename(out)
            shutil.rmtree(old)
        else:
            merged.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftkit merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder (or one checkpoint-N)")
    parser.add_argument("--out", type=Path, help="destination (default: <Model>-merged beside the adapter)")
    parser.add_argument("--config", type=Path, help="a merge_model.yaml to use instead of the run's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    try:
        settings = load_config(args.adapter, args.config, args.overrides)
        out = merge(args.adapter, args.out or default_destination(args.adapter), settings, args.overwrite)
    except MergeError as err:
        print(f"sftkit merge: error: {err}", file=sys.stderr)
        return 1
    print(f"merged model: {out}")
    return 0
